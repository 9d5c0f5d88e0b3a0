"""`python -m ladder.serve bench`: a transparent tensor-parallel runner's speed with and without ladder wiring.

To serve a model, use vLLM (serve/vllm_model.py, README "Serving with vLLM"). This runner stays as the reference it
is measured against: every all-reduce and every wait is in plain sight in serve/model.py, and `--profile` splits each
rank's decode step into compute, head and the time spent waiting for each all-reduce. `--iso` adds the standard and
ladder wirings with ISO's two-chunk prefill (docs/iso-prefill.md), and then profiles prefills.

Under `torchrun --nproc-per-node N` each process is one rank. Run without torchrun, `--tp N` starts the N ranks
itself (on this machine's loopback, or with `bench --slow-link` in two network namespaces joined by a throttled link).
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from .model import (
    HEAD,
    SHAPES,
    WAIT_ATTENTION,
    WAIT_MLP,
    ServeError,
    check_split,
    greedy_steps,
    iso_split,
    load_config,
    load_model,
)

PROG = "ladder.serve"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="prefill latency and decode speed: standard, ladder, no communication")
    shapes = ", ".join(SHAPES)
    bench.add_argument("--model", required=True, help=f"checkpoint directory, or a shape with random weights: {shapes}")
    bench.add_argument("--layers", type=int, help="depth of a named shape (default: the real model's)")
    bench.add_argument("--ladder-layers", type=lambda spec: [int(i) for i in spec.split(",")], metavar="I,J,...",
                       help="the ladder variant's ladder layers (default: the checkpoint's, or every layer of a shape)")  # fmt: skip
    bench.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    bench.add_argument("--prompt-len", default="1024", help="comma-separated prompt lengths")
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    bench.add_argument(
        "--slow-link", action="store_true", help="run 2 ranks in two network namespaces over a throttled veth pair"
    )
    bench.add_argument("--link-rate", default="6mbit", help="bandwidth of the slow link, each way (tc units)")
    bench.add_argument("--link-delay-ms", type=float, default=0.0, help="one-way delay of the link (needs tc netem)")
    bench.add_argument(
        "--iso", action="store_true",
        help="also time standard+iso and ladder+iso: each prefill in two chunks, each chunk's all-reduces overlapping "
        "the other's compute (ISO)",
    )  # fmt: skip
    bench.add_argument(
        "--profile", type=int, nargs="?", const=3, default=0, metavar="STEPS",
        help="then profile STEPS (default 3) decode steps (with --iso: prefills) per variant on CPU and print where "
        "each rank's time goes",
    )  # fmt: skip
    bench.add_argument("--profile-dir", help="with --profile, also write each rank's Chrome trace (Perfetto) there")
    bench.add_argument("--tp", type=int, help="tensor-parallel size (default: torchrun's world size, else 1)")
    bench.add_argument("--no-comm", action="store_true", help="skip all-reduces: the speed bound, wrong output")
    bench.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bf16 on CUDA, fp32 on CPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        if "RANK" in os.environ or (args.tp or 1) == 1 and not args.slow_link:
            run_rank(args, rank)
        else:
            return launch(args, argv)
    except ServeError as error:
        if rank == 0:  # every rank finds the same error; one line is enough
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the ranks got it too; --slow-link's namespaces are gone already
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def validate(args, tp: int):
    """Everything that can be wrong with the input, found before any rank connects to another."""
    if args.slow_link and tp != 2:
        raise ServeError(f"--slow-link joins exactly 2 ranks; got tensor-parallel size {tp}")
    if args.profile_dir and not args.profile:
        raise ServeError("--profile-dir needs --profile")
    positive_ints(args.batch, "--batch")
    if args.iso and min(positive_ints(args.prompt_len, "--prompt-len")) < 2:
        raise ServeError("--iso splits each prompt in two chunks: every --prompt-len must be at least 2")
    config = load_config(args.model, args.layers)
    check_split(config, tp)
    outside = [i for i in getattr(args, "ladder_layers", None) or [] if not 0 <= i < config.num_hidden_layers]
    if outside:
        raise ServeError(f"--ladder-layers {outside} are outside the model's layers 0-{config.num_hidden_layers - 1}")
    return config


def positive_ints(spec: str, option: str) -> list[int]:
    """`--batch 1,4,16` or `--prompt-len 256,1024` as integers."""
    try:
        values = [int(value) for value in spec.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ServeError(f"{option} {spec}: give comma-separated positive integers")
    return values


# --- one rank ------------------------------------------------------------------------------------------------------


def run_rank(args, rank: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.tp and args.tp != world:
        raise ServeError(f"world size mismatch: --tp {args.tp}, but {world} ranks were started")
    if args.slow_link and "SERVE_LAUNCHED" not in os.environ:
        raise ServeError("--slow-link starts its own ranks: run it without torchrun")
    config = validate(args, world)
    ladder_layers = getattr(config, "ladder_layers", None) or []  # a plain Llama config has none
    if not ladder_layers and rank == 0:
        print(f"{PROG}: no ladder layers: every layer is standard", file=sys.stderr)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if args.profile:
            raise ServeError("--profile times the host, where CUDA only queues kernels: profile on CPU")
        torch.cuda.set_device(device)
    else:  # share the cores between the ranks on this machine; more threads than cores would fight
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = load_model(args.model, config, rank, world, dtype, device)
    model.rewire(ladder_layers, communicate=not args.no_comm)
    bench(args, model, rank, device)


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(model, ids, new_tokens: int, iso: bool, device) -> torch.Tensor:
    """Seconds of prefill and of the decode steps, the slowest rank's."""
    if dist.is_initialized():
        dist.barrier()
    synchronize(device)
    steps = greedy_steps(model, ids, new_tokens, iso)
    start = time.perf_counter()
    next(steps)
    synchronize(device)
    prefilled = time.perf_counter()
    for _ in steps:
        pass
    synchronize(device)
    seconds = torch.tensor([prefilled - start, time.perf_counter() - prefilled], dtype=torch.float64)
    if dist.is_initialized():  # with --no-comm the ranks drift apart: the slowest one sets the pace
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds


