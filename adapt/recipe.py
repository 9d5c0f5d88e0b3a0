"""The adaptation recipe: one YAML file, parsed by TRL's own parser into our arguments, TRL's ModelConfig (model and
LoRA), TRL's DatasetMixtureConfig (the data) and SFTConfig (everything the trainer takes). Any key can be overridden
on the command line: `python adapt/sft.py recipes/smollm2-135m.yaml --learning_rate 5e-5`.
"""

import argparse
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import DatasetMixtureConfig, ModelConfig, SFTConfig, TrlParser

from ladder.adapt.alignment import INPUTS
from ladder.checkpoint import (
    PROVENANCE_FILE,
    check_apart,
    check_tensors,
    find_shards,
    read_ladder_config,
    read_provenance,
    side_files,
)

TEMPLATES = ("none", "alpaca", "sharegpt")


class RecipeError(ValueError):
    """A recipe that cannot run: reported in one line before any model is loaded."""


@dataclass
class LadderArguments:
    reference: str | None = field(
        default=None, metadata={"help": "The original model (teacher and gate reference); default: the provenance"}
    )
    max_train_tokens: float = field(default=1e6, metadata={"help": "Stop after this many non-padding tokens"})
    train_layers: str = field(default="all", metadata={"help": "all, or ladder: freeze everything else"})
    distill_alpha: float = field(default=0.0, metadata={"help": "loss = alpha * KL(teacher||student) + (1-alpha) * CE"})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the distillation KL"})
    align_tokens: float = field(
        default=0, metadata={"help": "Tokens of the budget spent first on layer-wise alignment (below 1: a share of it)"}
    )
    align_inputs: str = field(default="teacher", metadata={"help": "teacher: forced with the original's streams; student"})
    dataset_template: str = field(default="none", metadata={"help": "none (messages or prompt/completion), alpaca or sharegpt"})
    gates_file: str | None = field(default=None, metadata={"help": "Gates YAML (default: the gates package's own)"})
    gate_before: str | None = field(default=None, metadata={"help": "Gate to run on the model before training"})
    gate_after: str | None = field(default="after_adapt", metadata={"help": "Gate that decides the exit code"})
    dry_run: bool = field(default=False, metadata={"help": "Validate the recipe and print the plan, then stop"})
    dry_run_processes: int = field(default=1, metadata={"help": "Training processes the dry-run plan assumes"})
    dry_run_launch: str | None = field(
        default=None, metadata={"help": "The accelerate launch config the memory plan assumes (default: DDP)"}
    )
    dry_run_device_gb: float = field(default=80.0, metadata={"help": "Memory of each device the memory plan assumes"})
    dry_run_config: str | None = field(
        default=None, metadata={"help": "config.json the memory plan reads while the model is not converted yet"}
    )


@dataclass
class Recipe:
    ladder: LadderArguments
    model: ModelConfig
    data: DatasetMixtureConfig
    training: SFTConfig


