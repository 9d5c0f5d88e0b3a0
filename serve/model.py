"""A tensor-parallel Ladder Llama for inference: Megatron-style sharding, a static KV cache and greedy decoding.

Each rank holds a slice of every layer: whole query and KV heads of q/k/v, columns of gate/up (the output features),
and the matching input columns of o and down, so each attention and each MLP ends in a partial sum that one
all-reduce completes. The embedding, the final norm and the head are replicated.
"""

import json
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.profiler import record_function
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

import ladder  # noqa: F401  (registers the ladder model with the Auto classes)
from ladder import LadderLlamaConfig
from ladder.checkpoint import CheckpointError, check_ladder_layers, read_json_object

# Published shapes, for benchmarking models we cannot download; `--layers` scales the depth down.
SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, vocab_size=128256, rope_theta=500000.0,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        num_hidden_layers=80, vocab_size=128256, rope_theta=500000.0,
    ),
}  # fmt: skip

# Labels of the regions a profile (`bench --profile`) times; outside a profile they cost next to nothing.
ATTENTION, MLP, HEAD = "serve/attention", "serve/mlp", "serve/head"
WAIT_ATTENTION, WAIT_MLP = "serve/wait_attn_allreduce", "serve/wait_mlp_allreduce"


class ServeError(Exception):
    """Bad input: reported as one line on stderr, with a non-zero exit."""


def load_config(model: str, layers: int | None = None) -> PretrainedConfig:
    """A named shape (all layers ladder, `layers` deep) or a checkpoint directory's config."""
    if model in SHAPES:
        depth = layers or SHAPES[model]["num_hidden_layers"]
        return LadderLlamaConfig(**{**SHAPES[model], "num_hidden_layers": depth}, ladder_layers=list(range(depth)))
    directory = Path(model)
    if not (directory / "config.json").is_file():
        raise ServeError(f"{model}: not a checkpoint directory (no config.json) nor a shape ({', '.join(SHAPES)})")
    try:  # transformers would drop repeated ladder layers silently
        raw = read_json_object(directory / "config.json", "not a checkpoint directory")
        if raw.get("model_type") == LadderLlamaConfig.model_type:
            check_ladder_layers(raw, directory / "config.json")
    except CheckpointError as error:
        raise ServeError(str(error)) from None
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in ("ladder_llama", "llama"):
        raise ServeError(f"{model}: model type {config.model_type!r} is not supported (llama or ladder_llama)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ServeError(f"{model}: attention or MLP biases are not supported")
    return config


def check_split(config: PretrainedConfig, tp: int) -> None:
    """Each rank must get whole query heads, whole KV heads and an equal share of the MLP."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp or kv_heads % tp or config.intermediate_size % tp:
        raise ServeError(
            f"tensor-parallel size {tp} does not divide the {heads} query heads, {kv_heads} KV heads and "
            f"{config.intermediate_size} MLP features: use a size that divides all three"
        )


class CheckpointWeights:
    """Reads slices of tensors from safetensors shards without ever loading a whole tensor."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", framework="pt") as shard:
                self.files = dict.fromkeys(shard.keys(), directory / "model.safetensors")
        else:
            raise ServeError(f"{directory}: no safetensors weights (model.safetensors or its index)")
        self.open_shards = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, index=slice(None)) -> torch.Tensor:
        path = self.files[name]
        if path not in self.open_shards:
            self.open_shards[path] = safe_open(path, framework="pt")
        return self.open_shards[path].get_slice(name)[index]