def bench(args, model, rank: int, device) -> None:
    ladder_layers = args.ladder_layers or [i for i, block in enumerate(model.blocks) if block.is_ladder]
    variants = {}  # name: (ladder layers, communicate, iso)
    for name, layers in {"standard": [], "ladder": ladder_layers}.items():
        variants[name] = (layers, True, False)
        if args.iso:
            variants[f"{name}+iso"] = (layers, True, True)
    variants["no-comm"] = (ladder_layers, False, False)
    if rank == 0:
        delay = f", {args.link_delay_ms} ms" if args.link_delay_ms else ""
        link = f"slow link {args.link_rate}{delay}" if args.slow_link else "loopback"
        backend = dist.get_backend() if dist.is_initialized() else "single process"
        print(
            f"{args.model}: {len(model.blocks)} layers ({len(ladder_layers)} ladder), tp {model.tp}, {backend} on "
            f"{device.type} ({torch.get_num_threads()} threads/rank), {model.dtype}, {link}; {args.new_tokens} new "
            f"tokens, median of {args.repeats}"
        )
        print(f"{'batch':>5} {'prompt':>6}  {'variant':<12} {'prefill ms':>11} {'decode tok/s':>13}")
    for batch in positive_ints(args.batch, "--batch"):
        for prompt_len in positive_ints(args.prompt_len, "--prompt-len"):
            prompts = torch.Generator().manual_seed(0)  # the same prompts on every rank
            ids = torch.randint(model.config.vocab_size, (batch, prompt_len), generator=prompts).to(device)
            prefill, decode = timed_variants(args, model, ids, variants, device)
            if rank == 0:
                print_results(f"{batch:>5} {prompt_len:>6}", prefill, decode)
                if args.iso:
                    first = iso_split(model.config, 0, prompt_len)
                    print(f"{batch:>5} {prompt_len:>6}  iso chunks: {first} + {prompt_len - first} tokens")
            if args.profile:
                profile_variants(args, model, ids, variants, rank, f"{batch:>5} {prompt_len:>6}")


