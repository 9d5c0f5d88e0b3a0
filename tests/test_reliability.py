"""Hostile but realistic input and faults, against the commands as users run them.

Exit codes mean one thing each: 0 pass, 1 gate failed, 2 bad input or environment. Bad input is one line on stderr,
never a traceback, and leaves nothing on disk; a killed command leaves nothing that its next run does not clear.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import leftovers, read_json, save_tiny_checkpoint

from ladder.adapt import sft
from ladder.checkpoint import PROVENANCE_FILE
from ladder.convert import converter
from ladder.gates import cli as ladder_eval
from ladder.publish import cli as ladder_publish

REPO = Path(__file__).resolve().parents[1]


def assert_one_line(err: str, *fragments: str) -> None:
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope="module")
def converted(smollm2_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "smollm2-ladder15"
    assert converter.main([str(smollm2_dir), "--layers", "15", "--output", str(output), "--no-eval"]) == 0
    return output


@pytest.fixture
def candidate(converted, tmp_path) -> Path:
    """A private copy of the converted model to break (the shards hardlinked)."""
    copy = tmp_path / "candidate"
    copy.mkdir()
    for file in converted.iterdir():
        (os.link if file.suffix == ".safetensors" else shutil.copyfile)(file, copy / file.name)
    return copy


def tiny_gates(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "suite": {"fidelity": {"chats": 2, "max_length": 128, "top_k": 64, "batch_size": 2}},
        "gates": {"sane": {"kl": {"max": 100.0}}},
    }))  # fmt: skip
    return path


# --- ladder-eval ----------------------------------------------------------------------------------------------------


def break_candidate(candidate: Path, smollm2_dir: Path, how: str) -> list[str]:
    """Breaks the candidate (or what the run reads besides it) as `how` says; returns extra arguments."""
    if how == "bad provenance json":
        (candidate / PROVENANCE_FILE).write_text("{not json")
    elif how == "provenance without source":
        (candidate / PROVENANCE_FILE).write_text(json.dumps({"ladder_layers": [1]}))
    elif how == "pickle-only candidate":
        for shard in candidate.glob("*.safetensors"):
            shard.unlink()
        (candidate / "model.safetensors.index.json").unlink()
        torch.save({"w": torch.zeros(1)}, candidate / "pytorch_model.bin")
    elif how == "reference tokenizer broken":
        reference = candidate.parent / "reference"
        shutil.copytree(smollm2_dir, reference, copy_function=os.link)
        (reference / "tokenizer.json").unlink()
        (reference / "tokenizer.json").write_text("{broken")
        return ["--reference", str(reference)]
    elif how == "gates file is a directory":
        return ["--gates-file", str(candidate.parent)]
    elif how == "gates file not utf-8":
        (candidate.parent / "gates.yaml").write_bytes(b"suite: \xff\xfe\n")
        return ["--gates-file", str(candidate.parent / "gates.yaml")]
    elif how == "gates file chats above the data":
        (candidate.parent / "gates.yaml").write_text("suite: {fidelity: {chats: 501}}\ngates: {sane: {}}")
        return ["--gates-file", str(candidate.parent / "gates.yaml")]
    return []


@pytest.mark.parametrize(
    "how, args, message",
    [("bad provenance json", [], "ladder_provenance.json is not valid JSON"),
     ("provenance without source", [], "names no source"),
     ("pickle-only candidate", ["--reference", "SMOLLM2"], "refuses to unpickle"),
     ("reference tokenizer broken", [], "the reference's tokenizer"),
     ("gates file is a directory", [], "is a directory, not a YAML file"),
     ("gates file not utf-8", [], "is not UTF-8 text"),
     ("gates file chats above the data", [], "chats: Input should be less than or equal to 500"),
     ("device foo", ["--device", "foo", "--reference", "SMOLLM2"], "--device 'foo' is not a device"),
     ("device cuda", ["--device", "cuda", "--reference", "SMOLLM2"], "no usable CUDA device")],
)  # fmt: skip
def test_ladder_eval_bad_input(candidate, smollm2_dir, tmp_path, how, args, message, capsys):
    if how == "device cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = break_candidate(candidate, smollm2_dir, how)
    args = [a.replace("SMOLLM2", str(smollm2_dir)) for a in args]
    gates = ["--gate", "sane", "--gates-file", str(tiny_gates(tmp_path / "tiny.yaml"))]  # a later --gates-file wins
    assert ladder_eval.main([str(candidate), *gates, *args, *extra]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "ladder-eval: error: ", message)
    assert not list(candidate.glob("ladder_gate_*"))


def test_a_corrupt_reference_cache_is_measured_again(candidate, smollm2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LADDER_CACHE", str(tmp_path / "cache"))
    gates = tiny_gates(tmp_path / "gates.yaml")
    args = [str(candidate), "--gate", "sane", "--gates-file", str(gates)]
    assert ladder_eval.main(args) == 0
    [cached] = (tmp_path / "cache" / "gates").glob("reference-*.pt")
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    first = read_json(candidate / "ladder_gate_sane.json")["rows"]
    capsys.readouterr()
    assert ladder_eval.main(args) == 0
    assert "unreadable" in capsys.readouterr().out
    assert read_json(candidate / "ladder_gate_sane.json")["rows"] == first


# --- ladder-convert -------------------------------------------------------------------------------------------------


def test_a_gate_that_crashes_keeps_the_checkpoint_and_exits_2(smollm2_dir, tmp_path, monkeypatch, capsys):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")

    monkeypatch.setattr(converter, "run_gate", crash)
    output = tmp_path / "out"
    assert converter.main([str(smollm2_dir), "--layers", "2", "--output", str(output)]) == 2
    err = capsys.readouterr().err  # after the conversion's own progress lines
    assert_one_line(err[err.index("ladder-convert: "):], "gate could not run: CUDA out of memory. Tried to allocate")
    assert read_json(output / "config.json")["ladder_layers"] == [28, 29] and not leftovers(tmp_path)


# --- adapt/sft.py ---------------------------------------------------------------------------------------------------


def recipe(path: Path, model: Path, **overrides) -> Path:
    data = REPO / "gates" / "data" / "alpaca_5000.json"
    fields = {"model_name_or_path": str(model), "datasets": [{"path": "json", "data_files": str(data)}],
              "dataset_template": "alpaca", "output_dir": str(path.parent / "run"), "use_cpu": True} | overrides  # fmt: skip
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.parametrize(
    "how, message",
    [("yaml syntax", "is not valid YAML"),
     ("bad model config", "config.json is not valid JSON"),
     ("bad provenance", "ladder_provenance.json is not a JSON object"),
     ("dry run, plain llama", "is not a ladder checkpoint"),
     ("dry run, missing dataset", "dataset file /nowhere.json does not exist")],
)  # fmt: skip
def test_adapt_bad_input(candidate, smollm2_dir, tmp_path, how, message, capsys):
    path = recipe(tmp_path / "r.yaml", candidate)
    if how == "yaml syntax":
        path.write_text(path.read_text() + "learning_rate: [1e-4,\n")
    elif how == "bad model config":
        (candidate / "config.json").write_text("{")
    elif how == "bad provenance":
        (candidate / PROVENANCE_FILE).write_text("[]")
    elif how == "dry run, plain llama":
        path = recipe(path, smollm2_dir, dry_run=True)
    elif how == "dry run, missing dataset":
        path = recipe(path, candidate, dry_run=True, datasets=[{"path": "json", "data_files": "/nowhere.json"}])
    with pytest.raises(SystemExit) as exit_info:
        sft.main([str(path)])
    assert exit_info.value.code == 2
    assert_one_line(capsys.readouterr().err, "ladder-heal: error: ", message)  # and no warning before it
    assert not (tmp_path / "run").exists()


# --- kills mid-write ------------------------------------------------------------------------------------------------

# The command, with its shards linked slowly: the test kills it while the output is being written.
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import ladder.checkpoint
    import {module} as command
    link = ladder.checkpoint.link_or_copy
    def link_slowly(source, target):
        print("writing", flush=True)
        time.sleep(60)
        return link(source, target)
    # Where each command looks it up: ladder-publish imports it, ladder-convert calls it through write_shard.
    for module in (ladder.checkpoint, command):
        if hasattr(module, "link_or_copy"):
            module.link_or_copy = link_slowly
    sys.exit(command.main(sys.argv[1:]))
""")


