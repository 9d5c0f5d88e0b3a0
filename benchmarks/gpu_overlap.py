"""How much of a ladder layer's all-reduce the start / wait pair hides on one GPU, eager and under CUDA-graph replay.

    python benchmarks/gpu_overlap.py                   # one GPU: 70B/TP8 and 8B/TP2 shard shapes, 5-40 us per reduce
    python benchmarks/gpu_overlap.py --shapes tiny     # any device (the test runs it on CPU)

One rank's share of a decode step (random weights, bf16 on a GPU): every decoder layer's attention (q/k/v, SDPA over
a fixed KV cache, o) and MLP (gate/up, down) at the shard shapes of tensor parallelism, each followed by the
all-reduce of its partial sum. A second GPU is not needed: the all-reduce is emulated by a kernel that spins for N
microseconds and a copy that lands the "sum", so the communication costs a known time and no bandwidth. Variants:

    no comm          the modules alone (the compute bound)
    standard         Llama's wiring, every reduce waited for at once, in the compute stream
    ladder, sync     the ladder wiring, every reduce still in the compute stream (the same time as standard)
    ladder, async    the ladder wiring with the serving plugin's start / wait: start records an event, the reduce
                     runs on a side stream after it, wait makes the compute stream wait for the reduce's own event
                     only where the wiring reads the sum (the attention's during the MLP, the MLP's during the next
                     attention)

each run eagerly and as the replay of one CUDA graph of the whole step (vLLM's full-graph decode). Prints step
times, the share of the emulated communication hidden, (standard - async) / (standard - no comm), and the speed-up
standard / async against the ideal one, (compute + comm) / max(compute, comm). Every async step's output is checked
against the synchronous one's: an emulated sum is NaN until it lands, so a wait in the wrong place shows as NaN.
On a GPU the two are checked to bf16 rounding, not bit for bit (they can differ in the last bits though the
arithmetic is the same); the largest relative difference is printed.
"""

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


@dataclass(frozen=True)
class Shard:
    """One rank's share of a model's layer under tensor parallelism: its heads and its slice of the MLP."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int


SHAPES = {
    "70b-tp8": Shard(hidden=8192, heads=8, kv_heads=1, head_dim=128, mlp=3584),  # Llama-3.1-70B: 64 / 8 heads, 28672
    "8b-tp2": Shard(hidden=4096, heads=16, kv_heads=4, head_dim=128, mlp=7168),  # Llama-3.1-8B: 32 / 8 heads, 14336
    "tiny": Shard(hidden=64, heads=2, kv_heads=1, head_dim=16, mlp=128),
}


class ShardLayer(nn.Module):
    """A decoder layer's shard whose modules return partial sums (the row-parallel outputs before their reduce).
    The MLP is transformers' LlamaMLP at the shard's width; attention reads a fixed KV cache, so a step's shapes never
    change and the step can be captured once (no rotary embedding: a few elementwise kernels per layer)."""

    def __init__(self, shard: Shard, batch: int, context: int):
        super().__init__()
        self.shard = shard
        config = LlamaConfig(hidden_size=shard.hidden, intermediate_size=shard.mlp, hidden_act="silu")
        self.attention_norm, self.mlp_norm = LlamaRMSNorm(shard.hidden), LlamaRMSNorm(shard.hidden)
        self.qkv = nn.Linear(shard.hidden, (shard.heads + 2 * shard.kv_heads) * shard.head_dim, bias=False)
        self.o = nn.Linear(shard.heads * shard.head_dim, shard.hidden, bias=False)
        self.mlp_module = LlamaMLP(config)
        self.register_buffer("keys", torch.randn(batch, shard.kv_heads, context, shard.head_dim))
        self.register_buffer("values", torch.randn(batch, shard.kv_heads, context, shard.head_dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shard
        q = self.qkv(self.attention_norm(x))[:, : s.heads * s.head_dim].view(len(x), s.heads, 1, s.head_dim)
        out = F.scaled_dot_product_attention(q, self.keys, self.values, enable_gqa=s.heads != s.kv_heads)
        return self.o(out.reshape(len(x), -1))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_module(self.mlp_norm(x))


class EmulatedAllReduce:
    """One rank's all-reduce stood in for by `microseconds` of a spinning kernel and the copy that lands the sum.

    `reduce` runs it in the compute stream. `start` / `wait` are the serving plugin's asynchronous pair: on CUDA the
    reduce runs on a side stream after an event recorded where its input was written, and `wait` makes the compute
    stream wait for the reduce's own event; the pending reduce keeps its input and output alive until then, so no
    block is reused while the side stream still reads or writes it. Every start has its wait inside the same step,
    so a captured graph always joins the side stream. Without CUDA the reduce is the copy, at once."""

    def __init__(self, device: torch.device, microseconds: float):
        self.cuda = device.type == "cuda"
        self.cycles = int(microseconds * cycles_per_microsecond()) if self.cuda else 0
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def land(self, partial: torch.Tensor, total: torch.Tensor) -> None:
        """NaN until the sum lands: a sum read too early poisons the step's output, which the checks then see."""
        total.fill_(float("nan"))
        if self.cycles:
            torch.cuda._sleep(self.cycles)
        total.copy_(partial)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        total = torch.empty_like(partial)
        self.land(partial, total)
        return total

    def start(self, partial: torch.Tensor):
        total = torch.empty_like(partial)
        if not self.cuda:
            self.land(partial, total)
            return total, None, partial
        written = torch.cuda.Event()
        written.record()
        self.side.wait_event(written)
        with torch.cuda.stream(self.side):
            self.land(partial, total)
        done = torch.cuda.Event()
        done.record(self.side)
        return total, done, partial

    def wait(self, pending) -> torch.Tensor:
        total, done, _partial = pending
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return total


