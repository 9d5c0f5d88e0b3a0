"""Ladder Llama for vLLM: `vllm serve <ladder checkpoint>` and `LLM(model=...)`, without `trust_remote_code`.

vLLM loads this through the `vllm.general_plugins` entry point (pyproject.toml), in every process it starts:
`register()` adds our configuration to transformers' AutoConfig and this model to vLLM's ModelRegistry under the
architecture name our checkpoints record, `LadderLlamaForCausalLM`.

The model is vLLM's Llama: the same attention, MLP, norms, parallel linear layers and weight loading. Standard layers
are vLLM's `LlamaDecoderLayer` unchanged. A ladder layer reuses its modules with the ladder wiring
(convert/modeling_ladder_llama.py):

    a = attn(ln1(A));  m = mlp(ln2(H));  A = H + a;  H = A + m

and vLLM's convention for the residual stream between layers, `(hidden_states, residual)` with
`H = residual + hidden_states`, which here also carries A: after a layer, `residual` is A and `hidden_states` the last
MLP's output m. So a ladder layer's attention reads `residual` alone and never waits for the MLP before it.

The overlap: under tensor parallelism a ladder layer's attention and MLP outputs are partial sums (the row-parallel
layers skip their all-reduce, `reduce_results=False`); each all-reduce is started as soon as its output exists and
waited for only where the wiring reads it, so the attention's reduce runs during the MLP and the MLP's during the next
layer's attention. A standard layer just before a ladder layer starts its MLP's reduce early too: the ladder attention
after it does not read it. The asynchronous reduces are two custom ops (`ladder::start_all_reduce`,
`ladder::wait_all_reduce`) over torch.distributed on the tensor-parallel group (NCCL on CUDA, gloo on CPU), opaque to
torch.compile, so they keep their places on vLLM's default compiled path as in eager mode; standard layers keep
vLLM's own all-reduce.

LADDER_VLLM_ALL_REDUCE, for benchmarks: `torch` sends vLLM's own all-reduces through torch.distributed as well (on
CPU vLLM otherwise uses shared memory, which no network link slows); `none` skips every all-reduce (wrong outputs:
the no-communication bound). LADDER_VLLM_LATE_SUMS=1, for tests: a ladder all-reduce's sum reaches its tensor only
at the wait, so a read before the wait sees the partial sum.
"""

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import AutoConfig

from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size, get_tp_group
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index

from ..convert.configuration_ladder_llama import LadderLlamaConfig

