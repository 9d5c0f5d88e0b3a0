"""Per-device memory of a training run, planned before anything loads, from the recipe, the launch config (an
accelerate YAML) and the number and size of the devices; `ladder-heal RECIPE --dry-run` prints it.

Parameters are counted exactly, on the model built on the meta device with the recipe's freezing and LoRA applied as
training applies them. Activations and logits are estimates of what autograd keeps at the recipe's micro-batch
(per_device_train_batch_size x max_length tokens, exact with packing); the README compares them with measured runs.
"""

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import ladder  # noqa: F401  (registers the ladder model with the Auto classes)
from ladder.adapt.recipe import Recipe, RecipeError
from ladder.adapt.trainer import CHUNK_VALUES, freeze_all_but, lora_config

GB = 1e9
# CUDA context, communication buffers and allocator slack: typically 1-3 GB per GPU.
RUNTIME_GB = 2.0
ADAM_STATES = 2  # exp_avg and exp_avg_sq, in the parameters' dtype (torch's AdamW)
ZERO_OPTIMIZER_BYTES = 12  # DeepSpeed with bf16: an fp32 master copy and two fp32 states per trainable parameter


@dataclass
class Launch:
    name: str
    processes: int
    sharded: bool  # weights, gradients and optimizer states split across the processes (FSDP full shard, ZeRO-3)
    zero: bool = False


def read_launch(path: str | None, processes: int | None) -> Launch:
    """The sharding an accelerate launch config asks for, on `processes` devices (default: the config's
    num_processes, as `accelerate launch` reads it); every config this plan cannot describe is a RecipeError."""
    if path is None:
        return replicated(processes or 1)
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise RecipeError(f"launch config {path} cannot be read ({str(error).splitlines()[0]})") from None
    config = config if isinstance(config, dict) else {}
    kind = config.get("distributed_type")
    processes = processes or config.get("num_processes") or 1
    if not isinstance(processes, int) or processes < 1:
        raise RecipeError(f"launch config {path}: num_processes {processes!r} is not a positive integer")
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        if not fsdp.get("fsdp_reshard_after_forward", True) or fsdp.get("fsdp_offload_params"):
            raise RecipeError(f"launch config {path}: the plan covers FSDP full sharding without offload only")
        return Launch("FSDP", processes, sharded=True)
    if kind == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        offload = {deepspeed.get("offload_optimizer_device", "none"), deepspeed.get("offload_param_device", "none")}
        if deepspeed.get("zero_stage") != 3 or offload != {"none"}:
            raise RecipeError(f"launch config {path}: the plan covers ZeRO stage 3 without offload only")
        return Launch("ZeRO-3", processes, sharded=True, zero=True)
    if kind in ("MULTI_GPU", "MULTI_CPU", "NO"):
        return replicated(processes)
    raise RecipeError(f"launch config {path}: distributed_type {kind!r} is not FSDP, DEEPSPEED or MULTI_GPU")


def replicated(processes: int) -> Launch:
    return Launch("DDP" if processes > 1 else "one process", processes, sharded=False)


def model_config(recipe: Recipe):
    """The architecture: the converted model's, or (a GPU recipe planned before converting) `dry_run_config`'s."""
    model_dir = Path(recipe.model.model_name_or_path)
    source = model_dir if (model_dir / "config.json").is_file() else recipe.ladder.dry_run_config
    if source is None:
        raise RecipeError(f"the memory plan needs {model_dir}/config.json: convert the model first or set dry_run_config")
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise RecipeError(f"dry_run_config {source} is not a model config ({str(error).splitlines()[0]})") from None


