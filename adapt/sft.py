"""`ladder-heal`: heal a converted ladder model with TRL, gated before and after.

    ladder-heal recipes/smollm2-135m.yaml [--learning-rate 5e-5 ...]             # one CPU
    accelerate launch adapt/sft.py recipes/8b.yaml                                # many GPUs (the same script)
    ladder-heal --copy-recipe smollm2-135m my-recipe.yaml                         # a shipped recipe, to edit

Training stops after `max_train_tokens` non-padding tokens. Relaunching the same command after an interruption
resumes from the last checkpoint in `output_dir`. The healed model (LoRA merged), its provenance, the gate reports
and a plot of the curves go to `output_dir/final`; the `gate_after` verdict is the exit code (0 pass, 1 fail, 2 bad
recipe, data or model, 130 interrupted, 3 an unexpected error).
"""

import math
import os
import sys
from contextlib import nullcontext
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import yaml
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import ladder.adapt.packed_attention  # noqa: F401  (registers attn_implementation "sdpa_packed")
import ladder  # noqa: F401  (registers the ladder model with the Auto classes)
from ladder.adapt.alignment import LayerAligner
from ladder.adapt.allocator import keep_freed_memory
from ladder.adapt.data import load_training_data
from ladder.adapt.launch import shard_cpu_processes
from ladder.adapt.memory_plan import print_memory_plan, read_launch
from ladder.adapt.plot import plot_curves
from ladder.adapt.recipe import (
    PROG,
    USAGE,
    Recipe,
    RecipeError,
    copy_recipe,
    decay_steps,
    fail,
    help_text,
    parse_recipe,
)
from ladder.adapt.trainer import (
    DistillingSFTTrainer,
    LadderRamp,
    SharedTrunkTeacher,
    TokenBudget,
    TrainingClock,
    freeze_all_but,
    lora_config,
    share_trunk,
)
from ladder.checkpoint import (
    PROVENANCE_FILE,
    CheckpointError,
    crashed,
    find_shards,
    output_lock,
    read_json_object,
    read_provenance,
    shard_hashes,
    shard_tensor_shapes,
    staged,
    tool_stamp,
    write_provenance,
)
RESOLVED_RECIPE = "recipe.yaml"  # in final/: the recipe as the run read it
from ladder.gates import GateUsageError, load_gates_file, run_gate
from ladder.gates.evaluate import load_chat_tokenizer
from ladder.gates.config import DEFAULT_GATES_FILE, fidelity_targets


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    keep_freed_memory()
    try:
        if argv[:1] == ["--copy-recipe"]:
            return copy_recipe_command(argv[1:])
        if "-h" in argv or "--help" in argv:
            print(help_text())
            return 0
        recipe = parse_recipe(argv)
        if recipe.ladder.dry_run:
            return dry_run(recipe)
        with output_dir_lock(Path(recipe.training.output_dir)):
            return heal(recipe, start)
    except (RecipeError, GateUsageError, CheckpointError) as error:
        fail(error)


def copy_recipe_command(argv: list[str]) -> int:
    if len(argv) != 2:
        raise RecipeError(USAGE)
    print(copy_recipe(*argv))
    return 0


def dry_run(recipe: Recipe) -> int:
    launch = read_launch(recipe.ladder.launch_config, recipe.ladder.dry_run_processes)
    # Without the data at hand, a sequence is counted at max_length (exact with packing).
    print_plan(recipe, recipe.training.max_length, launch.processes)
    if not print_memory_plan(recipe, launch):
        raise RecipeError(f"the run does not fit {recipe.ladder.dry_run_device_gb:g} GB per device (plan above)")
    return 0


def output_dir_lock(output_dir: Path):
    """The first process holds output_dir for the whole run: a second launch on it is refused at once."""
    first = int(os.environ.get("RANK", "0")) == 0
    return output_lock(output_dir, "output_dir") if first else nullcontext()


