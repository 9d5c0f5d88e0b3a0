"""Tensor-parallel serving: the same tokens and logits as the single-process HF model, and one-line bad-input errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM

import ladder  # noqa: F401  (registers the ladder model with the Auto classes)
from conftest import ladder_twin, save_tiny_checkpoint, tiny_llama
from ladder.convert.converter import convert as convert_checkpoint
from ladder.serve.__main__ import free_port
from ladder.serve.model import ServeError, greedy_steps, load_config, load_model

NEW_TOKENS = 6


def tp_rank(rank: int, tp: int, port: int, checkpoint: str, ids: torch.Tensor, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    model = load_model(checkpoint, load_config(checkpoint), rank, tp, torch.float32, torch.device("cpu"))
    tokens, logits = zip(*greedy_steps(model, ids, NEW_TOKENS))
    if rank == 0:
        torch.save((torch.stack(tokens, 1), torch.stack(logits, 1)), result)
    dist.destroy_process_group()


def tensor_parallel_generation(checkpoint, ids, tp, tmp_path):
    result = str(tmp_path / "tp_result.pt")
    mp.spawn(tp_rank, args=(tp, free_port(), str(checkpoint), ids, result), nprocs=tp)
    return torch.load(result)


@torch.no_grad()
def hf_generation(checkpoint, ids):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def assert_same_generation(checkpoint, ids, tp, tmp_path):
    tokens, logits = tensor_parallel_generation(checkpoint, ids, tp, tmp_path)
    expected_tokens, expected_logits = hf_generation(checkpoint, ids)
    assert torch.equal(tokens, expected_tokens)
    # The ranks sum their partial outputs in another order than one matmul does: equal up to float rounding.
    assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()


@pytest.mark.slow
def test_smollm2_ladder15_at_tp3_matches_hf(smollm2_dir, smollm2_tokenizer, tmp_path):
    checkpoint = convert_checkpoint(str(smollm2_dir), "15", tmp_path / "smollm2-ladder15")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert_same_generation(checkpoint, ids["input_ids"], tp=3, tmp_path=tmp_path)


# Ladder layers on both sides of standard ones, so both boundaries are crossed; [] is a plain Llama checkpoint.
@pytest.mark.parametrize("ladder_layers", [[1, 3, 4], []])
def test_tiny_model_at_tp2_matches_hf(ladder_layers, tmp_path):
    stock = tiny_llama(seed=3)
    model = ladder_twin(stock, ladder_layers) if ladder_layers else stock
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", model)
    ids = torch.randint(3, stock.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_same_generation(checkpoint, ids, tp=2, tmp_path=tmp_path)


def serve(*args, env=None):
    command = [sys.executable, "-m", "ladder.serve", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_ladder_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), ladder_twin(tiny_llama(), [2, 3, 4, 5]))


def test_bench_prints_every_variant_and_the_ratios(tiny_ladder_checkpoint):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", "1,2", "--prompt-len", 8,
                 "--new-tokens", 4, "--repeats", 1)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for batch in (1, 2):
        for variant in ("standard", "ladder", "no-comm"):
            assert f"{batch}  {variant}" in done.stdout
        assert f"{batch}  ladder/standard: prefill x" in done.stdout
    assert "ladder/no-comm" in done.stdout


def test_bench_profile_splits_each_ranks_decode_step(tiny_ladder_checkpoint, tmp_path):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", 1, "--prompt-len", 4,
                 "--new-tokens", 3, "--repeats", 1, "--profile", 2, "--profile-dir", tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    columns = ["step", "wait attn", "wait mlp", "AR launch", "linear", "lm_head", "other", "AR running"]
    assert re.search("variant +rank +" + " +".join(columns), done.stdout), done.stdout
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in done.stdout.splitlines()}
    for variant in ("standard", "ladder", "no-comm"):
        for rank in (0, 1):
            ms = dict(zip(columns, map(float, rows["1", variant, str(rank)]), strict=True))
            assert ms["step"] > 0 and ms["other"] >= 0  # the labelled parts fit in the step: nothing counted twice
            waits = ms["wait attn"] + ms["wait mlp"]
            if variant == "no-comm":
                assert waits == ms["AR launch"] == ms["AR running"] == 0
            else:
                assert waits > 0 and ms["AR running"] > 0
                assert "serve/wait_attn_allreduce" in (tmp_path / f"batch1-{variant}-rank{rank}.json").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"), reason="network namespaces need root and iproute2")
def test_slow_link_runs_in_namespaces_and_removes_them(tiny_ladder_checkpoint):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", 1, "--prompt-len", 4,
                 "--new-tokens", 3, "--repeats", 1, "--slow-link", "--link-rate", "100mbit")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "slow link 100mbit" in done.stdout and "1  ladder/standard" in done.stdout
    assert "serve" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["bench", "--model", "/no/such/checkpoint", "--tp", 2], {}, "not a checkpoint directory"),
        (["bench", "--model", "CHECKPOINT", "--tp", 3], {}, "tensor-parallel size 3 does not divide the 4 query heads"),
        (["bench", "--model", "CHECKPOINT", "--tp", 4], {"RANK": "0", "WORLD_SIZE": "2"}, "world size mismatch"),
        (["bench", "--model", "CHECKPOINT", "--profile-dir", "traces"], {}, "--profile-dir needs --profile"),
    ],
)
def test_bad_input_is_one_line(args, env, message, tiny_ladder_checkpoint):
    done = serve(*[tiny_ladder_checkpoint if arg == "CHECKPOINT" else arg for arg in args], env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("ladder.serve: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_repeated_ladder_layers_are_refused(tiny_ladder_checkpoint, tmp_path):
    """transformers would keep one of each: the model served would not be the one the config describes."""
    copy = shutil.copytree(tiny_ladder_checkpoint, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text()) | {"ladder_layers": [2, 2, 3]}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServeError, match=r"ladder_layers \[2, 2, 3\] are not distinct layer indices from 0 to 5"):
        load_config(str(copy))