def timed_variants(args, model, ids, variants, device) -> tuple[dict, dict]:
    """Each variant's median prefill seconds and decode tokens/s."""
    runs = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # round 0 warms up; variants interleave so drift hits them alike
        for name, (layers, communicate, iso) in variants.items():
            model.rewire(layers, communicate)
            seconds = timed_generation(model, ids, args.new_tokens if repeat else 2, iso, device)
            if repeat:
                runs[name].append(seconds)
    prefill = {name: statistics.median(s[0].item() for s in times) for name, times in runs.items()}
    decode = {
        name: ids.shape[0] * (args.new_tokens - 1) / statistics.median(s[1].item() for s in times)
        for name, times in runs.items()
    }
    return prefill, decode


def print_results(row: str, prefill: dict, decode: dict) -> None:
    """One line per variant, then the speed-ups: "A/B: prefill x2" means A's prefill takes half B's time."""
    for name in prefill:
        print(f"{row}  {name:<12} {prefill[name] * 1e3:>11.1f} {decode[name]:>13.2f}")
    print(
        f"{row}  ladder/standard: prefill x{prefill['standard'] / prefill['ladder']:.2f}, "
        f"decode x{decode['ladder'] / decode['standard']:.2f};  ladder/no-comm: prefill "
        f"x{prefill['no-comm'] / prefill['ladder']:.2f}, decode x{decode['ladder'] / decode['no-comm']:.2f}"
    )
    if "ladder+iso" in prefill:
        print(
            f"{row}  standard+iso/standard: prefill x{prefill['standard'] / prefill['standard+iso']:.2f};  "
            f"ladder+iso/ladder: prefill x{prefill['ladder'] / prefill['ladder+iso']:.2f};  "
            f"ladder+iso/no-comm: prefill x{prefill['no-comm'] / prefill['ladder+iso']:.2f}"
        )


# A step's host time, split by the outermost of these regions it is in; the rest is "other".
PROFILED = {WAIT_ATTENTION: "wait attn", WAIT_MLP: "wait mlp", "c10d::allreduce_": "AR launch",
            "aten::linear": "linear", HEAD: "lm_head"}  # fmt: skip
COLUMNS = ["step", *PROFILED.values(), "other", "AR running"]


def profile_variants(args, model, ids, variants, rank: int, row: str) -> None:
    """Prints each variant's and rank's milliseconds per decode step (with --iso: per prefill) in COLUMNS: where the
    overlap falls short."""
    step = "prefill" if args.iso else "decode step"
    if rank == 0:
        print(
            f"{row}  profile: host ms per {step} (mean of {args.profile}); wait attn/mlp: blocked on that "
            "all-reduce; AR running: all-reduces in flight on gloo's threads"
        )
        print(f"{'batch':>5} {'prompt':>6}  {'variant':<12} {'rank':>4}" + "".join(f"{name:>11}" for name in COLUMNS))
    for name, (layers, communicate, iso) in variants.items():
        model.rewire(layers, communicate)
        trace_name = f"batch{ids.shape[0]}-prompt{ids.shape[1]}-{name}-rank{rank}.json"
        trace = args.profile_dir and Path(args.profile_dir) / trace_name
        times = profiled_steps(model, ids, args.profile, args.iso, iso, trace)
        rows = [times]
        if dist.is_initialized():  # every rank's, for rank 0 to print
            rows = [torch.empty_like(times) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, times)
        if rank == 0:
            for r, times in enumerate(rows):
                print(f"{row}  {name:<12} {r:>4}" + "".join(f"{ms:>11.1f}" for ms in times.tolist()))


def profiled_steps(model, ids, steps: int, prefill: bool, iso: bool, trace: Path | None) -> torch.Tensor:
    """This rank's milliseconds per step in COLUMNS, over `steps` steps after a warm-up one: decode steps after the
    prefill, or with `prefill` whole prefills (in ISO's two chunks with `iso`)."""
    if prefill:
        tokens = (next(greedy_steps(model, ids, 1, iso)) for _ in range(steps + 1))
    else:
        tokens = greedy_steps(model, ids, steps + 2)
        next(tokens)  # the prefill
    next(tokens)  # the warm-up step
    if dist.is_initialized():
        dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in tokens:
            pass
        seconds = time.perf_counter() - start
    if trace:
        trace.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(trace))
    events = profiler.events()
    main = next(event.thread for event in events if event.name == HEAD)
    microseconds = dict.fromkeys(COLUMNS, 0.0) | {"step": seconds * 1e6}
    for event in events:
        if event.thread == main and event.name in PROFILED and not any(a.name in PROFILED for a in ancestors(event)):
            microseconds[PROFILED[event.name]] += event.time_range.elapsed_us()
    microseconds["other"] = microseconds["step"] - sum(microseconds[name] for name in PROFILED.values())
    reductions = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "gloo:all_reduce")
    end = float("-inf")
    for first, last in reductions:  # their union: two all-reduces can be in flight at once
        microseconds["AR running"] += max(0.0, last - max(first, end))
        end = max(end, last)
    return torch.tensor(list(microseconds.values()), dtype=torch.float64) / steps / 1e3