def run_killed(module: str, args: list[str], sig: signal.Signals) -> int:
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(module=module), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert process.stdout.readline() == "writing\n", process.stderr.read()
    process.send_signal(sig)
    return process.wait(timeout=60)


COMMANDS = {  # the command module, and its arguments for (the original, a converted model, the output)
    "ladder-convert": ("ladder.convert.converter", lambda orig, conv, out: [orig, "--layers", "2", "--output", out, "--no-eval"]),
    "ladder-publish": ("ladder.publish.cli", lambda orig, conv, out: [conv, "--export", out, "--force"]),
}  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_mid_write_leaves_nothing(command, sig, smollm2_dir, candidate, tmp_path):
    module, arguments = COMMANDS[command]
    output = tmp_path / "out"
    assert run_killed(module, arguments(str(smollm2_dir), str(candidate), str(output)), sig) == 130
    assert not output.exists() and not leftovers(tmp_path) and not leftovers(candidate.parent)


@pytest.mark.parametrize("command", COMMANDS)
def test_killed_mid_write_the_next_run_clears_what_was_left(command, smollm2_dir, candidate, tmp_path):
    module, arguments = COMMANDS[command]
    output = tmp_path / "out"
    args = arguments(str(smollm2_dir), str(candidate), str(output))
    assert run_killed(module, args, signal.SIGKILL) == -signal.SIGKILL
    assert leftovers(tmp_path) and not output.exists()  # SIGKILL cannot be caught
    script = f"import sys, {module} as command; sys.exit(command.main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (output / "config.json").is_file() and not leftovers(tmp_path)


def test_stale_staging_of_a_live_process_or_another_tool_is_kept(tmp_path):
    """Only what a dead run of ours left is cleared: a running conversion's staging, and files of the user's, stay."""
    from ladder.checkpoint import owner_tag, staged

    live = tmp_path / f".out.{owner_tag()}.abc123.partial"  # this very process: alive
    live.mkdir()
    users = tmp_path / ".out.backup.partial"
    users.mkdir()
    with staged(tmp_path / "out") as staging:
        save_tiny_checkpoint(staging)
    assert live.is_dir() and users.is_dir() and (tmp_path / "out" / "config.json").is_file()
