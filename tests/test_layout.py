"""The package's seams: one import name of our own, no import circle, and no stage importing another stage's command."""

import ast
import importlib.metadata
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"ladder": "ladder", "ladder.convert": "convert", "ladder.gates": "gates", "ladder.adapt": "adapt",
            "ladder.publish": "publish", "ladder.serve": "serve"}  # fmt: skip
COMMANDS = {"ladder.convert.converter", "ladder.gates.cli", "ladder.adapt.sft", "ladder.publish.cli", "ladder.serve.__main__"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in (REPO / folder).glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ours that `name` imports (a package's __init__ counts as the package)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{node.module}" if node.module else parent
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {module for module in found if module in known and module != name}


def test_only_our_own_name_is_installed():
    assert importlib.metadata.distribution("ladder").read_text("top_level.txt").split() == ["ladder"]


def test_no_import_circle_and_no_stage_imports_another_stages_command():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    stage = lambda module: module.split(".")[1] if module.count(".") else None  # noqa: E731
    for name, imported in graph.items():
        for command in imported & COMMANDS:
            assert stage(command) == stage(name), f"{name} imports {command}, another stage's command"

    def circle_from(start: str, path: list[str]) -> list[str] | None:
        for module in graph[path[-1]]:
            if module == start:
                return [*path, module]
            if module not in path and (found := circle_from(start, [*path, module])):
                return found
        return None

    for name in graph:
        assert circle_from(name, [name]) is None, circle_from(name, [name])


def test_the_version_is_written_once_and_provenance_names_the_commit():
    import ladder
    from ladder.checkpoint import tool_stamp

    [written] = re.findall(r'^version = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert ladder.__version__ == importlib.metadata.version("ladder") == written
    assert not [path for path in REPO.glob("*/*.py") if f'"{written}"' in path.read_text()]  # no second copy
    stamp = tool_stamp("ladder-test")
    assert stamp["tool_version"] == written and len(stamp["git_commit"]) == 40  # this checkout's HEAD
