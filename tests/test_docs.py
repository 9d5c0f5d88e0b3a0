"""The docs do not rot: every command README.md and docs/ show is a real command with real options, every relative
link (and its #anchor) resolves, and docs/cli.md is the commands' own --help.

    python tests/test_docs.py      # rewrites docs/cli.md from the installed commands' --help
"""

import importlib
import io
import os
import re
import shlex
import sys
from contextlib import redirect_stdout, suppress
from functools import cache
from pathlib import Path
from unittest.mock import patch

from ladder import cache_root

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CLI_PAGE = REPO / "docs" / "cli.md"
# Each command the docs may show: its module and the arguments before --help.
COMMANDS = {
    "ladder-convert": ("ladder.convert.converter", []),
    "ladder-eval": ("ladder.gates.cli", []),
    "ladder-heal": ("ladder.adapt.sft", []),
    "ladder-publish": ("ladder.publish.cli", []),
    "ladder-fetch-smollm2": ("ladder.convert.smollm2", []),
    "ladder.serve bench": ("ladder.serve.__main__", ["bench"]),
    "ladder.adapt.teacher_answers": ("ladder.adapt.teacher_answers", []),
    "ladder.convert.chat": ("ladder.convert.chat", []),
}
ALIASES = {"adapt/sft.py": "ladder-heal"}  # the script file of the console script (accelerate launch, torchrun)
SEPARATORS = {"&&", "||", "|", ";"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@cache
def help_text(command: str) -> str:
    """The command's --help, as the shell prints it (in this process: one import of torch for all of them)."""
    module_name, arguments = COMMANDS[command]
    module = importlib.import_module(module_name)
    output = io.StringIO()
    # argparse names a parser without a prog after sys.argv[0], and wraps to the terminal's width: fixed here.
    with patch.object(sys, "argv", [Path(module.__file__).name]), patch.dict(os.environ, {"COLUMNS": "100"}):
        with redirect_stdout(output), suppress(SystemExit):
            module.main([*arguments, "--help"])
    return output.getvalue().replace(str(cache_root()), "~/.cache/ladder")  # as it is by default, on any machine


def shell_lines(page: Path) -> list[str]:
    """The command lines a page shows: in shell code blocks (continuations joined, `$ ` prompts dropped) and in
    inline code that begins with a command of ours."""
    text = page.read_text()
    lines = []
    for language, body in FENCE.findall(text):
        if language.strip() in ("", "bash", "sh", "console"):
            lines += [line.removeprefix("$ ") for line in body.replace("\\\n", " ").splitlines()]
    prose = FENCE.sub("", text)
    lines += re.findall(r"`((?:ladder-|python -m ladder|accelerate launch|torchrun|python benchmarks/|make )[^`]*)`", prose)
    return lines


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """(command, its options) for each command of ours on a shell line."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return []
    found = []
    for index, token in enumerate(tokens):
        name = ALIASES.get(token, token.rsplit("/", 1)[-1] if "bin/" in token else token)
        after = tokens[index + 1 :]
        if name in COMMANDS:
            found.append((name, after))
        elif token == "-m" and after and after[0].startswith("ladder."):
            found.append((" ".join(after[:2]) if after[0] == "ladder.serve" else after[0], after[1:]))
        elif re.fullmatch(r"benchmarks/\w+\.py", token):
            found.append((token, after))
    return [(name, options_of(rest)) for name, rest in found]


def options_of(tokens: list[str]) -> list[str]:
    options = []
    for token in tokens:
        if token in SEPARATORS or token.startswith("$("):
            if token in SEPARATORS:
                break
            continue
        token = token.strip("[]")
        if re.fullmatch(r"--[\w-]+(=.*)?", token):
            options.append(token.split("=", 1)[0])
    return options


def check_invocation(name: str, options: list[str]) -> list[str]:
    """What is wrong with a command the docs show; nothing when it is real."""
    if name.startswith("benchmarks/"):
        script = REPO / name
        if not script.is_file():
            return [f"{name}: no such script"]
        source = script.read_text()
        return [f"{name} has no option {option}" for option in options if option != "--help" and f'"{option}"' not in source]
    if name not in COMMANDS:
        return [f"{name}: not one of our commands"]
    known = help_text(name)
    return [f"{name} has no option {option}" for option in options if not re.search(rf"(?<![\w-]){option}(?![\w-])", known)]


def make_targets(line: str) -> list[str]:
    """The targets of a `make` line: the words after `make`, up to its first VARIABLE=value."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    if "make" not in tokens:
        return []
    words = tokens[tokens.index("make") + 1 :]
    return [word for word in words[: next((i for i, w in enumerate(words) if "=" in w), len(words))] if word[0] != "-"]


def test_every_command_and_option_the_docs_show_exists():
    shown = {(page, line) for page in PAGES for line in shell_lines(page)}
    calls = [(page, name, options) for page, line in shown for name, options in invocations(line)]
    assert {name for _, name, _ in calls} >= {"ladder-convert", "ladder-eval", "ladder-heal", "ladder-publish"}
    problems = [f"{page.relative_to(REPO)}: {problem}" for page, name, options in calls
                for problem in check_invocation(name, options)]  # fmt: skip
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.MULTILINE))
    problems += [f"{page.relative_to(REPO)}: make {target}: no such target" for page, line in shown
                 for target in make_targets(line) if target not in targets]  # fmt: skip
    assert not problems, "\n".join(sorted(problems))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for page in [*PAGES, REPO / "CHANGELOG.md"]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                problems.append(f"{page.relative_to(REPO)}: {target} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{page.relative_to(REPO)}: {target}: no heading #{anchor}")
    assert not problems, "\n".join(problems)


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def cli_reference() -> str:
    """docs/cli.md: each command's --help (ladder-heal's own keys; TRL's follow in `ladder-heal --help`)."""
    sections = ["# Command reference", "Generated from each command's `--help` by `python tests/test_docs.py`."]
    for name, command in COMMANDS.items():
        text = help_text(name)
        if name == "ladder-heal":
            text = text.split("TRL's keys")[0] + "TRL's keys (ModelConfig, the dataset mixture, SFTConfig): see ladder-heal --help\n"
        shown = name if name.startswith("ladder-") else f"python -m {name}"
        sections += [f"## `{shown}`", f"```text\n{text.rstrip()}\n```"]
    return "\n\n".join(sections) + "\n"


def test_the_cli_reference_is_the_commands_own_help():
    assert CLI_PAGE.read_text() == cli_reference(), "docs/cli.md is stale: run python tests/test_docs.py"


if __name__ == "__main__":
    CLI_PAGE.write_text(cli_reference())
    print(CLI_PAGE)
