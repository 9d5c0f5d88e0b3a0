"""Hostile checkpoints, reports, recipes and data against the commands as users run them, one row per case.

Each row breaks a private copy of a tiny lineage (an original, its conversion with a passing after_adapt report) and
runs one command. Every row checks the exit code and the one-line message, that the user's files are byte-identical
afterwards, and that nothing outside the checkpoints (a secret in the environment, /etc/passwd) reached an output.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from conftest import leftovers, read_json, save_tiny_checkpoint, tiny_llama, tiny_tokenizer, write_gate_report, write_recipe
from safetensors.torch import save_file

from ladder.adapt import sft
from ladder.checkpoint import PROVENANCE_FILE, output_lock
from ladder.convert import converter
from ladder.convert.converter import convert
from ladder.gates import cli as ladder_eval
from ladder.publish import cli as ladder_publish

SECRET = "hf_secret_token_never_to_be_copied"
COMMANDS = {"ladder-convert": converter.main, "ladder-publish": ladder_publish.main, "ladder-eval": ladder_eval.main}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> SimpleNamespace:
    """A tiny original with a chat tokenizer and a license, and its conversion with a passing after_adapt report."""
    work = tmp_path_factory.mktemp("hostile")
    original = save_tiny_checkpoint(work / "original", tiny_llama())
    tiny_tokenizer().save_pretrained(original)
    (original / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    model = convert(str(original), "3", work / "model")
    write_gate_report(model, "after_adapt", kl=0.02)
    return SimpleNamespace(original=original, model=model)


@pytest.fixture
def work(lineage, tmp_path, monkeypatch) -> SimpleNamespace:
    """Private copies to break: `source` (an original), `model` (a converted model; provenance naming `source`)."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("LADDER_CACHE", str(tmp_path / "cache"))
    source = Path(shutil.copytree(lineage.original, tmp_path / "source"))
    model = Path(shutil.copytree(lineage.model, tmp_path / "model"))
    provenance = read_json(model / PROVENANCE_FILE) | {"source": str(source)}
    (model / PROVENANCE_FILE).write_text(json.dumps(provenance))
    return SimpleNamespace(tmp=tmp_path, source=source, model=model, out=tmp_path / "out")


# --- what the rows do to the copies ---------------------------------------------------------------------------------


