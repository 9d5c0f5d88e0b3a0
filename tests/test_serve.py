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
from conftest import REPO, ladder_twin, save_tiny_checkpoint, tiny_llama
from ladder.convert.converter import convert as convert_checkpoint
from ladder.serve.__main__ import free_port, main as serve_main
from ladder.serve.model import SHAPES, ServeError, greedy_steps, iso_split, load_config, load_model

NEW_TOKENS = 6


def tp_rank(rank: int, tp: int, port: int, checkpoint: str, ids: torch.Tensor, result: str, schedules) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    model = load_model(checkpoint, load_config(checkpoint), rank, tp, torch.float32, torch.device("cpu"))
    all_reduce, reduced = model.all_reduce, []
    model.all_reduce = lambda x: reduced.append(x.shape[1]) or all_reduce(x)  # each all-reduce's number of tokens
    runs = {}
    for iso in schedules:
        reduced.clear()
        tokens, logits = zip(*greedy_steps(model, ids, NEW_TOKENS, iso=iso))
        written = ids.shape[1] + NEW_TOKENS - 1  # the last new token is never fed back
        cache = torch.stack([torch.stack([c.keys[:, :, :written], c.values[:, :, :written]]) for c in model.caches])
        runs[iso] = dict(tokens=torch.stack(tokens, 1), logits=torch.stack(logits, 1), cache=cache, reduced=reduced[:])
    torch.save(runs, f"{result}.{rank}")
    dist.destroy_process_group()


def tensor_parallel_generation(checkpoint, ids, tp, tmp_path, schedules=(False,)):
    """Each rank's runs, by schedule (ISO prefill or not): new tokens, their logits, the rank's KV cache, and how
    many tokens each all-reduce summed."""
    result = str(tmp_path / "tp_result.pt")
    mp.spawn(tp_rank, args=(tp, free_port(), str(checkpoint), ids, result, schedules), nprocs=tp)
    return [torch.load(f"{result}.{rank}") for rank in range(tp)]


@torch.no_grad()
def hf_generation(checkpoint, ids):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1)


def assert_same_generation(checkpoint, ids, tp, tmp_path):
    """The same as transformers, and the same again with ISO's two-chunk prefill."""
    ranks = tensor_parallel_generation(checkpoint, ids, tp, tmp_path, schedules=(False, True))
    expected_tokens, expected_logits = hf_generation(checkpoint, ids)
    assert torch.equal(ranks[0][False]["tokens"], expected_tokens)
    # The ranks sum their partial outputs in another order than one matmul does: equal up to float rounding.
    logits = ranks[0][False]["logits"]
    assert (logits - expected_logits).abs().max() <= 1e-4 * expected_logits.abs().max()
    for rank in ranks:
        assert_iso_prefill_is_plain_prefill(rank[False], rank[True], load_config(str(checkpoint)), ids.shape[1])


def assert_iso_prefill_is_plain_prefill(plain, iso, config, prompt_len):
    """The same tokens, logits and KV cache up to float rounding; ISO's all-reduces are per chunk, twice as many."""
    assert torch.equal(iso["tokens"], plain["tokens"])
    assert (iso["logits"] - plain["logits"]).abs().max() <= 1e-5 * plain["logits"].abs().max()
    assert (iso["cache"] - plain["cache"]).abs().max() <= 1e-5 * plain["cache"].abs().max()
    first = iso_split(config, 0, prompt_len)
    prefill = 2 * config.num_hidden_layers  # all-reduces of the unsplit prefill; the decode steps' follow
    assert plain["reduced"][:prefill] == [prompt_len] * prefill
    assert sorted(iso["reduced"][: 2 * prefill]) == sorted([first, prompt_len - first] * prefill)
    assert iso["reduced"][2 * prefill :] == plain["reduced"][prefill:] == [1] * prefill * (NEW_TOKENS - 1)


@pytest.mark.slow
def test_smollm2_ladder15_at_tp3_matches_hf_with_and_without_iso(smollm2_dir, smollm2_tokenizer, tmp_path):
    checkpoint = convert_checkpoint(str(smollm2_dir), "15", tmp_path / "smollm2-ladder15")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert_same_generation(checkpoint, ids["input_ids"], tp=3, tmp_path=tmp_path)


