"""The adaptation recipe: one YAML file, parsed by TRL's own parser into our arguments, TRL's ModelConfig (model and
LoRA), TRL's DatasetMixtureConfig (the data) and SFTConfig (everything the trainer takes). Any key can be overridden
on the command line, in either spelling: `ladder-heal recipes/smollm2-135m.yaml --learning-rate 5e-5`.

Files a recipe names (data files, `launch_config`, `dry_run_config`, `gates_file`) resolve relative to the recipe's own
folder, so a recipe runs from anywhere; on the command line they resolve relative to the current directory.
"""

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from transformers import SchedulerType
from trl import DatasetMixtureConfig, ModelConfig, SFTConfig, TrlParser

import ladder
from ladder.checkpoint import PROVENANCE_FILE, check_apart, check_checkpoint, read_provenance, staged

PROG = "ladder-heal"
USAGE = f"usage: {PROG} RECIPE.yaml [--key value ...]  |  {PROG} --copy-recipe NAME DEST  |  {PROG} --help"
# Our keys that name files: relative to the recipe when the recipe sets them.
FILE_KEYS = ("launch_config", "dry_run_config", "gates_file")


class RecipeError(ValueError):
    """A recipe that cannot run: reported in one line before any model is loaded."""


@dataclass
class LadderArguments:
    reference: str | None = field(
        default=None, metadata={"help": "The original model (teacher and gate reference); None: the provenance's source"}
    )
    max_train_tokens: float = field(default=1e6, metadata={"help": "Stop after this many non-padding tokens"})
    train_layers: Literal["all", "ladder"] = field(
        default="all", metadata={"help": "Train every layer, or only the ladder layers (the others frozen)"}
    )
    distill_alpha: float = field(default=0.0, metadata={"help": "loss = alpha * KL(teacher||student) + (1-alpha) * CE"})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature of the distillation KL"})
    align_tokens: float = field(
        default=0, metadata={"help": "Tokens of the budget spent first on layer-wise alignment (up to 1: a share of it)"}
    )
    align_inputs: Literal["teacher", "student"] = field(
        default="teacher", metadata={"help": "Alignment feeds each ladder layer the original's streams, or its own"}
    )
    ladder_ramp: float = field(
        default=0,
        metadata={"help": "Tokens over which the ladder layers are switched on one at a time, each healed before the "
                          "next (up to 1: a share of the budget); 0: all at once"},
    )  # fmt: skip
    ladder_ramp_order: list[int] | None = field(
        default=None,
        metadata={"help": "The order the ramp switches the ladder layers on; None: the order --placement measured "
                          "added them in (the provenance), else from the top down"},
    )  # fmt: skip
    dataset_template: Literal["none", "alpaca", "sharegpt"] = field(
        default="none", metadata={"help": "none (messages or prompt/completion), alpaca or sharegpt records"}
    )
    gates_file: str | None = field(default=None, metadata={"help": "Gates YAML; None: the gates package's own"})
    gate_before: str | None = field(default=None, metadata={"help": "Gate to run on the model before training"})
    gate_after: str | None = field(default="after_adapt", metadata={"help": "Gate that decides the exit code"})
    launch_config: str | None = field(
        default=None,
        metadata={"help": "The accelerate launch config the recipe expects, which the dry run plans for; None: DDP",
                  "aliases": ["--dry_run_launch", "--dry-run-launch"]},
    )  # fmt: skip
    dry_run: bool = field(default=False, metadata={"help": "Validate the recipe and print the plan, then stop"})
    dry_run_processes: int | None = field(
        default=None, metadata={"help": "Training processes the dry run plans for; None: the launch config's num_processes"}
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
    path: Path
    resolved: dict = field(default_factory=dict)  # the keys the recipe and command line set, as the run reads them


def parser() -> TrlParser:
    return TrlParser((LadderArguments, ModelConfig, DatasetMixtureConfig, SFTConfig), exit_on_error=False)


def help_text() -> str:
    """Our keys first, with their choices; TRL's after."""
    ours = options(TrlParser(LadderArguments))
    theirs = options(TrlParser((ModelConfig, DatasetMixtureConfig, SFTConfig)))
    return (
        f"{USAGE}\n\nHeal a converted ladder model with TRL, gated before and after. Every key can be set in the "
        "recipe (key: value) or on the command line (--key value, or --key-name value).\n\n"
        f"ladder's keys:\n{ours}\nTRL's keys (ModelConfig, the dataset mixture, SFTConfig):\n{theirs}"
    )


def options(parser: TrlParser) -> str:
    """A parser's option list, without its usage line and its -h."""
    lines = parser.format_help().split("options:\n", 1)[1].splitlines(keepends=True)
    return "".join(line for line in lines if not line.lstrip().startswith("-h, --help"))


def parse_recipe(argv: list[str]) -> Recipe:
    """`RECIPE.yaml [--key value ...]`; every problem is a RecipeError."""
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise RecipeError(USAGE)
    path = Path(argv[0])
    if not path.is_file():
        raise RecipeError(f"recipe {argv[0]} does not exist")
    if "--dry_run" in argv or "--dry-run" in argv:  # a GPU recipe checked on a CPU: SFTConfig refuses bf16 there otherwise
        argv = [*argv, "--use_cpu", "true"]
    try:
        with warnings.catch_warnings():
            # TRL's SFTConfig defaults gradient_checkpointing, which transformers 5.24 renamed: not the user's doing.
            warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
            ladder, model, data, training = parser().parse_args_and_config(["--config", *argv])
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {argv[0]} is not valid YAML ({str(error).splitlines()[0]})") from None
    except (argparse.ArgumentError, ValueError, TypeError, AttributeError) as error:
        raise RecipeError(str(error).splitlines()[0]) from None
    recipe = Recipe(ladder, model, data, training, path)
    resolve_files(recipe, argv[1:])
    validate(recipe)
    recipe.resolved = resolved(recipe, argv[1:])
    return recipe


def resolve_files(recipe: Recipe, overrides: list[str]) -> None:
    """The recipe's own relative file names, made relative to its folder; command-line ones stay as given."""
    folder = recipe.path.parent

    def beside_recipe(name):
        return str(folder / name) if isinstance(name, str) and not Path(name).is_absolute() else name

    for key in FILE_KEYS:
        if not given_on_command_line(key, overrides):
            setattr(recipe.ladder, key, beside_recipe(getattr(recipe.ladder, key)))
    for dataset in recipe.data.datasets:
        files = dataset.data_files
        if isinstance(files, dict):
            dataset.data_files = {split: beside_recipe(name) for split, name in files.items()}
        elif isinstance(files, list):
            dataset.data_files = [beside_recipe(name) for name in files]
        else:
            dataset.data_files = beside_recipe(files)


def given_on_command_line(key: str, overrides: list[str]) -> bool:
    return any(key_name(arg) == key for arg in overrides if is_flag(arg))


def resolved(recipe: Recipe, overrides: list[str]) -> dict:
    """The keys the recipe and the command line set, with the values the run reads (files resolved), in one YAML."""
    given = dict.fromkeys([*yaml.safe_load(recipe.path.read_text()), *map(key_name, filter(is_flag, overrides))])
    sections = (recipe.ladder, recipe.model, recipe.training)
    settings = {key: plain(getattr(section, key)) for key in given for section in sections if hasattr(section, key)}
    return settings | {"datasets": [plain(vars(dataset)) for dataset in recipe.data.datasets]}


def is_flag(arg: str) -> bool:
    return arg.startswith("--")


def key_name(flag: str) -> str:
    """`--max-train-tokens=2e6` -> max_train_tokens; the old name dry_run_launch -> launch_config."""
    name = flag[2:].split("=", 1)[0].replace("-", "_")
    return "launch_config" if name == "dry_run_launch" else name


def plain(value):
    """`value` as YAML can write it: enums by their value, anything unknown as text."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def validate(recipe: Recipe) -> None:
    ladder = recipe.ladder
    for item in fields(ladder):  # a recipe's values reach us as argparse defaults, which it does not check
        choices = get_args(item.type) if get_origin(item.type) is Literal else ()
        if choices and getattr(ladder, item.name) not in choices:
            raise RecipeError(f"{item.name} must be one of {', '.join(choices)}, not {getattr(ladder, item.name)!r}")
    if recipe.training.push_to_hub:
        raise RecipeError(
            "push_to_hub would publish the model before its gate: publish the healed model with ladder-publish"
        )
    if not 0 <= ladder.distill_alpha <= 1:
        raise RecipeError(f"distill_alpha must be in [0, 1], not {ladder.distill_alpha}")
    if ladder.distill_temperature <= 0:
        raise RecipeError(f"distill_temperature must be positive, not {ladder.distill_temperature}")
    if not (math.isfinite(ladder.max_train_tokens) and ladder.max_train_tokens > 0):
        raise RecipeError(f"max_train_tokens must be a positive number, not {ladder.max_train_tokens}")
    for name in ("align_tokens", "ladder_ramp"):
        tokens = getattr(ladder, name)
        if not 0 <= tokens <= ladder.max_train_tokens:
            raise RecipeError(f"{name} must be in [0, max_train_tokens], not {tokens}")
        if tokens <= 1:  # a share of the budget, as transformers reads warmup_steps below 1 (1: all of it)
            setattr(ladder, name, tokens * ladder.max_train_tokens)
    if ladder.ladder_ramp and ladder.align_tokens:
        raise RecipeError("ladder_ramp and align_tokens do not combine: the ramp heals by distillation or SFT")
    if (ladder.dry_run_processes is not None and ladder.dry_run_processes < 1) or ladder.dry_run_device_gb <= 0:
        raise RecipeError("dry_run_processes and dry_run_device_gb must be positive")
    if not recipe.model.model_name_or_path:
        raise RecipeError("model_name_or_path (the converted checkpoint) is missing")
    if not recipe.data.datasets:
        raise RecipeError("datasets is empty: name at least one")
    for name in ("gate_before", "gate_after"):
        if str(getattr(ladder, name)).lower() in ("null", "none"):  # `--gate_after null` on the command line
            setattr(ladder, name, None)
    check_schedule(recipe.training)
    check_gates(ladder)
    check_files(recipe)


def check_schedule(args: SFTConfig) -> None:
    """Constant then decaying (`lr_scheduler_type: warmup_stable_decay`) needs the decay's length, which may be a
    share of the steps (below 1, as warmup_steps), resolved by `decay_steps` once the steps are known."""
    if args.lr_scheduler_type != SchedulerType.WARMUP_STABLE_DECAY:
        return
    decay = (args.lr_scheduler_kwargs or {}).get("num_decay_steps")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay <= 0:
        raise RecipeError(
            "warmup_stable_decay needs lr_scheduler_kwargs num_decay_steps: a step count, or below 1 a share of the steps"
        )


def decay_steps(args: SFTConfig, steps: int) -> None:
    """A warmup_stable_decay decay given as a share of the steps, as the step count transformers takes."""
    decay = (args.lr_scheduler_kwargs or {}).get("num_decay_steps")
    if args.lr_scheduler_type == SchedulerType.WARMUP_STABLE_DECAY and decay < 1:
        args.lr_scheduler_kwargs["num_decay_steps"] = max(1, round(decay * steps))


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
    check_checkpoint(model_dir, ladder=True)
    check_apart(Path(recipe.training.output_dir), model_dir, "output_dir")  # its checkpoints and README.md
    has_provenance = (model_dir / PROVENANCE_FILE).is_file()
    provenance = read_provenance(model_dir) if has_provenance else {}  # adapt/sft.py extends it at the end
    if not (recipe.ladder.reference or provenance):
        raise RecipeError(f"{model_dir} has no {PROVENANCE_FILE} naming its original: set reference in the recipe")
    recipe.ladder.reference = recipe.ladder.reference or provenance["source"]
    check_ramp(recipe.ladder, provenance, ladder_layers(model_dir))


def ladder_layers(model_dir: Path) -> list[int]:
    return json.loads((model_dir / "config.json").read_text()).get("ladder_layers", [])


def check_ramp(ladder: LadderArguments, provenance: dict, layers: list[int]) -> None:
    """The ramp's order, resolved; the ramp needs a checkpoint whose modules run standard wiring as the original's."""
    if not ladder.ladder_ramp:
        return
    if "fit" in provenance:
        raise RecipeError("ladder_ramp needs a model converted without --fit: the fitted modules expect the ladder "
                          "wiring's inputs from the first step")  # fmt: skip
    order = ladder.ladder_ramp_order or provenance.get("placement", {}).get("added_in_order") or sorted(layers, reverse=True)
    if sorted(order) != sorted(layers):
        raise RecipeError(f"ladder_ramp_order {order} must name each of the model's ladder layers {layers} once")
    ladder.ladder_ramp_order = order


def copy_recipe(name: str, destination: str) -> Path:
    """`--copy-recipe NAME DEST`: a shipped recipe written out to edit, its file names made absolute so that the copy
    runs from anywhere. DEST is a file, or a folder to write NAME.yaml into; an existing file is never replaced."""
    shipped = {path.stem: path for path in shipped_recipes()}
    source = shipped.get(name.removesuffix(".yaml"))
    if source is None:
        raise RecipeError(f"no recipe named {name!r}: the recipes are {', '.join(sorted(shipped))}")
    target = Path(destination)
    target = target / source.name if target.is_dir() else target
    if target.exists() or target.is_symlink():
        raise RecipeError(f"{target} exists: choose another destination")
    if not target.parent.is_dir():
        raise RecipeError(f"{target.parent}: no such directory")
    lines = [absolute_file_names(line, source.parent) for line in source.read_text().splitlines(keepends=True)]
    with staged(target, directory=False) as partial:
        partial.write_text("".join(lines))
    return target


def shipped_recipes() -> list[Path]:
    """The recipes of the installed package (ladder/recipes), or of the source checkout (recipes/) when installed
    in editable mode, which cannot import a folder without Python code as a subpackage."""
    package = Path(ladder.__file__).parent
    folder = next(path for path in (package / "recipes", package.parent / "recipes") if path.is_dir())
    return sorted(folder.glob("*.yaml"))


def absolute_file_names(line: str, folder: Path) -> str:
    """A recipe line whose file value (`data_files: ../gates/data/x.json`) names a file beside the recipe, with that
    file's absolute path instead; every other line as it is."""
    key, colon, rest = line.partition(":")
    value = rest.split("#", 1)[0].strip()
    if not colon or key.strip().lstrip("- ") not in ("data_files", *FILE_KEYS) or not value:
        return line
    found = folder / value
    return line.replace(value, str(found.resolve()), 1) if found.is_file() else line


def fail(error: Exception) -> None:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    sys.exit(2)