def symlink(path: Path, target: str | Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    content = read_json(path)
    change(content)
    path.write_text(json.dumps(content))


def first_shard(directory: Path) -> Path:
    return sorted(directory.glob("*.safetensors"))[0]


def shard_elsewhere(directory: Path, elsewhere: Path) -> None:
    shard = first_shard(directory)
    shutil.move(shard, elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)


def flip_last_byte(path: Path) -> None:
    """In the tensor data: the header still describes the file."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def tensor_in_two_shards(directory: Path) -> None:
    save_file({"model.norm.weight": torch.ones(64), "extra.bias": torch.zeros(1)}, directory / "extra.safetensors")
    edit_json(directory / "model.safetensors.index.json", lambda index: index["weight_map"].update({"extra.bias": "extra.safetensors"}))


def tensor_missing_from_its_shard(directory: Path) -> None:
    edit_json(directory / "model.safetensors.index.json",
              lambda index: index["weight_map"].update({"model.layers.0.mlp.extra.weight": first_shard(directory).name}))  # fmt: skip


def report_rows(change: Callable[[list], object]) -> Callable[[dict], None]:
    return lambda report: change(report["rows"])


def failing_report_marked_passed(model: Path) -> None:
    write_gate_report(model, "after_adapt", kl=0.9)
    edit_json(model / "ladder_gate_after_adapt.json", lambda report: report.update(passed=True))
    edit_json(model / "ladder_gate_after_adapt.json", report_rows(lambda rows: [row.update(passed=True) for row in rows]))


def another_models_report(model: Path, gate: str = "after_adapt") -> None:
    edit_json(model / f"ladder_gate_{gate}.json",
              lambda report: report["shards_sha256"].update({first_shard(model).name: "0" * 64}))  # fmt: skip


def converted_ancestor_with_another_models_report(w) -> None:
    """The model healed from a converted copy whose after_convert report is about other weights."""
    converted = Path(shutil.copytree(w.model, w.tmp / "converted"))
    write_gate_report(converted, "after_convert", kl=1.6)
    another_models_report(converted, "after_convert")
    edit_json(w.model / PROVENANCE_FILE, lambda provenance: provenance.update(adaptation={"converted_model": str(converted)}))


def broken_data(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def alpaca_rows(*rows: dict) -> bytes:
    return json.dumps(list(rows)).encode()


GOOD_ROW = {"instruction": "Say hi", "input": "", "output": "hi"}


def resume_checkpoint(output_dir: Path, trainer_state: str = "{}", optimizer: bytes | None = None) -> None:
    """A finished checkpoint-2 and a newer checkpoint-4, broken as asked."""
    for step in (2, 4):
        folder = output_dir / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}" if step == 2 else trainer_state)
        torch.save({"step": step}, folder / "optimizer.pt")
    if optimizer is not None:
        (output_dir / "checkpoint-4" / "optimizer.pt").write_bytes(optimizer)


def convert_args(w) -> list[str]:
    return [str(w.source), "--layers", "2", "--output", str(w.out), "--no-eval"]


def publish_args(w, *extra: str) -> list[str]:
    return [str(w.model), "--export", str(w.out), *extra]


def eval_args(w) -> list[str]:
    gates = w.tmp / "gates.yaml"  # no benchmarks: lm-eval's task index takes seconds to build
    gates.write_text("suite: {fidelity: {chats: 2}}\ngates: {after_adapt: {kl: {max: 1.0}}}\n")
    return [str(w.model), "--gate", "after_adapt", "--reference", str(w.source), "--gates-file", str(gates)]


def sft_args(w, **overrides) -> list[str]:
    recipe = write_recipe(w.tmp / "recipe.yaml", w.model, w.tmp / "run", **overrides)
    return [str(recipe)]


def sft_data(w, content: bytes) -> list[str]:
    data = broken_data(w.tmp / "data.json", content)
    return sft_args(w, datasets=[{"path": "json", "data_files": str(data)}])


def gates_file_with_a_slash(w) -> list[str]:
    (w.tmp / "gates.yaml").write_text("suite: {fidelity: {chats: 2}}\ngates: {'../../evil': {kl: {max: 1.0}}}\n")
    return [str(w.model), "--gate", "../../evil", "--gates-file", str(w.tmp / "gates.yaml")]


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def raising_chat_template(directory: Path) -> None:
    (directory / "chat_template.jinja").write_text("{{ raise_exception('this template refuses') }}")


def ladder_layers(value) -> Callable[[SimpleNamespace], None]:
    return lambda w: edit_json(w.model / "config.json", lambda config: config.update(ladder_layers=value))


def evil_tokenizer_code(directory: Path, auto_map: bool) -> None:
    (directory / "tokenizer_evil.py").write_text("import os\nos.system('echo pwned')\n")
    if auto_map:
        edit_json(directory / "tokenizer_config.json",
                  lambda config: config.update(auto_map={"AutoTokenizer": ["tokenizer_evil.EvilTokenizer", None]}))  # fmt: skip


@dataclass
class Case:
    id: str
    command: str
    breaks: Callable[[SimpleNamespace], list[str]]  # breaks the copies, returns the command's arguments
    code: int
    message: str  # in the command's one line on stderr; for exit code 0, in the output's files


CASES = [
    # symlinks and special files: nothing outside the checkpoint reaches an output
    Case("convert: tokenizer.model -> /proc/self/environ", "ladder-convert",
         lambda w: (symlink(w.source / "tokenizer.model", "/proc/self/environ"), convert_args(w))[1], 2,
         "tokenizer.model is a symlink to /proc/"),
    Case("convert: LICENSE -> /etc/passwd", "ladder-convert",
         lambda w: (symlink(w.source / "LICENSE", "/etc/passwd"), convert_args(w))[1], 2, "LICENSE is a symlink to /etc/passwd"),
    Case("convert: a shard -> a file outside", "ladder-convert",
         lambda w: (shard_elsewhere(w.source, w.tmp), convert_args(w))[1], 2, "model-00001-of-00032.safetensors is a symlink to"),
    Case("convert: a side file that is a FIFO", "ladder-convert",
         lambda w: (fifo(w.source / "tokenizer.model"), convert_args(w))[1], 2, "tokenizer.model is not a regular file"),
    Case("convert: a symlink inside the checkpoint is followed", "ladder-convert",
         lambda w: (shutil.move(w.source / "LICENSE", w.source / "LICENSE.txt"), symlink(w.source / "LICENSE", "LICENSE.txt"), convert_args(w))[2],
         0, "Apache License"),
    Case("publish: LICENSE -> /etc/passwd", "ladder-publish",
         lambda w: (symlink(w.model / "LICENSE", "/etc/passwd"), publish_args(w))[1], 2, "LICENSE is a symlink to /etc/passwd"),
    Case("publish: gate report -> /etc/passwd", "ladder-publish",
         lambda w: (symlink(w.model / "ladder_gate_after_adapt.md", "/etc/passwd"), publish_args(w))[1], 2, "is a symlink to /etc/passwd"),
    Case("publish: added_tokens.json -> /proc/self/environ", "ladder-publish",
         lambda w: (symlink(w.model / "added_tokens.json", "/proc/self/environ"), publish_args(w))[1], 2, "is a symlink to /proc/"),
    Case("eval: tokenizer.json -> /etc/passwd", "ladder-eval",
         lambda w: (symlink(w.model / "tokenizer.json", "/etc/passwd"), eval_args(w))[1], 2, "tokenizer.json is a symlink to /etc/passwd"),
    Case("sft: chat_template.jinja -> /etc/passwd", "ladder-heal",
         lambda w: (symlink(w.model / "chat_template.jinja", "/etc/passwd"), sft_args(w))[1], 2, "is a symlink to /etc/passwd"),
    # foreign code
    Case("convert: tokenizer code named by auto_map", "ladder-convert",
         lambda w: (evil_tokenizer_code(w.source, auto_map=True), convert_args(w))[1], 2, "names code to run (auto_map)"),
    Case("convert: tokenizer code alone stays behind", "ladder-convert",
         lambda w: (evil_tokenizer_code(w.source, auto_map=False), convert_args(w))[1], 0, "ladder-convert"),
    Case("publish: tokenizer code named by auto_map", "ladder-publish",
         lambda w: (evil_tokenizer_code(w.model, auto_map=True), publish_args(w))[1], 2, "names code to run (auto_map)"),
    # the publish gate
    Case("publish: a failing report edited to pass", "ladder-publish",
         lambda w: (failing_report_marked_passed(w.model), publish_args(w))[1], 1, "after_adapt gate failed on: kl"),
    Case("publish: a report without rows", "ladder-publish",
         lambda w: (edit_json(w.model / "ladder_gate_after_adapt.json", lambda r: r.update(rows=[])), publish_args(w))[1],
         2, "has no rows"),
    Case("publish: another model's report", "ladder-publish",
         lambda w: (another_models_report(w.model), publish_args(w))[1], 2, "is about other weights"),
    Case("publish: the converted model's report is another model's", "ladder-publish",
         lambda w: (converted_ancestor_with_another_models_report(w), publish_args(w))[1], 2,
         "ladder_gate_after_convert.json is about other weights"),
    Case("publish: a string metric value", "ladder-publish",
         lambda w: (edit_json(w.model / "ladder_gate_after_adapt.json", report_rows(lambda rows: rows[0].update(candidate="0.01"))), publish_args(w))[1],
         2, "is not a gate report (candidate '0.01' of row 'kl' is not a number)"),
    Case("publish: a shard changed after its provenance", "ladder-publish",
         lambda w: (flip_last_byte(first_shard(w.model)), publish_args(w))[1], 2, "is not the shard the provenance records"),
    # ladder_layers
    Case("publish: ladder_layers [99]", "ladder-publish",
         lambda w: (ladder_layers([99])(w), publish_args(w))[1], 2, "ladder_layers [99] are not distinct layer indices from 0 to 5"),
    Case("publish: ladder_layers [4, 4, 4]", "ladder-publish",
         lambda w: (ladder_layers([4, 4, 4])(w), publish_args(w))[1], 2, "ladder_layers [4, 4, 4] are not distinct"),
    Case("publish: ladder_layers [4.5]", "ladder-publish",
         lambda w: (ladder_layers([4.5])(w), publish_args(w))[1], 2, "ladder_layers [4.5] are not distinct"),
    Case("eval: ladder_layers out of range", "ladder-eval",
         lambda w: (ladder_layers([3, 6])(w), eval_args(w))[1], 2, "ladder_layers [3, 6] are not distinct"),
    Case("sft: ladder_layers of strings", "ladder-heal",
         lambda w: (ladder_layers(["3"])(w), sft_args(w))[1], 2, "ladder_layers ['3'] are not distinct"),
    # the shard index against the shards
    Case("convert: weight_map values that are not strings", "ladder-convert",
         lambda w: (edit_json(w.source / "model.safetensors.index.json", lambda i: i["weight_map"].update({"lm_head.weight": 3})), convert_args(w))[1],
         2, "is not a valid safetensors index"),
    Case("convert: an index naming a tensor its shard lacks", "ladder-convert",
         lambda w: (tensor_missing_from_its_shard(w.source), convert_args(w))[1], 2, "the index puts tensor model.layers.0.mlp.extra.weight in"),
    Case("convert: a tensor in two shards", "ladder-convert",
         lambda w: (tensor_in_two_shards(w.source), convert_args(w))[1], 2, "tensor model.norm.weight is in two shards"),
    Case("convert: shapes that contradict config.json", "ladder-convert",
         lambda w: (edit_json(w.source / "config.json", lambda c: c.update(intermediate_size=128)), convert_args(w))[1],
         2, "has shape [112, 64], config.json implies [128, 64]"),
    Case("eval: shapes that contradict config.json", "ladder-eval",
         lambda w: (edit_json(w.model / "config.json", lambda c: c.update(hidden_size=32)), eval_args(w))[1], 2, "config.json implies"),
    # gates, chat templates, tokenizers
    Case("eval: a gate name with a slash", "ladder-eval", gates_file_with_a_slash, 2, "gate name '../../evil' may hold only"),
    Case("eval: a chat template that raises", "ladder-eval",
         lambda w: (raising_chat_template(w.source), eval_args(w))[1], 2, "chat template"),
    Case("sft: a chat template that raises", "ladder-heal",
         lambda w: (raising_chat_template(w.model), sft_args(w))[1], 2, "fails on a two-turn chat: this template refuses"),
    Case("sft: a custom tokenizer class (its code named by auto_map)", "ladder-heal",
         lambda w: (evil_tokenizer_code(w.model, auto_map=True), sft_args(w))[1], 2, "names code to run (auto_map)"),
    # card fields
    Case("publish: --license with a newline", "ladder-publish",
         lambda w: publish_args(w, "--license", "mit\n# pwned"), 2, "is not a license id the Hub knows"),
    Case("publish: --license other without a link", "ladder-publish",
         lambda w: publish_args(w, "--license", "other"), 2, "--license other needs --license-link URL"),
    Case("publish: an export name with a newline", "ladder-publish",
         lambda w: [str(w.model), "--export", str(w.tmp / "out\nx")], 2, "holds control characters"),
    # ladder-heal: output_dir, recipe, data, resume
    Case("sft: output_dir is the model", "ladder-heal",
         lambda w: sft_args(w, output_dir=str(w.model)), 2, "is, contains or lies inside the source"),
    Case("sft: output_dir inside the model", "ladder-heal",
         lambda w: sft_args(w, output_dir=str(w.model / "run")), 2, "is, contains or lies inside the source"),
    Case("sft: output_dir containing the model", "ladder-heal",
         lambda w: sft_args(w, output_dir=str(w.tmp)), 2, "is, contains or lies inside the source"),
    Case("sft: max_train_tokens inf", "ladder-heal",
         lambda w: sft_args(w, max_train_tokens=float("inf")), 2, "max_train_tokens must be a positive number, not inf"),
    Case("sft: an empty data file", "ladder-heal", lambda w: sft_data(w, b""), 2, "datasets: "),
    Case("sft: a data file that is not JSON", "ladder-heal", lambda w: sft_data(w, b"{instruction: hi"), 2, "datasets: "),
    Case("sft: a binary data file", "ladder-heal", lambda w: sft_data(w, bytes(range(256)) * 4), 2, "datasets: "),
    Case("sft: a null instruction", "ladder-heal",
         lambda w: sft_data(w, alpaca_rows(GOOD_ROW, GOOD_ROW | {"instruction": None})), 2, "row 1 has instruction 'None'"),
    Case("sft: a number as output", "ladder-heal",
         lambda w: sft_data(w, alpaca_rows(*[GOOD_ROW | {"output": 7}] * 2)), 2, "row 0 has output '7'"),
    Case("sft: a row missing a field", "ladder-heal",
         lambda w: sft_data(w, alpaca_rows(GOOD_ROW, {"instruction": "x", "input": ""})), 2, "row 1 has output 'None'"),
    Case("sft: a truncated trainer_state.json", "ladder-heal",
         lambda w: (resume_checkpoint(w.tmp / "run", trainer_state='{"global_step": 4, "log_his'), sft_args(w))[1],
         2, "checkpoint-4 is corrupt (trainer_state.json is not a JSON object): move it out of output_dir to resume from checkpoint-2"),
    Case("sft: a truncated optimizer.pt", "ladder-heal",
         lambda w: (resume_checkpoint(w.tmp / "run", optimizer=b"PK\x03\x04truncated"), sft_args(w))[1],
         2, "checkpoint-4 is corrupt (optimizer.pt is truncated or not a torch file)"),
]  # fmt: skip


def run(command: str, args: list[str]) -> int:
    if command != "ladder-heal":
        return COMMANDS[command](args)
    try:
        return sft.main(args)
    except SystemExit as exit_info:
        return exit_info.code


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root`: a symlink's target, a FIFO, or a file's sha256."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            entries[str(path)] = f"-> {os.readlink(path)}"
        elif stat.S_ISFIFO(path.lstat().st_mode):
            entries[str(path)] = "fifo"
        elif path.is_file():
            entries[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_input(case, work, capsys):
    args = case.breaks(work)
    before = snapshot(work.tmp)
    code = run(case.command, args)
    err = capsys.readouterr().err
    mine = [line for line in err.splitlines() if line.startswith(f"{case.command}: ")]
    assert code == case.code, err[-3000:]
    assert "Traceback" not in err and len(mine) == (0 if code == 0 else 1), err[-3000:]
    new = {path: digest for path, digest in snapshot(work.tmp).items() if path not in before}
    assert {path: snapshot(work.tmp).get(path) for path in before} == before  # the user's files, byte-identical
    for path in new:  # nothing from outside a checkpoint reached what the command wrote
        content = Path(path).read_bytes()
        assert SECRET.encode() not in content and b"root:x:0:0" not in content, path
    assert not leftovers(work.tmp) and not list(work.tmp.glob(".*.lock"))
    if code == 0:
        assert not (work.out / "tokenizer_evil.py").exists()
        assert case.message in (work.out / "LICENSE").read_text() or case.message in (work.out / PROVENANCE_FILE).read_text()
    else:
        assert case.message in mine[0], mine[0]
        assert not new, sorted(new)  # a refused run writes nothing


def test_an_unexpected_error_exits_3_with_one_line_and_the_traceback_in_a_log(work, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("something we did not foresee\nsecond line")

    monkeypatch.setattr(converter, "write_checkpoint", crash)
    assert converter.main(convert_args(work)) == 3
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("ladder-convert: internal error: RuntimeError: something we did not foresee (traceback in ")
    [log] = (work.tmp / "cache" / "logs").iterdir()
    assert "Traceback" in log.read_text() and "second line" in log.read_text()
    assert not work.out.exists() and not leftovers(work.tmp)


# --- concurrent runs ------------------------------------------------------------------------------------------------

# ladder-convert, paused after its checks, once it holds the output, until a line arrives on its stdin.
PAUSED = textwrap.dedent("""
    import sys
    import ladder.convert.converter as command
    write = command.write_checkpoint
    def write_when_told(*args, **kwargs):
        print("paused", flush=True)
        sys.stdin.readline()
        return write(*args, **kwargs)
    command.write_checkpoint = write_when_told
    sys.exit(command.main(sys.argv[1:]))
""")


def paused_conversion(args: list[str]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", PAUSED, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline() == "paused\n", process.stderr.read()
    return process


def resume(process: subprocess.Popen) -> tuple[int, str]:
    stdout, stderr = process.communicate("go\n", timeout=120)
    return process.returncode, stderr


def test_a_second_conversion_to_the_same_output_is_refused_at_once(work, capsys):
    first = paused_conversion(convert_args(work))
    assert converter.main(convert_args(work)) == 2
    assert "is being written by another ladder run" in capsys.readouterr().err
    code, err = resume(first)
    assert code == 0, err
    assert read_json(work.out / "config.json")["ladder_layers"] == [4, 5] and not leftovers(work.tmp)


def test_a_folder_made_at_the_output_while_converting_is_left_as_it_is(work):
    first = paused_conversion(convert_args(work))
    work.out.mkdir()
    (work.out / "mine.txt").write_text("the user's")
    code, err = resume(first)
    assert code == 2 and "appeared while this run was writing it: left as it is" in err.strip().splitlines()[-1], err
    assert [p.name for p in work.out.iterdir()] == ["mine.txt"] and (work.out / "mine.txt").read_text() == "the user's"
    assert not leftovers(work.tmp) and not list(work.tmp.glob(".*.lock"))


def test_a_second_export_or_training_run_on_a_held_output_is_refused(work, capsys):
    with output_lock(work.out, "--export"):
        assert ladder_publish.main(publish_args(work)) == 2
        assert "is being written by another ladder run" in capsys.readouterr().err
    run_dir = work.tmp / "run"
    with output_lock(run_dir, "output_dir"):
        assert run("ladder-heal", sft_args(work)) == 2
        assert "output_dir " in capsys.readouterr().err
    assert not work.out.exists() and not run_dir.exists()