# Ladder layers on both sides of standard ones, so both boundaries are crossed; [] is a plain Llama checkpoint.
@pytest.mark.parametrize("ladder_layers", [[1, 3, 4], []])
def test_tiny_model_at_tp2_matches_hf_with_and_without_iso(ladder_layers, tmp_path):
    stock = tiny_llama(seed=3)
    model = ladder_twin(stock, ladder_layers) if ladder_layers else stock
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", model)
    ids = torch.randint(3, stock.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_same_generation(checkpoint, ids, tp=2, tmp_path=tmp_path)


@pytest.mark.parametrize("model, length", [("llama-3.1-8b", 2048), ("llama-3.1-8b", 256), ("tiny", 300), ("tiny", 2)])
def test_iso_split_balances_the_chunks_compute(model, length):
    """The first chunk's length is the one whose two chunks' multiply-adds differ least (counted here over the causal
    mask), and it is over half: the second chunk's queries read more keys."""
    config = load_config(model, layers=1) if model in SHAPES else tiny_llama().config
    q = config.hidden_size  # query features of all heads (head_dim * heads)
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    per_token = config.hidden_size * (2 * q + 2 * kv + 3 * config.intermediate_size)
    keys_read = torch.ones(length, length, dtype=torch.float64).tril().sum(1).cumsum(0)  # by the first n queries
    total = length * per_token + 2 * q * keys_read[-1]

    def imbalance(first):
        return abs(total - 2 * (first * per_token + 2 * q * keys_read[first - 1]))

    first = iso_split(config, 0, length)
    assert imbalance(first) == min(imbalance(n) for n in range(1, length))
    assert length / 2 <= first < length


def serve(*args, env=None):
    command = [sys.executable, "-m", "ladder.serve", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_ladder_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), ladder_twin(tiny_llama(), [2, 3, 4, 5]))


def test_bench_prints_every_variant_and_the_ratios(tiny_ladder_checkpoint):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", 2, "--prompt-len", "8,5",
                 "--new-tokens", 4, "--repeats", 1, "--iso")  # fmt: skip
    assert done.returncode == 0, done.stderr
    for prompt in (8, 5):
        row = f"    2 {prompt:>6}  "
        for variant in ("standard", "standard+iso", "ladder", "ladder+iso", "no-comm"):
            assert re.search(f"^{row}{re.escape(variant)} +[0-9.]+ +[0-9.]+$", done.stdout, re.M), done.stdout
        assert f"{row}ladder/standard: prefill x" in done.stdout
        assert f"{row}standard+iso/standard: prefill x" in done.stdout
        first = iso_split(load_config(str(tiny_ladder_checkpoint)), 0, prompt)
        assert f"{row}iso chunks: {first} + {prompt - first} tokens" in done.stdout
    assert "ladder/no-comm" in done.stdout and "ladder+iso/ladder" in done.stdout


# A decode step's profile, or with --iso a whole prefill's.
@pytest.mark.parametrize("iso, step", [([], "decode step"), (["--iso"], "prefill")])
def test_bench_profile_splits_each_ranks_step(iso, step, tiny_ladder_checkpoint, tmp_path):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", 1, "--prompt-len", 4,
                 "--new-tokens", 3, "--repeats", 1, "--profile", 2, "--profile-dir", tmp_path, *iso)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"profile: host ms per {step} (mean of 2)" in done.stdout
    columns = ["step", "wait attn", "wait mlp", "AR launch", "linear", "lm_head", "other", "AR running"]
    assert re.search("variant +rank +" + " +".join(columns), done.stdout), done.stdout
    rows = {tuple(line.split()[:4]): line.split()[4:] for line in done.stdout.splitlines()}
    variants = ["standard", "ladder", "no-comm"] + (["standard+iso", "ladder+iso"] if iso else [])
    for variant in variants:
        for rank in (0, 1):
            ms = dict(zip(columns, map(float, rows["1", "4", variant, str(rank)]), strict=True))
            assert ms["step"] > 0 and ms["other"] >= 0  # the labelled parts fit in the step: nothing counted twice
            waits = ms["wait attn"] + ms["wait mlp"]
            if variant == "no-comm":
                assert waits == ms["AR launch"] == ms["AR running"] == 0
            else:
                assert waits > 0 and ms["AR running"] > 0
                trace = tmp_path / f"batch1-prompt4-{variant}-rank{rank}.json"
                assert "serve/wait_attn_allreduce" in trace.read_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"), reason="network namespaces need root and iproute2")