class RandomWeights:
    """Random slices of the tensors a named shape would have: only speed is measured on them."""

    def __init__(self, config: PretrainedConfig, dtype: torch.dtype):
        self.dtype = dtype  # drawn in the serving dtype: no float32 copy of the large embedding, even for a moment
        hidden, inner = config.hidden_size, config.intermediate_size
        head_dim = hidden // config.num_attention_heads
        per_layer = {
            "self_attn.q_proj.weight": (config.num_attention_heads * head_dim, hidden),
            "self_attn.k_proj.weight": (config.num_key_value_heads * head_dim, hidden),
            "self_attn.v_proj.weight": (config.num_key_value_heads * head_dim, hidden),
            "self_attn.o_proj.weight": (hidden, config.num_attention_heads * head_dim),
            "mlp.gate_proj.weight": (inner, hidden),
            "mlp.up_proj.weight": (inner, hidden),
            "mlp.down_proj.weight": (hidden, inner),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
        }
        # The head is tied to the embedding (absent here): it costs the same time and half the memory.
        self.shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
        for i in range(config.num_hidden_layers):
            self.shapes |= {f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def read(self, name: str, index=slice(None)) -> torch.Tensor:
        shape = torch.empty(self.shapes[name], device="meta")[index].shape
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        return torch.randn(shape, dtype=self.dtype) * 0.02


@dataclass
class KVCache:
    keys: torch.Tensor  # (batch, local KV heads, max length, head dim)
    values: torch.Tensor


class Block(nn.Module):
    """One decoder layer's slice on this rank; `attention` and `mlp` return partial sums (before the all-reduce)."""

    def __init__(self, weights, prefix: str, config: PretrainedConfig, rank: int, tp: int, dtype: torch.dtype):
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = config.num_attention_heads // tp
        self.kv_heads = config.num_key_value_heads // tp
        inner = config.intermediate_size // tp

        def rows(count):  # this rank's share of the output features
            return slice(rank * count, (rank + 1) * count)

        def read(name, index=slice(None)):
            return nn.Parameter(weights.read(prefix + name, index).to(dtype), requires_grad=False)

        q, kv = rows(self.heads * self.head_dim), rows(self.kv_heads * self.head_dim)
        # One matmul for q, k and v, and one for gate and up: fewer, larger kernels.
        self.qkv = nn.Parameter(
            torch.cat([read(f"self_attn.{p}_proj.weight", s) for p, s in (("q", q), ("k", kv), ("v", kv))]),
            requires_grad=False,
        )
        self.o = read("self_attn.o_proj.weight", (slice(None), q))
        self.gate_up = nn.Parameter(
            torch.cat([read(f"mlp.{p}_proj.weight", rows(inner)) for p in ("gate", "up")]), requires_grad=False
        )
        self.down = read("mlp.down_proj.weight", (slice(None), rows(inner)))
        self.attention_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.attention_norm.weight = read("input_layernorm.weight")
        self.mlp_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.mlp_norm.weight = read("post_attention_layernorm.weight")
        self.is_ladder = False

    @record_function(ATTENTION)
    def attention(self, x: torch.Tensor, cos_sin, cache: KVCache, start: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = F.linear(self.attention_norm(x), self.qkv).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1
        )
        q = q.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        end = start + length
        cache.keys[:, :, start:end] = k
        cache.values[:, :, start:end] = v
        # A prompt from position 0 is causal over itself; a decode step's one query sees the whole cache; a prompt's
        # later chunk (ISO) sees every key up to its own position, the earlier chunks' included. That is the causal
        # mask aligned to the bottom right, which the fused kernels take as such (a boolean mask would not be fused).
        mask = causal_lower_right(length, end) if start and length > 1 else None
        out = F.scaled_dot_product_attention(
            q, cache.keys[:, :, :end], cache.values[:, :, :end], attn_mask=mask,
            is_causal=mask is None and length > 1, enable_gqa=True,
        )  # fmt: skip
        return F.linear(out.transpose(1, 2).reshape(batch, length, -1), self.o)

    @record_function(MLP)
    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(self.mlp_norm(x), self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class Done:
    """Stands for an all-reduce that has already finished (or that `--no-comm` skips)."""

    def wait(self) -> bool:
        return True


DONE = Done()
Work = Done | dist.Work  # an all-reduce's handle


def wait(work: Work, label: str) -> None:
    """Blocks until the all-reduce `work` is done; a profile times the wait under `label` (a DONE one has none)."""
    if work is not DONE:
        with record_function(label):
            work.wait()


@dataclass
class Chunk:
    """Consecutive tokens on their way through the layers: the residual stream A (before an attention's output is
    added) and H = A + m, and the attention and MLP outputs a and m, partial sums until their all-reduce is done."""

    start: int  # the position of the first token
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    A: torch.Tensor
    m: torch.Tensor
    m_work: Work = DONE
    H: torch.Tensor | None = None
    a: torch.Tensor | None = None
    a_work: Work = DONE


def iso_split(config: PretrainedConfig, start: int, length: int) -> int:
    """How many of `length` tokens (from position `start`) go into ISO's first chunk: the two chunks then cost about
    the same FLOPs. Projections and MLP cost the same per token, but a token's attention reads every key before it,
    so the second chunk's tokens cost more and the first chunk gets more of them."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden = config.hidden_size
    projections = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * config.intermediate_size  # per token
    per_key = 2 * heads * head_dim  # multiply-adds of one query against one key: its score and its share of the sum
    costs = list(accumulate(projections + per_key * (position + 1) for position in range(start, start + length)))
    return min(range(1, length), key=lambda first: abs(2 * costs[first - 1] - costs[-1]))


class TensorParallelLlama(nn.Module):
    def __init__(self, config: PretrainedConfig, weights, rank: int, tp: int, dtype: torch.dtype, device):
        super().__init__()
        self.config, self.tp, self.dtype = config, tp, dtype
        embedding = weights.read("model.embed_tokens.weight").to(dtype)
        self.embedding = nn.Embedding.from_pretrained(embedding)
        head = weights.read("lm_head.weight").to(dtype) if "lm_head.weight" in weights else embedding
        self.head = nn.Parameter(head, requires_grad=False)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(dtype)
        self.norm.weight = nn.Parameter(weights.read("model.norm.weight").to(dtype), requires_grad=False)
        self.rotary = LlamaRotaryEmbedding(config)
        self.blocks = nn.ModuleList(
            Block(weights, f"model.layers.{i}.", config, rank, tp, dtype) for i in range(config.num_hidden_layers)
        )
        self.to(device)
        self.caches: list[KVCache] = []
        self.rewire(getattr(config, "ladder_layers", None) or [], communicate=True)

    def rewire(self, ladder_layers, communicate: bool) -> None:
        """Same weights, other wiring: `[]` is the standard model; without communication, the speed bound."""
        for i, block in enumerate(self.blocks):
            block.is_ladder = i in ladder_layers
        self.communicate = communicate and self.tp > 1

    def all_reduce(self, x: torch.Tensor) -> Work:
        """Starts summing the ranks' partial outputs into `x`, in place: `wait` for the returned handle to read `x`."""
        return dist.all_reduce(x, async_op=True) if self.communicate else DONE

    def allocate_cache(self, batch: int, length: int) -> None:
        block = self.blocks[0]
        shape = (batch, block.kv_heads, length, block.head_dim)
        device = self.head.device
        self.caches = [KVCache(*torch.empty((2, *shape), dtype=self.dtype, device=device)) for _ in self.blocks]

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: int, iso: bool = False) -> torch.Tensor:
        """The next-token logits (batch, vocab) after `ids`, whose first token sits at position `start`.

        With `iso`, several tokens go through in two chunks (ISO, arXiv 2409.11155): each chunk's all-reduces run
        while the other chunk computes. The same sums, so the same logits and KV cache up to float rounding.
        """
        length = ids.shape[1]
        first = iso_split(self.config, start, length) if iso and length > 1 else length
        chunks = [self.chunk(ids[:, :first], start)]
        if first < length:
            chunks.append(self.chunk(ids[:, first:], start + first))
        for block, cache in zip(self.blocks, self.caches):
            if block.is_ladder:
                self.ladder_layer(block, cache, chunks)
            else:
                self.standard_layer(block, cache, chunks)
        for chunk in chunks:
            wait(chunk.m_work, WAIT_MLP)
        H = chunks[-1].A + chunks[-1].m
        with record_function(HEAD):
            return F.linear(self.norm(H[:, -1]), self.head)

    def chunk(self, ids: torch.Tensor, start: int) -> Chunk:
        A = self.embedding(ids)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return Chunk(start, self.rotary(A, positions), A, m=torch.zeros_like(A))

    # Each loop runs the chunks in order, so a later chunk's attention finds the earlier chunks' keys in the cache,
    # and each chunk's all-reduce runs while the next chunk computes the same module (the last one's, while the first
    # one computes the next module). With one chunk, both are the plain wiring.

    def standard_layer(self, block: Block, cache: KVCache, chunks: list[Chunk]) -> None:
        """The attention's all-reduce is waited for before the MLP; the MLP's where H is first read."""
        for c in chunks:
            wait(c.m_work, WAIT_MLP)
            c.H = c.A + c.m
            c.a = block.attention(c.H, c.cos_sin, cache, c.start)
            c.a_work = self.all_reduce(c.a)
        for c in chunks:
            wait(c.a_work, WAIT_ATTENTION)
            c.A = c.H + c.a
            c.m = block.mlp(c.A)
            # A standard layer next waits at once; a ladder layer next runs its attention (it reads A) meanwhile,
            # so ladder layers scattered among standard ones hide as much as a contiguous block of them.
            c.m_work = self.all_reduce(c.m)

    def ladder_layer(self, block: Block, cache: KVCache, chunks: list[Chunk]) -> None:
        """H = A + m once m_work is done: a ladder MLP's output stays in flight across the next layer's attention."""
        for c in chunks:
            c.a = block.attention(c.A, c.cos_sin, cache, c.start)
            c.a_work = self.all_reduce(c.a)  # overlaps this layer's MLP
        for c in chunks:
            wait(c.m_work, WAIT_MLP)
            c.H = c.A + c.m
            c.m = block.mlp(c.H)
            c.m_work = self.all_reduce(c.m)  # overlaps the next layer's attention, which reads A only
        for c in chunks:
            wait(c.a_work, WAIT_ATTENTION)
            c.A = c.H + c.a


def load_model(model: str, config: PretrainedConfig, rank: int, tp: int, dtype: torch.dtype, device):
    """This rank's slice of `model` (a checkpoint directory or a shape name), whose config `load_config` returned."""
    check_split(config, tp)
    if model in SHAPES:
        torch.manual_seed(0)  # the same replicated embedding on every rank
    weights = RandomWeights(config, dtype) if model in SHAPES else CheckpointWeights(Path(model))
    return TensorParallelLlama(config, weights, rank, tp, dtype, device)


def greedy_steps(model: TensorParallelLlama, ids: torch.Tensor, new_tokens: int, iso: bool = False):
    """Yields each new token (batch,) with the logits it was chosen from (batch, vocab): the first after the prefill
    (in ISO's two chunks with `iso`), each later one after a decode step."""
    model.allocate_cache(ids.shape[0], ids.shape[1] + new_tokens)
    logits = model(ids, start=0, iso=iso)
    for step in range(new_tokens):
        token = logits.argmax(-1)
        yield token, logits
        if step + 1 < new_tokens:
            logits = model(token[:, None], start=ids.shape[1] + step)
