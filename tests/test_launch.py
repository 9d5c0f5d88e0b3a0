"""The 8B launch path on 2 CPU processes (gloo): `accelerate launch` with the launch configs the 8B recipe is meant for
(recipes/accelerate/fsdp.yaml, zero3.yaml), on a tiny ladder model with every training feature at once: distillation
from the original, the trunk frozen, LoRA, layer-wise alignment. A run writes sharded checkpoints, survives the SIGKILL
of one rank and resumes with the global token count of an uninterrupted run; its final model is a plain safetensors
checkpoint whose logits are those of its last sharded checkpoint assembled in one process; the after gate runs once."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO, SFT, read_json, tiny_gates, wait_for_a_checkpoint, write_recipe
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from transformers import AutoModelForCausalLM

from ladder.adapt.sft import last_complete_checkpoint
from ladder.convert.converter import convert

LORA = {"lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj", "down_proj"]}
LADDER_LAYERS = [3, 4, 5]  # tiny_pair's


@pytest.fixture(params=["fsdp", "zero3"])
def launch_config(request) -> Path:
    if request.param == "zero3":
        pytest.importorskip("deepspeed", reason="ZeRO-3 needs `pip install -e .[deepspeed]`")
    return REPO / "recipes" / "accelerate" / f"{request.param}.yaml"


def launch_command(config: Path, recipe: Path, *overrides: str) -> list[str]:
    with socket.socket() as probe:  # a free port: a killed run's may still be closing
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The configs' bf16 is slow on CPU and would make the logits comparison approximate.
    accelerate = Path(sys.executable).parent / "accelerate"
    return [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2", "--mixed_precision", "no",
            "--main_process_port", str(port), str(SFT), str(recipe), *overrides]  # fmt: skip


def launch(config: Path, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(config, recipe, *overrides), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    [process] = [child for child in psutil.Process(launcher.pid).children(recursive=True)
                 if child.environ().get("RANK") == str(rank) and str(SFT) in child.cmdline()]  # fmt: skip
    process.send_signal(signal.SIGKILL)


def sharded_checkpoint_files(checkpoint: Path) -> list[str]:
    """The weight files each rank wrote: FSDP's distributed checkpoint, or ZeRO-3's partitions."""
    files = [*checkpoint.glob("pytorch_model_fsdp_0/*.distcp"), *checkpoint.glob("global_step*/*model_states.pt")]
    return sorted(file.name for file in files)


def checkpoint_weights(checkpoint: Path) -> dict:
    """The trained weights of a checkpoint (LoRA's alone with LoRA), assembled in this one process."""
    shards = checkpoint / "pytorch_model_fsdp_0"
    if shards.is_dir():
        dcp_to_torch_save(shards, checkpoint / "consolidated.pt")
        return torch.load(checkpoint / "consolidated.pt")["model"]
    return load_file(checkpoint / "adapter_model.safetensors")  # ZeRO-3 gathers it (zero3_save_16bit_model)


def assert_final_is_the_last_checkpoint(converted: Path, run: Path) -> None:
    final = run / "final"
    assert [file.name for file in final.glob("*.safetensors")] == ["model.safetensors"]
    assert not any("lora" in name for name in load_file(final / "model.safetensors"))
    weights = checkpoint_weights(Path(last_complete_checkpoint(str(run))))
    expected = AutoModelForCausalLM.from_pretrained(converted)
    if any("lora_" in name for name in weights):
        lora = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], target_modules=LORA["lora_target_modules"],
                          layers_to_transform=LADDER_LAYERS)  # fmt: skip
        expected = get_peft_model(expected, lora)
        set_peft_model_state_dict(expected, weights)
    else:
        expected.load_state_dict(weights)
    ids = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(converted)(ids).logits
        wanted, got = expected(ids).logits, AutoModelForCausalLM.from_pretrained(final)(ids).logits
    assert not torch.allclose(wanted, before, atol=1e-4)  # training moved the model
    torch.testing.assert_close(got, wanted, atol=1e-5, rtol=1e-5)