def heal(recipe: Recipe, start: float) -> int:
    if recipe.ladder.launch_config and "WORLD_SIZE" not in os.environ:
        print(f"note: this recipe expects accelerate launch --config_file {recipe.ladder.launch_config} "
              f"adapt/sft.py {recipe.path}; running as one process", flush=True)  # fmt: skip
    dataset = load_training_data(recipe.data, recipe.ladder.dataset_template)
    tokenizer = load_chat_tokenizer(Path(recipe.model.model_name_or_path), "model")
    last_checkpoint = last_complete_checkpoint(recipe.training.output_dir)
    before = gate(recipe, recipe.model.model_name_or_path, recipe.ladder.gate_before)
    shard_cpu_processes()
    trainer = build_trainer(recipe, dataset, tokenizer)
    tokens_per_sequence = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) / len(trainer.train_dataset)
    trainer.args.max_steps = print_plan(recipe, tokens_per_sequence, trainer.args.world_size)
    decay_steps(trainer.args, trainer.args.max_steps)
    if last_checkpoint:
        print(f"resuming from {last_checkpoint}")
    trainer.train(resume_from_checkpoint=last_checkpoint)
    model = whole_model(trainer, recipe)
    if model is None:  # not the first process: it writes the model and runs the gate once
        return 0

    final = save_final(model, trainer, recipe, time.perf_counter() - start)
    after = gate(recipe, final, recipe.ladder.gate_after)
    targets = fidelity_targets(load_gates_file(gates_file(recipe)).gates.get(recipe.ladder.gate_after, {}))
    plot_curves(trainer.state.log_history, before, after, targets, final / "training_curves.png")
    print(f"healed model: {final} ({time.perf_counter() - start:.0f} s)")
    return 0 if after is None or after.passed else 1


def build_trainer(recipe: Recipe, dataset, tokenizer) -> DistillingSFTTrainer:
    ladder, args = recipe.ladder, recipe.training
    args.include_num_input_tokens_seen = "non_padding"  # the token budget counts these
    if args.activation_checkpointing and args.ddp_find_unused_parameters is None:
        # transformers stops DDP searching for unused parameters under checkpointing (which the search breaks) only
        # for a plain model: with LoRA (a PeftModel) it searches, and a distillation run with alignment failed at its
        # first backward ("Expected to mark a variable ready only once").
        args.ddp_find_unused_parameters = False
    model_dir = recipe.model.model_name_or_path
    dtype = recipe.model.dtype or "auto"
    attention = recipe.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    ladder_layers = model.config.ladder_layers
    if ladder.train_layers == "ladder":
        print(f"training only the ladder layers: {freeze_all_but(model, ladder_layers):,} parameters")
    peft_config = lora_config(recipe, ladder_layers)
    teacher = aligner = None
    if ladder.distill_alpha > 0 or ladder.align_tokens > 0:
        original = AutoModelForCausalLM.from_pretrained(ladder.reference, dtype=dtype, attn_implementation=attention)
    if ladder.align_tokens > 0:
        aligner = LayerAligner(model, original, ladder_layers, ladder.align_inputs)
    if ladder.distill_alpha > 0:
        teacher = original if aligner else share_trunk(model, original)  # alignment needs every original layer
        if isinstance(teacher, SharedTrunkTeacher):
            print(f"the teacher reuses the student's frozen layers 0-{teacher.first - 1}: they run once per step")
    return DistillingSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[TokenBudget(int(ladder.max_train_tokens)), TrainingClock(), *ramp(model, ladder)],
        teacher=teacher,
        alpha=ladder.distill_alpha,
        temperature=ladder.distill_temperature,
        aligner=aligner,
        align_tokens=int(ladder.align_tokens),
    )