def ancestors(event):
    while event.cpu_parent is not None:
        event = event.cpu_parent
        yield event


# --- the launcher --------------------------------------------------------------------------------------------------


def launch(args, argv: list[str]) -> int:
    """Start the ranks as `python -m ladder.serve ...` processes; with --slow-link, each in its own network namespace."""
    validate(args, args.tp)
    with slow_link(args.link_rate, args.link_delay_ms) if args.slow_link else loopback(args.tp) as places:
        port, ranks = free_port(), []
        for rank, (prefix, interface, master) in enumerate(places):
            env = dict(
                os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.tp),
                LOCAL_WORLD_SIZE=str(args.tp), MASTER_ADDR=master, MASTER_PORT=str(port),
                GLOO_SOCKET_IFNAME=interface, SERVE_LAUNCHED="1",
            )  # fmt: skip
            ranks.append(subprocess.Popen([*prefix, sys.executable, "-m", "ladder.serve", *argv], env=env))
        return wait_all(ranks)


def wait_all(ranks: list[subprocess.Popen]) -> int:
    """The first failure's exit code; the other ranks are stopped then, or they would wait for it forever."""
    while True:
        codes = [rank.poll() for rank in ranks]
        failed = [code for code in codes if code]
        if failed or all(code == 0 for code in codes):
            for rank in ranks:
                if rank.poll() is None:
                    rank.terminate()
                    rank.wait()
            return failed[0] if failed else 0
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def loopback(tp: int):
    """Each rank: (command prefix, network interface, rank 0's address)."""
    yield [([], "lo", "127.0.0.1")] * tp


@contextmanager
def slow_link(rate: str, delay_ms: float):
    """Two network namespaces joined by a veth pair whose both ends are throttled; removed afterwards.

    The addresses are link-local and exist only inside the namespaces. The rate is shaped with `tbf`, whose small
    bucket (4 kB, under one all-reduce of a decode step) keeps bursts from slipping through at full speed; a delay
    needs `netem`, which some kernels lack.
    """
    if not (shutil.which("ip") and shutil.which("tc")):
        raise ServeError("--slow-link needs `ip` and `tc` (apt-get install -y iproute2), run as root")
    names = [f"serve{os.getpid()}r{rank}" for rank in range(2)]
    addresses = ["169.254.77.1", "169.254.77.2"]
    shaper = f"netem delay {delay_ms}ms rate {rate}" if delay_ms else f"tbf rate {rate} burst 4kb latency 1s"
    try:
        for name in names:
            run_tool("ip", "netns", "add", name)
        veth_pair = ["veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1", "netns", names[1]]
        run_tool("ip", "link", "add", *veth_pair)
        for rank, name in enumerate(names):
            run_tool("ip", "-n", name, "addr", "add", f"{addresses[rank]}/30", "dev", f"veth{rank}")
            run_tool("ip", "-n", name, "link", "set", f"veth{rank}", "up")
            run_tool("ip", "-n", name, "link", "set", "lo", "up")
            run_tool("tc", "-n", name, "qdisc", "add", "dev", f"veth{rank}", "root", *shaper.split())
        yield [(["ip", "netns", "exec", name], f"veth{rank}", addresses[0]) for rank, name in enumerate(names)]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_tool(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise ServeError(f"--slow-link: `{' '.join(command)}` failed: {done.stderr.strip()}")


if __name__ == "__main__":
    sys.exit(main())