def cycles_per_microsecond() -> float:
    """The GPU clock as the spinning kernel counts it, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) * 1000)


def standard_step(layers, comm, x):
    for layer in layers:
        x = x + comm.reduce(layer.attention(x))
        x = x + comm.reduce(layer.mlp(x))
    return x


def no_comm_step(layers, comm, x):
    for layer in layers:
        x = x + layer.attention(x)
        x = x + layer.mlp(x)
    return x


def ladder_sync_step(layers, comm, x):
    """a = attn(ln1(A)); m = mlp(ln2(H)); A = H + a; H = A + m, each reduce waited for at once."""
    A = H = x
    for layer in layers:
        a = comm.reduce(layer.attention(A))
        m = comm.reduce(layer.mlp(H))
        A = H + a
        H = A + m
    return H


def ladder_async_step(layers, comm, x):
    """The same wiring, each sum waited for where it is read: H = A + m (the previous MLP's sum) only once the next
    attention has been issued, A = H + a only once the MLP has."""
    A, pending_mlp = x, None
    H = x
    for layer in layers:
        pending_attention = comm.start(layer.attention(A))
        if pending_mlp is not None:
            H = A + comm.wait(pending_mlp)
        pending_mlp = comm.start(layer.mlp(H))
        A = H + comm.wait(pending_attention)
    return A + comm.wait(pending_mlp)


VARIANTS = {"no comm": no_comm_step, "standard": standard_step, "ladder, sync": ladder_sync_step,
            "ladder, async": ladder_async_step}  # fmt: skip


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(run, device: torch.device, repeats: int) -> float:
    """Median seconds of `run()`, after warm-up."""
    for _ in range(3):
        run()
    synchronize(device)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def captured(step, layers, comm, x):
    """The whole step as one CUDA graph and a function that replays it; its output tensor is rewritten by each replay."""
    warm = torch.cuda.Stream()  # capture wants the step run once outside it, off the default stream
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step(layers, comm, x)
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step(layers, comm, x)
    return graph.replay, output


def measure(shard: Shard, layer_count: int, batch: int, context: int, microseconds: list[float], device, dtype,
            repeats: int) -> list[dict]:  # fmt: skip
    """Step times of every variant, eager and replayed, at each emulated reduce time."""
    torch.manual_seed(0)
    layers = nn.ModuleList(ShardLayer(shard, batch, context) for _ in range(layer_count)).to(device, dtype)
    x = torch.randn(batch, shard.hidden, device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        for us in microseconds:
            comm = EmulatedAllReduce(device, us)
            row = {"microseconds": us, "emulated": comm.cycles > 0}
            expected = ladder_sync_step(layers, comm, x)
            row["difference (eager)"] = check_equal(ladder_async_step(layers, comm, x), expected, f"{us} us, eager")
            modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
            for mode in modes:
                for name, step in VARIANTS.items():
                    if mode == "eager":
                        run = lambda step=step: step(layers, comm, x)  # noqa: E731
                    else:
                        run, output = captured(step, layers, comm, x)
                    row[f"{name} ({mode})"] = time_step(run, device, repeats)
                    if mode == "graph" and name == "ladder, async":
                        run()
                        row["difference (graph)"] = check_equal(output, expected, f"{us} us, replayed")
            rows.append(row)
    return rows


def check_equal(output: torch.Tensor, expected: torch.Tensor, where: str) -> float:
    """The largest difference between the async step's output and the synchronous one's, relative to the largest
    value; fails on a NaN (a sum read before it landed) or on more than bf16's rounding over the step."""
    difference = ((output.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    if not difference <= 1e-2:  # NaN fails too
        raise AssertionError(f"ladder async != ladder sync at {where}: relative difference {difference:.3g}")
    return difference


def overlap(row: dict, mode: str) -> dict:
    """The shares the docstring names, from one row of step times."""
    compute, standard, ladder = (row[f"{name} ({mode})"] for name in ("no comm", "standard", "ladder, async"))
    comm = standard - compute
    if not row["emulated"] or comm <= 0:  # CPU: the reduce is a copy, nothing to hide
        return {"hidden": float("nan"), "speedup": standard / ladder, "ideal": 1.0}
    ideal = (compute + comm) / max(compute, comm)
    return {"hidden": (standard - ladder) / comm, "speedup": standard / ladder, "ideal": ideal}


def print_rows(name: str, rows: list[dict], modes: list[str]) -> None:
    for mode in modes:
        print(f"\n{name}, {mode}: step times in microseconds")
        print("| reduce us | " + " | ".join(VARIANTS) + " | hidden | standard / async | ideal | of ideal | async - sync |")
        print("|---:|" + "---:|" * (len(VARIANTS) + 5))
        for row in rows:
            shares = overlap(row, mode)
            times = " | ".join(f"{row[f'{variant} ({mode})'] * 1e6:,.1f}" for variant in VARIANTS)
            print(f"| {row['microseconds']:g} | {times} | {shares['hidden']:.0%} | {shares['speedup']:.3f}x | "
                  f"{shares['ideal']:.3f}x | {shares['speedup'] / shares['ideal']:.0%} | "
                  f"{row[f'difference ({mode})']:.1e} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["70b-tp8", "8b-tp2"])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers in the step")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch sizes")
    parser.add_argument("--context", type=int, default=1024, help="tokens in the KV cache")
    parser.add_argument("--microseconds", type=float, nargs="+", default=[5, 10, 20, 40], help="emulated all-reduce")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, {dtype}, {args.layers} layers, KV cache of {args.context} tokens, median of {args.repeats} steps")
    for shape in args.shapes:
        for batch in args.batch:
            rows = measure(SHAPES[shape], args.layers, batch, args.context, args.microseconds, device, dtype, args.repeats)
            print_rows(f"{shape}, batch {batch}", rows, modes)
    print("\nasync outputs equal the synchronous ones within bf16 rounding, no NaN (eager"
          + (" and replayed)" if len(modes) > 1 else ")"))


if __name__ == "__main__":
    main()