def parse_recipe(argv: list[str]) -> Recipe:
    """`RECIPE.yaml [--key value ...]`; every problem is a RecipeError."""
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise RecipeError("usage: adapt/sft.py RECIPE.yaml [--key value ...]")
    if not Path(argv[0]).is_file():
        raise RecipeError(f"recipe {argv[0]} does not exist")
    parser = TrlParser((LadderArguments, ModelConfig, DatasetMixtureConfig, SFTConfig), exit_on_error=False)
    if "--dry_run" in argv:  # a GPU recipe checked on a CPU machine: SFTConfig refuses bf16 there otherwise
        argv = [*argv, "--use_cpu", "true"]
    try:
        with warnings.catch_warnings():
            # TRL's SFTConfig defaults gradient_checkpointing, which transformers 5.24 renamed: not the user's doing.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            ladder, model, data, training = parser.parse_args_and_config(["--config", *argv])
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {argv[0]} is not valid YAML ({str(error).splitlines()[0]})") from None
    except (argparse.ArgumentError, ValueError, TypeError, AttributeError) as error:
        raise RecipeError(str(error).splitlines()[0]) from None
    recipe = Recipe(ladder, model, data, training)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    ladder = recipe.ladder
    if ladder.train_layers not in ("all", "ladder"):
        raise RecipeError(f"train_layers must be 'all' or 'ladder', not {ladder.train_layers!r}")
    if ladder.dataset_template not in TEMPLATES:
        raise RecipeError(f"dataset_template must be one of {', '.join(TEMPLATES)}, not {ladder.dataset_template!r}")
    if not 0 <= ladder.distill_alpha <= 1:
        raise RecipeError(f"distill_alpha must be in [0, 1], not {ladder.distill_alpha}")
    if ladder.distill_temperature <= 0:
        raise RecipeError(f"distill_temperature must be positive, not {ladder.distill_temperature}")
    if not (math.isfinite(ladder.max_train_tokens) and ladder.max_train_tokens > 0):
        raise RecipeError(f"max_train_tokens must be a positive number, not {ladder.max_train_tokens}")
    if not 0 <= ladder.align_tokens <= ladder.max_train_tokens:
        raise RecipeError(f"align_tokens must be in [0, max_train_tokens], not {ladder.align_tokens}")
    if ladder.align_tokens < 1:  # a share of the budget, as transformers reads warmup_steps below 1
        ladder.align_tokens = ladder.align_tokens * ladder.max_train_tokens
    if ladder.dry_run_processes < 1 or ladder.dry_run_device_gb <= 0:
        raise RecipeError("dry_run_processes and dry_run_device_gb must be positive")
    if ladder.align_inputs not in INPUTS:
        raise RecipeError(f"align_inputs must be one of {', '.join(INPUTS)}, not {ladder.align_inputs!r}")
    if not recipe.model.model_name_or_path:
        raise RecipeError("model_name_or_path (the converted checkpoint) is missing")
    if not recipe.data.datasets:
        raise RecipeError("datasets is empty: name at least one")
    for name in ("gate_before", "gate_after"):
        if str(getattr(ladder, name)).lower() in ("null", "none"):  # `--gate_after null` on the command line
            setattr(ladder, name, None)
    check_gates(ladder)
    check_files(recipe)


def check_gates(ladder: LadderArguments) -> None:
    from ladder.gates import GateUsageError, load_gates_file
    from ladder.gates.config import DEFAULT_GATES_FILE

    try:
        defined = load_gates_file(ladder.gates_file or DEFAULT_GATES_FILE).gates
    except GateUsageError as error:
        raise RecipeError(str(error)) from None
    for gate in filter(None, (ladder.gate_before, ladder.gate_after)):
        if gate not in defined:
            raise RecipeError(f"gate {gate!r} is not in the gates file (defined: {', '.join(defined)})")


def check_files(recipe: Recipe) -> None:
    """The converted model and the local data exist and are what they should be. A dry run may plan for a model that
    is not converted yet (a GPU recipe checked on a laptop); a model that exists must be a ladder checkpoint."""
    for dataset in recipe.data.datasets:
        files = dataset.data_files
        for file in [files] if isinstance(files, str) else list(files.values() if isinstance(files, dict) else files or []):
            if not Path(file).is_file():
                raise RecipeError(f"dataset file {file} does not exist")
    model_dir = Path(recipe.model.model_name_or_path)
    if recipe.ladder.dry_run and not model_dir.exists():
        print(f"note: {model_dir} does not exist yet: the plan assumes it will be converted first")
        return
    config = read_ladder_config(model_dir)
    check_tensors(model_dir, find_shards(model_dir), config)
    side_files(model_dir)
    check_apart(Path(recipe.training.output_dir), model_dir, "output_dir")  # its checkpoints and README.md
    has_provenance = (model_dir / PROVENANCE_FILE).is_file()
    provenance = read_provenance(model_dir) if has_provenance else {}  # adapt/sft.py extends it at the end
    if not (recipe.ladder.reference or provenance):
        raise RecipeError(f"{model_dir} has no {PROVENANCE_FILE} naming its original: set reference in the recipe")
    recipe.ladder.reference = recipe.ladder.reference or provenance["source"]


def fail(error: Exception) -> None:
    print(f"adapt/sft.py: error: {error}", file=sys.stderr)
    sys.exit(2)
