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
after it does not read it. The asynchronous reduces go through torch.distributed on the tensor-parallel group (NCCL
on CUDA, gloo on CPU); standard layers keep vLLM's own all-reduce. Under torch.compile or CUDA-graph capture the
reduces run synchronously (correct, no overlap): run with `enforce_eager=True` for the overlap.

LADDER_VLLM_ALL_REDUCE, for benchmarks: `torch` sends vLLM's own all-reduces through torch.distributed as well (on
CPU vLLM otherwise uses shared memory, which no network link slows); `none` skips every all-reduce (wrong outputs:
the no-communication bound).
"""

import os

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


class PendingReduce:
    """At most one all-reduce in flight: started on a partial sum, finished (in place) where the sum is read."""

    def __init__(self, mode: str):
        self.mode, self.work = mode, None

    def start(self, partial: torch.Tensor) -> torch.Tensor:
        """Returns the tensor that holds the sum once `wait()` returned."""
        self.wait()
        if self.mode == "none" or get_tensor_model_parallel_world_size() == 1:
            return partial
        if torch.compiler.is_compiling() or (partial.is_cuda and torch.cuda.is_current_stream_capturing()):
            return get_tp_group().all_reduce(partial)  # vLLM's graph-safe all-reduce
        self.work = dist.all_reduce(partial, group=get_tp_group().device_group, async_op=True)
        return partial

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None


class LadderDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer with the ladder wiring; its two all-reduces are asynchronous (`PendingReduce`)."""

    def __init__(self, *, vllm_config, prefix: str, pending_mlp: PendingReduce):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.self_attn.o_proj.reduce_results = False
        self.mlp.down_proj.reduce_results = False
        self.pending_attention, self.pending_mlp = PendingReduce(pending_mlp.mode), pending_mlp

    def forward(self, positions, hidden_states, residual):
        A = hidden_states if residual is None else residual  # the first layer: A = H = the embeddings
        attention = self.self_attn(positions=positions, hidden_states=self.input_layernorm(A))
        attention = self.pending_attention.start(attention)
        self.pending_mlp.wait()  # the MLP before (this layer's or a standard one's): H = A + m
        if residual is None:
            H, normed = hidden_states, self.post_attention_layernorm(hidden_states)
        else:
            normed, H = self.post_attention_layernorm(hidden_states, residual)
        mlp = self.pending_mlp.start(self.mlp(normed))  # read by the next MLP or standard layer, not the next attention
        self.pending_attention.wait()
        return mlp, H + attention  # (m, A): H = A + m


class StandardDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer, unchanged, which waits for a ladder layer's MLP reduce before it reads H; followed by a
    ladder layer, it leaves its own MLP's reduce pending for that layer's MLP."""

    def __init__(self, *, vllm_config, prefix: str, pending_mlp: PendingReduce, before_ladder: bool):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.pending_mlp, self.before_ladder = pending_mlp, before_ladder
        self.mlp.down_proj.reduce_results = not before_ladder

    def forward(self, positions, hidden_states, residual):
        self.pending_mlp.wait()
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        if self.before_ladder:
            hidden_states = self.pending_mlp.start(hidden_states)
        return hidden_states, residual


class LadderLlamaModel(LlamaModel):
    def __init__(self, *, vllm_config, prefix: str = ""):
        if get_pp_group().world_size > 1:
            raise ValueError("ladder_llama on vLLM: pipeline parallelism is not supported (tensor parallelism is)")
        config = vllm_config.model_config.hf_config
        mode = all_reduce_mode()
        pending_mlp = PendingReduce(mode)
        ladder = set(config.ladder_layers)

        def layer(*, vllm_config, prefix: str):
            index = extract_layer_index(prefix)
            if index in ladder:
                return LadderDecoderLayer(vllm_config=vllm_config, prefix=prefix, pending_mlp=pending_mlp)
            return StandardDecoderLayer(vllm_config=vllm_config, prefix=prefix, pending_mlp=pending_mlp,
                                        before_ladder=index + 1 in ladder)  # fmt: skip

        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
        self.pending_mlp = pending_mlp
        if mode != "vllm" and get_tensor_model_parallel_world_size() > 1:
            route_vllm_all_reduce(mode)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        self.pending_mlp.wait()
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