def method(tmp_path: Path) -> dict:
    gates = tiny_gates(tmp_path / "gates.yaml")
    return dict(max_train_tokens=2000, train_layers="ladder", distill_alpha=0.5, align_tokens=600, use_peft=True,
                activation_checkpointing=True, gates_file=str(gates), gate_after="sane", **LORA)  # fmt: skip


def assert_one_run_of_two_processes(result: subprocess.CompletedProcess, run: Path) -> None:
    assert "x 2 process(es)" in result.stdout
    assert result.stdout.count("measuring the candidate") == 1  # the after gate, on the first process only
    assert read_json(run / "final" / "ladder_gate_sane.json")["passed"]
    checkpoint = Path(last_complete_checkpoint(str(run)))
    assert len(sharded_checkpoint_files(checkpoint)) == 2, list(checkpoint.rglob("*"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_pair, tmp_path_factory) -> int:
    """The global token count of a run under FSDP that nobody interrupts: what every resumed run must end with (both
    launchers give each process the same rows)."""
    _, converted = tiny_pair
    work = tmp_path_factory.mktemp("straight")
    result = launch(REPO / "recipes/accelerate/fsdp.yaml", write_recipe(work / "r.yaml", converted, work / "run", **method(work)))
    assert_one_run_of_two_processes(result, work / "run")
    assert_final_is_the_last_checkpoint(converted, work / "run")
    return read_json(work / "run" / "final" / "ladder_provenance.json")["adaptation"]["tokens"]


def test_two_cpu_processes_shard_resume_after_a_killed_rank_and_save_a_plain_model(tiny_pair, tmp_path, launch_config,
                                                                                   uninterrupted):  # fmt: skip
    _, converted = tiny_pair
    recipe = write_recipe(tmp_path / "killed.yaml", converted, tmp_path / "killed", **method(tmp_path))
    launcher = subprocess.Popen(launch_command(launch_config, recipe), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for_a_checkpoint(tmp_path / "killed")
        kill_rank(launcher, 1)
        assert launcher.wait(timeout=120) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # whatever the launcher left
    assert not (tmp_path / "killed" / "final").exists(), "killed too late to test resuming"
    resumed = launch(launch_config, recipe)
    assert "resuming from" in resumed.stdout
    assert_one_run_of_two_processes(resumed, tmp_path / "killed")
    assert read_json(tmp_path / "killed" / "final" / "ladder_provenance.json")["adaptation"]["tokens"] == uninterrupted
    assert_final_is_the_last_checkpoint(converted, tmp_path / "killed")


@pytest.mark.slow
def test_the_smollm2_recipe_under_fsdp(smollm2_dir, tmp_path):
    """The shipped recipe (KL-only distillation into every layer, sdpa_packed, tied embeddings)
    on real weights, shortened."""
    converted = convert(str(smollm2_dir), "15", tmp_path / "smollm2-ladder15")
    gates = tiny_gates(tmp_path / "gates.yaml")
    overrides = {"model_name_or_path": converted, "output_dir": tmp_path / "run", "max_train_tokens": 600,
                 "max_length": 128, "per_device_train_batch_size": 2, "save_steps": 1000, "gates_file": gates,
                 "gate_after": "sane", "report_to": "none"}  # fmt: skip
    arguments = [str(item) for key, value in overrides.items() for item in (f"--{key}", value)]
    result = launch(REPO / "recipes/accelerate/fsdp.yaml", REPO / "recipes/smollm2-135m.yaml", *arguments)
    assert "x 2 process(es)" in result.stdout and result.stdout.count("measuring the candidate") == 1
    assert read_json(tmp_path / "run" / "final" / "ladder_provenance.json")["adaptation"]["tokens"] >= 600
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.tie_word_embeddings
    assert_final_is_the_last_checkpoint(converted, tmp_path / "run")