def parameter_counts(recipe: Recipe, config) -> dict[str, int]:
    """All parameters, the trainable ones, the teacher's and where training starts (the lowest trained layer)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = model.model.layers
    total = sum(p.numel() for p in model.parameters())
    if recipe.ladder.train_layers == "ladder":
        freeze_all_but(model, config.ladder_layers)
    peft_config = lora_config(recipe, config.ladder_layers)
    if peft_config is not None:
        with warnings.catch_warnings():  # peft 0.21 asks under transformers 5.24's old name: not the user's doing
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing", category=FutureWarning)
            model = get_peft_model(model, peft_config)
    trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    # SharedTrunkTeacher: with the trunk frozen (and no alignment, which needs every layer) the teacher keeps only the
    # layers from the first ladder layer up.
    shared = recipe.ladder.train_layers == "ladder" and recipe.ladder.align_tokens == 0
    first = min(config.ladder_layers, default=0) if shared else 0
    has_teacher = recipe.ladder.distill_alpha > 0 or recipe.ladder.align_tokens > 0
    return {
        "total": total,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "teacher": (total - sum(p.numel() for layer in layers[:first] for p in layer.parameters())) * has_teacher,
        "first_trained_layer": min(trained, default=len(layers)),
    }


def count(parameters: int) -> str:
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if parameters >= scale:
            return f"{parameters / scale:.{digits}f}{unit}"
    return str(parameters)


def dtype_bytes(dtype) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype).element_size()


@dataclass
class Shapes:
    """What the plan needs to know of a run."""

    counts: dict[str, int]
    config: object
    dtype: str  # the weights as loaded
    compute: str  # the dtype matmuls run in (bf16 under mixed precision)
    mixed_precision: bool
    tokens: int  # per micro-batch on one device
    checkpointing: bool


def run_shapes(recipe: Recipe) -> Shapes:
    args, config = recipe.training, model_config(recipe)
    dtype = recipe.model.dtype if recipe.model.dtype not in (None, "auto") else config.dtype or "float32"
    dtype = str(dtype).removeprefix("torch.")
    compute = "bfloat16" if args.bf16 else "float16" if args.fp16 else dtype
    tokens = args.per_device_train_batch_size * args.max_length
    mixed = args.bf16 or args.fp16
    return Shapes(parameter_counts(recipe, config), config, dtype, compute, mixed, tokens, args.activation_checkpointing)


def state_rows(run: Shapes, launch: Launch) -> list[tuple[str, float, str]]:
    """Weights, gradients, optimizer states and the teacher: (component, bytes per device, how it was counted)."""
    total, trainable, teacher = run.counts["total"], run.counts["trainable"], run.counts["teacher"]
    loaded, compute = dtype_bytes(run.dtype), dtype_bytes(run.compute)
    shard = launch.processes if launch.sharded else 1
    share = f"a 1/{shard} shard" if shard > 1 else "whole"
    if launch.zero:  # DeepSpeed holds the weights in the compute dtype, and an fp32 master copy with the states
        weights, gradients, optimizer = total * compute, trainable * compute, trainable * ZERO_OPTIMIZER_BYTES
        notes = (f"in {run.compute}", f"in {run.compute}", "an fp32 master copy and 2 AdamW states")
    else:  # under FSDP mixed precision accelerate upcasts the trainable parameters to fp32
        master = 4 if launch.name == "FSDP" and run.mixed_precision else loaded
        weights = (total - trainable) * loaded + trainable * master
        gradients, optimizer = trainable * master, trainable * ADAM_STATES * master
        kind = run.dtype if master == loaded else "fp32"
        upcast = ", the trainable ones upcast to fp32" if master != loaded else ""
        notes = (f"in {run.dtype}{upcast}", f"in {kind}", f"2 AdamW states in {kind}")
    teacher_share = shard if launch.zero else 1  # ZeRO-3 runs the teacher partitioned too; elsewhere it is whole
    teacher_bytes = compute if launch.zero else loaded
    return [
        ("weights", weights / shard, f"{count(total)} parameters {notes[0]}, {share}"),
        ("gradients", gradients / shard, f"{count(trainable)} trainable parameters {notes[1]}, {share}"),
        ("optimizer", optimizer / shard, f"{notes[2]}, {share}"),
        ("teacher", teacher * teacher_bytes / teacher_share,
         f"{count(teacher)} parameters in {run.compute if launch.zero else run.dtype}, " + (f"a 1/{shard} shard" if teacher_share > 1 else "whole")),
    ]  # fmt: skip


def compute_rows(run: Shapes, launch: Launch) -> list[tuple[str, float, str]]:
    """What computing a micro-batch holds besides the states."""
    config, compute = run.config, dtype_bytes(run.compute)
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or hidden // config.num_attention_heads)
    # Sharded, a unit is gathered whole to compute: the root (embeddings and head) and two layers (prefetch).
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    layer_size = (run.counts["total"] - embeddings) / layers
    gathered = (embeddings + 2 * layer_size) * compute if launch.sharded else 0
    # What autograd keeps per token in a layer: 2 norm inputs and outputs, q, k, v, the attention output, gate, up,
    # SiLU(gate) and the product; with checkpointing only the layer's two input streams, plus one layer recomputed.
    full_layer = 6 * hidden + 2 * kv + 4 * config.intermediate_size
    trained = layers - run.counts["first_trained_layer"]  # frozen layers below the first trained one keep nothing
    kept = 2 * hidden * trained + full_layer if run.checkpointing else full_layer * trained
    # Logits: the student's (kept for the loss) and their gradient, the teacher's, and the loss's fp32 working set
    # (chunked for distillation, adapt/trainer.py distillation_sums; transformers' CE upcasts them whole).
    values = run.tokens * vocab
    distilling = run.counts["teacher"] > 0
    chunk = min(values, max(1, CHUNK_VALUES // vocab) * vocab) if distilling else values
    logits = values * compute * (2 + distilling) + chunk * 4 * (3 if distilling else 2)
    return [
        ("gathered", gathered, f"embeddings, head and 2 layers whole in {run.compute} while they compute"),
        ("activations", run.tokens * kept * compute,
         f"{run.tokens:,} tokens x {trained} trained layers, checkpointing {'on' if run.checkpointing else 'off'}"),
        ("logits", logits, f"{run.tokens:,} tokens x {vocab:,} words in {run.compute}, the loss's fp32 rows"),
        ("runtime", RUNTIME_GB * GB, "CUDA context, communication buffers, allocator slack (typical)"),
    ]  # fmt: skip


def print_memory_plan(recipe: Recipe, launch: Launch) -> bool:
    """Prints the plan; True when it fits the devices."""
    ladder = recipe.ladder
    run = run_shapes(recipe)
    rows = state_rows(run, launch) + compute_rows(run, launch)
    total = sum(size for _, size, _ in rows)
    fits = total <= ladder.dry_run_device_gb * GB
    print(f"memory plan per device: {launch.name}, {launch.processes} process(es), {ladder.dry_run_device_gb:g} GB each")
    for name, size, note in rows:
        print(f"  {name:<12} {size / GB:8.2f} GB  {note}")
    verdict = "fits" if fits else f"does NOT fit (needs {math.ceil(total / GB)} GB)"
    print(f"  {'total':<12} {total / GB:8.2f} GB  of {ladder.dry_run_device_gb:g} GB: {verdict}")
    return fits