def test_slow_link_runs_in_namespaces_and_removes_them(tiny_ladder_checkpoint):
    done = serve("bench", "--model", tiny_ladder_checkpoint, "--tp", 2, "--batch", 1, "--prompt-len", 4,
                 "--new-tokens", 3, "--repeats", 1, "--slow-link", "--link-rate", "100mbit")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "slow link 100mbit" in done.stdout and "    1      4  ladder/standard" in done.stdout
    assert "serve" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["bench", "--model", "/no/such/checkpoint", "--tp", 2], {}, "not a checkpoint directory"),
        (["bench", "--model", "CHECKPOINT", "--tp", 3], {}, "tensor-parallel size 3 does not divide the 4 query heads"),
        (["bench", "--model", "CHECKPOINT", "--tp", 4], {"RANK": "0", "WORLD_SIZE": "2"}, "world size mismatch"),
        (["bench", "--model", "CHECKPOINT", "--profile-dir", "traces"], {}, "--profile-dir needs --profile"),
        (["bench", "--model", "CHECKPOINT", "--iso", "--prompt-len", "8,1"], {}, "every --prompt-len must be at least 2"),
        (["bench", "--model", "CHECKPOINT", "--batch", "1,x"], {}, "--batch 1,x: give comma-separated positive integers"),
    ],
)
def test_bad_input_is_one_line(args, env, message, tiny_ladder_checkpoint, monkeypatch, capsys):
    """In this process: each is found before any rank starts (the tests above run the command itself)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert serve_main([str(tiny_ladder_checkpoint) if arg == "CHECKPOINT" else str(arg) for arg in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ladder.serve: error: ") and message in err
    assert err.count("\n") == 1, err


def test_repeated_ladder_layers_are_refused(tiny_ladder_checkpoint, tmp_path):
    """transformers would keep one of each: the model served would not be the one the config describes."""
    copy = shutil.copytree(tiny_ladder_checkpoint, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text()) | {"ladder_layers": [2, 2, 3]}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServeError, match=r"ladder_layers \[2, 2, 3\] are not distinct layer indices from 0 to 5"):
        load_config(str(copy))


def test_gpu_overlap_benchmark_runs_and_its_async_wiring_is_the_ladder(monkeypatch):
    """benchmarks/gpu_overlap.py (one GPU; here its tiny CPU run, so it does not rot): the asynchronous steps compute
    the synchronous ladder wiring exactly, which is not the standard one, and an early read fails its check."""
    script = REPO / "benchmarks" / "gpu_overlap.py"
    run = subprocess.run([sys.executable, script, "--shapes", "tiny", "--layers", "3", "--batch", "2", "--repeats", "2",
                          "--microseconds", "5", "--device", "cpu"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| 5 | " in run.stdout and "async outputs equal the synchronous ones" in run.stdout
    monkeypatch.syspath_prepend(str(script.parent))
    import gpu_overlap

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(gpu_overlap.ShardLayer(gpu_overlap.SHAPES["tiny"], 2, 8) for _ in range(3))
    comm, x = gpu_overlap.EmulatedAllReduce(torch.device("cpu"), 0), torch.randn(2, 64)
    with torch.no_grad():
        ladder_wiring = gpu_overlap.ladder_sync_step(layers, comm, x)
        assert torch.equal(gpu_overlap.ladder_async_step(layers, comm, x), ladder_wiring)
        assert not torch.allclose(gpu_overlap.standard_step(layers, comm, x), ladder_wiring)
    # A sum read before it lands is NaN (on a GPU), which the benchmark's check refuses.
    early = ladder_wiring.clone()
    early[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="relative difference nan"):
        gpu_overlap.check_equal(early, ladder_wiring, "a test")
