"""vLLM speed of the same model with the standard wiring, the ladder wiring, and the ladder wiring with no
communication (the bound), on vLLM's default compiled path, and the ladder wiring in eager mode, at tensor-parallel
size 2: time to first token and decode tokens/s per batch size, and the ratios, in one run. Random weights (vLLM's
`load_format="dummy"`) with Llama-3.1-8B's layer shapes, as `python -m ladder.serve bench` uses, so the two can be
compared on the same machine.

    .venv-vllm/bin/python benchmarks/vllm_speed.py                  # loopback, CPU-sized defaults (2 cores)
    .venv-vllm/bin/python benchmarks/vllm_speed.py --slow-link      # over a link throttled to 6 Mbit/s each way
    .venv-vllm/bin/python benchmarks/vllm_speed.py --slow-link --ladder-layers 2,3       # the top half ladder
    python benchmarks/vllm_speed.py --tp 8 --layers 32 --ladder-layers $(seq -s, 16 31) --batch 1,8,32 \\
        --prompt-len 1024 --new-tokens 128 --dtype bfloat16         # on 8 GPUs, with the plain `vllm` package

Every variant's all-reduces go through torch.distributed (LADDER_VLLM_ALL_REDUCE=torch, serve/vllm_model.py): on
CPU vLLM would otherwise use shared memory for the standard layers, which no network link slows. `--slow-link` (root,
iproute2) runs everything in a new network namespace whose loopback is throttled with `tc tbf` while a variant is
timed (not while vLLM starts: its start-up runs all-reduces thousands of tokens wide, which would take minutes on the
link); both directions of the ranks' gloo traffic share it, so it gets twice `--link-rate`, like the veth pair of
`serve bench --slow-link`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ladder.serve.model import SHAPES

# name -> (LADDER_VLLM_ALL_REDUCE, enforce_eager, ladder wiring)
VARIANTS = {"standard": ("torch", False, False), "ladder": ("torch", False, True),
            "ladder eager": ("torch", True, True), "no-comm": ("none", False, True)}  # fmt: skip


def write_config(directory: Path, shape: str, layers: int, ladder_layers: list[int]) -> Path:
    directory.mkdir(parents=True)
    config = SHAPES[shape] | {"num_hidden_layers": layers, "ladder_layers": ladder_layers, "model_type": "ladder_llama",
                              "architectures": ["LadderLlamaForCausalLM"], "max_position_embeddings": 4096,
                              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def measure(model: Path, args, batches: list[int], link, enforce_eager: bool) -> dict[int, dict]:
    """Median TTFT (a 1-token generation) and decode tokens/s ((new tokens - 1) x batch over the extra time)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # A small token budget per step: the start-up's profiling run is that wide, and on 2 cores' memory a wide one
    # does not fit beside the weights.
    max_model_len = args.prompt_len + args.new_tokens + 8
    llm = LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=args.tp,
              dtype=args.dtype, enforce_eager=enforce_eager, max_model_len=max_model_len, max_num_seqs=max(batches),
              max_num_batched_tokens=max(256, max_model_len * max(batches)), seed=0)  # fmt: skip

    def seconds(batch: int, new_tokens: int) -> float:
        ids = [[(7 * i + j) % 1000 + 10 for j in range(args.prompt_len)] for i in range(batch)]  # distinct prompts
        prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt in ids]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    results = {}
    with link:
        for batch in batches:
            seconds(batch, 2)  # warm-up
            first = [seconds(batch, 1) for _ in range(args.repeats)]
            whole = [seconds(batch, args.new_tokens) for _ in range(args.repeats)]
            decode = max(statistics.median(whole) - statistics.median(first), 1e-9)
            results[batch] = {"ttft_ms": 1000 * statistics.median(first),
                              "decode_tok_s": (args.new_tokens - 1) * batch / decode}  # fmt: skip
    del llm
    return results


def run_tool(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"vllm_speed.py: error: `{' '.join(command)}` failed: {done.stderr.strip()}")


@contextmanager
def throttled_loopback(rate: str):
    run_tool("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "4kb", "latency", "1s")
    try:
        yield
    finally:
        run_tool("tc", "qdisc", "del", "dev", "lo", "root")


def doubled(rate: str) -> str:
    digits = rate.rstrip("abcdefghijklmnopqrstuvwxyz")
    return f"{2 * float(digits):g}{rate[len(digits):]}"


def print_table(results: dict[str, dict[int, dict]], link: str, args) -> None:
    print(f"\n{link}: TP={args.tp}, {args.layers} layers ({args.ladder_layers} ladder), {args.dtype}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}; compiled unless eager")
    names = " / ".join(VARIANTS)
    print(f"| batch | decode tok/s: {names} | ladder / standard | ladder / no-comm | ladder / ladder eager "
          f"| TTFT ms: {names} |")  # fmt: skip
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    for batch in results["standard"]:
        tok = {name: results[name][batch]["decode_tok_s"] for name in VARIANTS}
        ttft = " / ".join(f"{results[name][batch]['ttft_ms']:.0f}" for name in VARIANTS)
        ratios = [tok["ladder"] / tok[other] for other in ("standard", "no-comm", "ladder eager")]
        print(f"| {batch} | {' / '.join(f'{t:.2f}' for t in tok.values())} | "
              f"{' | '.join(f'{r:.2f}x' for r in ratios)} | {ttft} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=4, help="default: what fits in 24 GiB at TP=2 in fp32")
    parser.add_argument("--ladder-layers", default="all", help="the ladder variants' ladder layers (default: all)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--slow-link", action="store_true", help="throttle the ranks' link (root, iproute2)")
    parser.add_argument("--link-rate", default="6mbit", help="with --slow-link: bandwidth each way (tc units)")
    parser.add_argument("--inside-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.slow_link and not args.inside_namespace:  # again, alone in a new network namespace
        sys.exit(subprocess.run(["unshare", "--net", sys.executable, *sys.argv, "--inside-namespace"]).returncode)
    if args.inside_namespace:
        run_tool("ip", "link", "set", "lo", "up", "mtu", "1500")  # tbf drops whatever exceeds its burst: lo's 64k packets
    every_layer = list(range(args.layers))
    try:
        batches = [int(b) for b in args.batch.split(",")]
        ladder_layers = every_layer if args.ladder_layers == "all" else [int(i) for i in args.ladder_layers.split(",")]
    except ValueError:
        parser.error("--batch and --ladder-layers take comma-separated integers (--ladder-layers also: all)")
    if not set(ladder_layers) <= set(every_layer):
        parser.error(f"--ladder-layers {args.ladder_layers}: layers are 0 to {args.layers - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(rank % os.cpu_count()) for rank in range(args.tp)))
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name, (all_reduce, enforce_eager, ladder) in VARIANTS.items():
            model = write_config(Path(work) / name.replace(" ", "-"), args.shape, args.layers,
                                 ladder_layers if ladder else [])  # fmt: skip
            os.environ["LADDER_VLLM_ALL_REDUCE"] = all_reduce  # the engine's processes inherit it
            print(f"== {name}", flush=True)
            link = throttled_loopback(doubled(args.link_rate)) if args.inside_namespace else nullcontext()
            results[name] = measure(model, args, batches, link, enforce_eager)
    print_table(results, f"slow link {args.link_rate} each way" if args.slow_link else "loopback", args)


if __name__ == "__main__":
    main()