ARCHITECTURE = "LadderLlamaForCausalLM"
ALL_REDUCE_MODES = ("vllm", "torch", "none")


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    from vllm import ModelRegistry

    AutoConfig.register(LadderLlamaConfig.model_type, LadderLlamaConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:LadderLlamaForCausalLM")


def all_reduce_mode() -> str:
    mode = os.environ.get("LADDER_VLLM_ALL_REDUCE", "vllm")
    if mode not in ALL_REDUCE_MODES:
        raise ValueError(f"LADDER_VLLM_ALL_REDUCE={mode!r}: give one of {', '.join(ALL_REDUCE_MODES)}")
    return mode


# The all-reduces in flight, by the address of the tensor that receives the sum: a work handle cannot pass through a
# compiled graph, a tensor can.
_IN_FLIGHT: dict[int, Callable[[], object]] = {}


@torch.library.custom_op("ladder::start_all_reduce", mutates_args=())
def start_all_reduce(partial: torch.Tensor, group_name: str) -> torch.Tensor:
    """A copy of `partial` whose all-reduce over the group has started (asynchronously, in place)."""
    total = partial.clone()
    group = dist.distributed_c10d._resolve_process_group(group_name)
    if dist.get_world_size(group) == 1:
        return total
    if os.environ.get("LADDER_VLLM_LATE_SUMS") == "1":  # tests: the sum lands only at the wait
        summed = partial.clone()
        dist.all_reduce(summed, group=group)
        _IN_FLIGHT[total.data_ptr()] = lambda: total.copy_(summed)
    else:
        _IN_FLIGHT[total.data_ptr()] = dist.all_reduce(total, group=group, async_op=True).wait
    return total


@start_all_reduce.register_fake
def _(partial, group_name):
    return torch.empty_like(partial)


@torch.library.custom_op("ladder::wait_all_reduce", mutates_args=())
def wait_all_reduce(total: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The sum, once the all-reduce that `start_all_reduce` started on `total` has finished. `after` is unused: it
    is the output of the work the all-reduce runs behind, so that inductor, which moves an op to where its inputs
    exist, cannot move the wait before that work."""
    finish = _IN_FLIGHT.pop(total.data_ptr(), None)
    if finish is not None:
        finish()
    return total.clone()  # an op's output may not alias its input


@wait_all_reduce.register_fake
def _(total, after):
    return torch.empty_like(total)


class Reduces:
    """The asynchronous all-reduces of a ladder model's partial sums: `start` issues one and returns the tensor that
    will hold the sum, `wait` returns the sum. Both are custom ops, opaque to torch.compile, so the overlap survives
    vLLM's default compiled path: inductor moves neither a wait above the work it names as `after` nor (with two of
    its reorderings off, see LadderLlamaModel) a start down to its wait.

    On one rank `start` is still called, as a copy: a ladder layer reads its attention's output only after its MLP,
    and vLLM's CPU build writes each projection's output into a preallocated buffer (`_C.onednn_mm`) whose later reads
    inductor may fuse into a kernel it runs before the GEMM, reading an unwritten buffer. An opaque op that consumes
    the output at once leaves every later read on a tensor inductor orders correctly."""

    def __init__(self, mode: str):
        self.enabled = mode != "none"
        self.across_ranks = self.enabled and get_tensor_model_parallel_world_size() > 1

    def start(self, partial: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return partial
        return torch.ops.ladder.start_all_reduce(partial, get_tp_group().device_group.group_name)

    def wait(self, pending: torch.Tensor, after: torch.Tensor | None = None) -> torch.Tensor:
        """The sum, waited for after `after` (the output of the work the reduce runs behind) exists."""
        if not self.across_ranks:
            return pending
        return torch.ops.ladder.wait_all_reduce(pending, pending if after is None else after)


class LadderDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer with the ladder wiring; its two all-reduces are asynchronous (`Reduces`). The MLP output it
    receives (`hidden_states`, unless this is the first layer) and the one it returns are still being reduced."""

    def __init__(self, *, vllm_config, prefix: str, reduces: Reduces):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.self_attn.o_proj.reduce_results = False
        self.mlp.down_proj.reduce_results = False
        self.reduces = reduces

    def forward(self, positions, hidden_states, residual):
        A = hidden_states if residual is None else residual  # the first layer: A = H = the embeddings
        attention = self.reduces.start(self.self_attn(positions=positions, hidden_states=self.input_layernorm(A)))
        if residual is None:
            H, normed = hidden_states, self.post_attention_layernorm(hidden_states)
        else:  # the MLP before (this kind of layer's or a standard one's), reduced behind this attention: H = A + m
            normed, H = self.post_attention_layernorm(self.reduces.wait(hidden_states, after=attention), residual)
        mlp = self.reduces.start(self.mlp(normed))  # read by the next MLP or standard layer, not the next attention
        return mlp, H + self.reduces.wait(attention, after=mlp)  # (m, A): H = A + m


class StandardDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer, unchanged, which waits for a ladder layer's MLP reduce before it reads H; followed by a
    ladder layer, it leaves its own MLP's reduce pending for that layer's MLP."""

    def __init__(self, *, vllm_config, prefix: str, reduces: Reduces, after_ladder: bool, before_ladder: bool):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.reduces, self.after_ladder, self.before_ladder = reduces, after_ladder, before_ladder
        self.mlp.down_proj.reduce_results = not before_ladder

    def forward(self, positions, hidden_states, residual):
        if self.after_ladder:
            hidden_states = self.reduces.wait(hidden_states)
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        if self.before_ladder:
            hidden_states = self.reduces.start(hidden_states)
        return hidden_states, residual


class LadderLlamaModel(LlamaModel):
    def __init__(self, *, vllm_config, prefix: str = ""):
        if get_pp_group().world_size > 1:
            raise ValueError("ladder_llama on vLLM: pipeline parallelism is not supported (tensor parallelism is)")
        config = vllm_config.model_config.hf_config
        mode = all_reduce_mode()
        reduces = Reduces(mode)
        ladder = set(config.ladder_layers)

        def layer(*, vllm_config, prefix: str):
            index = extract_layer_index(prefix)
            if index in ladder:
                return LadderDecoderLayer(vllm_config=vllm_config, prefix=prefix, reduces=reduces)
            return StandardDecoderLayer(vllm_config=vllm_config, prefix=prefix, reduces=reduces,
                                        after_ladder=index - 1 in ladder,
                                        before_ladder=index + 1 in ladder)  # fmt: skip

        # Two of inductor's reorderings move a start down to just before its wait, which leaves nothing to overlap:
        # the one for peak memory (a start allocates the sum's tensor), and the one for locality, which moves the
        # producers of an op read by one consumer only to right before it (it spares torch's own collective waits,
        # not ours): the MLP of a standard layer before a ladder layer, whose only reader is the wait after the
        # ladder attention. Set before LlamaModel's __init__, which sets up the compile; a user's own setting wins.
        for reordering in ("reorder_for_peak_memory", "reorder_for_locality"):
            vllm_config.compilation_config.inductor_compile_config.setdefault(reordering, False)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
        self.reduces, self.ends_with_ladder = reduces, config.num_hidden_layers - 1 in ladder
        if mode != "vllm" and get_tensor_model_parallel_world_size() > 1:
            route_vllm_all_reduce(mode)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.ends_with_ladder:
            hidden_states = self.reduces.wait(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LadderLlamaForCausalLM(LlamaForCausalLM):
    def _init_model(self, vllm_config, prefix: str = "", layer_type=None):
        return LadderLlamaModel(vllm_config=vllm_config, prefix=prefix)


class _WithoutAllReduce:
    """torch.distributed, except that all_reduce does nothing."""

    def all_reduce(self, tensor, group=None):
        return None

    def __getattr__(self, name):
        return getattr(dist, name)


def route_vllm_all_reduce(mode: str) -> None:
    """Benchmarks only (LADDER_VLLM_ALL_REDUCE): vLLM's own all-reduce through torch.distributed, or none."""
    communicator = get_tp_group().device_communicator
    if not hasattr(communicator, "dist_module"):
        raise ValueError(f"LADDER_VLLM_ALL_REDUCE={mode} works on vLLM's CPU communicator only")
    communicator.dist_module = dist if mode == "torch" else _WithoutAllReduce()