def ramp(model, ladder) -> list[LadderRamp]:
    """The recipe's progressive conversion, if any: the ladder layers start as standard layers."""
    if not ladder.ladder_ramp:
        return []
    layers = [model.model.layers[index] for index in ladder.ladder_ramp_order]
    print(f"ladder layers switched on one at a time over {ladder.ladder_ramp:,.0f} tokens: {ladder.ladder_ramp_order}")
    return [LadderRamp(layers, ladder.ladder_ramp)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint the Trainer finished writing, checked. It writes trainer_state.json last, so a run
    killed while saving leaves a newer folder without it, which transformers' get_last_checkpoint would pick and fail
    on."""
    finished = [state.parent for state in Path(output_dir).glob("checkpoint-*/trainer_state.json")]
    steps = {int(folder.name.removeprefix("checkpoint-")): folder for folder in finished if folder.name[11:].isdigit()}
    if not steps:
        return None
    newest, *earlier = sorted(steps, reverse=True)
    problem = checkpoint_problem(steps[newest])
    if problem:  # a relaunch would fail on it forever; it is the user's to remove
        instead = f"resume from {steps[earlier[0]].name}" if earlier else "start afresh"
        raise RecipeError(f"the latest checkpoint {steps[newest]} is corrupt ({problem}): move it out of output_dir to {instead}")
    return str(steps[newest])


def checkpoint_problem(folder: Path) -> str | None:
    """Why the Trainer could not resume from `folder`, from what can be checked without loading it."""
    try:
        read_json_object(folder / "trainer_state.json", "")
    except CheckpointError:
        return "trainer_state.json is not a JSON object"
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):  # torch.save writes zip archives
            return f"{path.relative_to(folder)} is truncated or not a torch file"
        if path.suffix == ".safetensors":
            try:
                shard_tensor_shapes(path)
            except CheckpointError:
                return f"{path.relative_to(folder)} is truncated or corrupted"
    return None


def print_plan(recipe: Recipe, tokens_per_sequence: float, processes: int) -> int:
    """The steps the token budget needs, printed before any training."""
    args, ladder = recipe.training, recipe.ladder
    budget = int(ladder.max_train_tokens)
    tokens_per_step = tokens_per_sequence * args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    planned = math.ceil(budget / tokens_per_step)
    alignment = "no layer-wise alignment"
    if ladder.align_tokens:
        alignment = f"layer-wise alignment for the first {int(ladder.align_tokens):,} tokens"
        alignment += f" ({ladder.align_inputs} inputs)"
    print(
        f"plan: {budget:,} tokens = {planned:,} steps x ~{tokens_per_step:,.0f} tokens/step "
        f"({args.per_device_train_batch_size} sequences x {args.gradient_accumulation_steps} accumulation x "
        f"{processes} process(es) x ~{tokens_per_sequence:,.0f} tokens); lr {args.learning_rate}, "
        f"train_layers {ladder.train_layers}, LoRA {'on' if recipe.model.use_peft else 'off'}, "
        f"distill_alpha {ladder.distill_alpha}, {alignment}"
    )
    return planned


def gates_file(recipe: Recipe) -> Path:
    return Path(recipe.ladder.gates_file or DEFAULT_GATES_FILE)


def gate(recipe: Recipe, candidate, name: str | None):
    return run_gate(candidate, name, recipe.ladder.reference, gates_file(recipe)) if name else None


def whole_model(trainer, recipe: Recipe):
    """The trained model, whole and with LoRA merged, on the first process; None on the others. Every process must
    call it: under FSDP or ZeRO-3 gathering the weights is a collective."""
    weights = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # the DeepSpeed engine under ZeRO-3
    first = trainer.is_world_process_zero()
    # That was the last collective: every process leaves the group now. Left to the interpreter's exit, a finished
    # rank's gloo threads once aborted it (SIGABRT) while the first process was still writing, failing the launch.
    trainer.accelerator.end_training()
    if not first:
        return None
    # From here this process runs alone: models it loads (the whole copy, the gate's) must not be partitioned across
    # processes that have finished, as transformers does under ZeRO-3.
    unset_hf_deepspeed_config()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Its parameters are this process's shards: the gathered weights go into a whole copy instead.
        whole = AutoModelForCausalLM.from_pretrained(recipe.model.model_name_or_path, dtype=model.dtype)
        if hasattr(model, "peft_config"):
            whole = get_peft_model(whole, model.peft_config["default"])
        whole.load_state_dict(weights)
        model = whole
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_final(model, trainer, recipe: Recipe, seconds: float) -> Path:
    """The healed model as a plain checkpoint, written aside and renamed into place."""
    final = Path(recipe.training.output_dir) / "final"
    source_dir = Path(recipe.model.model_name_or_path)
    adaptation = {
        "converted_model": str(source_dir.absolute()),
        "reference": recipe.ladder.reference,
        "recipe": sys.argv[1:],
        "settings": recipe.resolved,
        "data": [vars(d) for d in recipe.data.datasets],
        "template": recipe.ladder.dataset_template,
        "tokens": trainer.state.num_input_tokens_seen,
        "steps": trainer.state.global_step,
        "wall_time_s": round(seconds, 1),
        "versions": {name: version(name) for name in ("torch", "transformers", "trl", "peft", "accelerate")},
    }
    with staged(final, overwrite=True, option="output_dir") as partial:
        model.save_pretrained(partial)
        trainer.processing_class.save_pretrained(partial)
        (partial / RESOLVED_RECIPE).write_text(yaml.safe_dump(recipe.resolved, sort_keys=False))
        converted = read_provenance(source_dir) if (source_dir / PROVENANCE_FILE).is_file() else {"source": adaptation["reference"]}
        adaptation["converted_shards_sha256"] = converted.get("shards_sha256")
        weights = shard_hashes(partial, find_shards(partial))  # this model's own, as a gate report records them
        write_provenance(partial, converted | {"shards_sha256": weights, "adaptation": adaptation | tool_stamp(PROG)})
    return final


def run(argv: list[str]) -> int:
    """main, with the exit codes of the other commands: 130 interrupted, 3 an unexpected error (1 is a failed gate)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; relaunch the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as error:  # a bug of ours, or an environment we did not foresee (out of memory, ...)
        return crashed(PROG, error)


def cli() -> None:
    """The `ladder-heal` console script."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":  # `python adapt/sft.py` and `accelerate launch adapt/sft.py`
    cli()
