"""`ladder-convert SOURCE --layers N --output DIR`: rewire a Llama checkpoint's upper layers as ladder blocks.

The weights are not touched and the model is never loaded: the shards are hardlinked (copied across filesystems),
`config.json` is rewritten, and the modeling code, tokenizer, chat template and a provenance file are added.
Memory stays small whatever the model size. `--placement measured` and `--fit` load the model: the first to choose
the layers, the second to refit the ladder modules' projections (convert/fit.py), whose shards are rewritten.
Output is built in a temporary directory beside the target and renamed at the end, so a failed or interrupted run
leaves no output directory.
"""

import argparse
import re
import sys
from pathlib import Path

from ladder import LadderLlamaConfig
from ladder.checkpoint import (
    SIDE_FILES,
    SOURCE_ORIGIN,
    CheckpointError,
    Source,
    check_apart,
    check_tensors,
    check_output,
    copy_side_files,
    crashed,
    find_shards,
    first_line,
    hash_shards,
    write_shard,
    output_lock,
    read_json_object,
    read_origin,
    resolve_source,
    staged,
    tool_stamp,
    unwind_on_termination,
    verify_hub_blob,
    write_ladder_config,
    write_provenance,
)
from ladder.gates import GateUsageError, load_gates_file, run_gate
from ladder.gates.alpaca import TRAIN
from ladder.gates.config import DEFAULT_GATES_FILE

from .fit import OUTPUT_RIDGE, FitSettings, fit_checkpoint
from .placement import load_original, measured_placement

SUPPORTED_MODEL_TYPES = ("llama",)
LAYERS_HELP = "a count of top layers (16), a range (16-31) or a list (8,9,10 or 0-3,8)"


class ConvertError(CheckpointError):
    """Bad input: reported as one line, with exit code 2 and no output directory."""


class GateFailed(Exception):
    """The checkpoint was written, but its after_convert gate failed (exit code 1)."""


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`16` is the top 16 layers; `16-31`, `8,9,10` and `0-3,8` are explicit indices."""
    spec = spec.strip()
    if not spec:
        raise ConvertError(f"--layers is empty: give {LAYERS_HELP}")
    if spec.isdigit():
        count = int(spec)
        if not 1 <= count <= num_layers:
            raise ConvertError(f"--layers {count}: the model has {num_layers} layers, give a count from 1 to {num_layers}")
        return list(range(num_layers - count, num_layers))
    indices = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise ConvertError(f"--layers {spec!r} is malformed: give {LAYERS_HELP}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last >= num_layers:  # checked before the range is expanded: 0-99999999999 must not fill the memory
            raise ConvertError(f"--layers {part.strip()!r} is out of range 0-{num_layers - 1}")
        indices.update(range(first, last + 1))
    return sorted(indices)


def read_llama_config(directory: Path) -> dict:
    config_file = directory / "config.json"
    config = read_json_object(config_file, "not a transformers checkpoint")
    model_type = config.get("model_type")
    if model_type == LadderLlamaConfig.model_type:
        raise ConvertError(
            f"{directory} is already a ladder checkpoint (ladder layers {config.get('ladder_layers')}): convert the original"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if not isinstance(config.get("num_hidden_layers"), int) or config["num_hidden_layers"] < 1:
        raise ConvertError(f"{config_file} has no valid num_hidden_layers")
    return config


def write_checkpoint(
    source: Source, config: dict, layers: list[int], shards: list[str], target: Path, placement: dict | None = None,
    fitted: tuple[dict, dict] | None = None,
) -> None:
    """`fitted`: the tensors the fit changed, by name, and its record."""
    replaced = fitted[0] if fitted else {}
    how = {name: write_shard(source.directory / name, target / name, replaced) for name in shards}
    copy_side_files(source.directory, target, ("model.safetensors.index.json", *SIDE_FILES))
    write_ladder_config(target, config, layers)
    hashes = hash_shards([target / name for name in shards])
    for name, sha256 in zip(shards, hashes):
        if how[name] != "rewritten":
            verify_hub_blob(source.directory / name, sha256)
    provenance = {
        "source": source.name,
        "revision": source.revision,
        "ladder_layers": layers,
        "num_hidden_layers": config["num_hidden_layers"],
        "shards_sha256": dict(zip(shards, hashes)),
    }
    if placement:
        provenance["placement"] = placement
    if fitted:
        provenance["fit"] = fitted[1]
    if origin := read_origin(source.directory):
        provenance[SOURCE_ORIGIN] = origin
    write_provenance(target, provenance | tool_stamp("ladder-convert"))
    unchanged = [name for name in shards if how[name] != "rewritten"]
    print(f"{len(shards)} shard(s) {' and '.join(sorted(set(how.values())))}; {len(unchanged)} byte-identical to the "
          "source", file=sys.stderr)  # fmt: skip


def convert(
    source: str,
    layers_spec: str,
    output: Path,
    overwrite: bool = False,
    revision: str | None = None,
    gates_file: Path | None = None,
    placement: str = "top",
    calibration_chats: int = 8,
    fit: FitSettings | None = None,
) -> Path:
    """Write the ladder checkpoint; with `gates_file`, also judge it with the `after_convert` gate (report inside).
    `placement`: with a count of layers, `top` rewires the top ones (the paper's choice), `measured` the ones whose
    rewiring moves the output least (convert/placement.py). `fit`: refit the ladder modules (convert/fit.py).

    Returns the output directory, or raises GateFailed (after writing it) when the gate fails.
    """
    output = Path(output).expanduser().absolute()
    check_output(output, overwrite, "--output")
    if gates_file:
        check_gates_file(gates_file)
    resolved = resolve_source(source, revision)
    check_apart(output, resolved.directory, "--output")
    config = read_llama_config(resolved.directory)
    layers = parse_layers(layers_spec, config["num_hidden_layers"])
    if placement == "measured" and not layers_spec.strip().isdigit():
        raise ConvertError(f"--placement measured chooses the layers itself: give --layers a count, not {layers_spec!r}")
    if placement == "measured" and not 1 <= calibration_chats <= TRAIN.stop:
        raise ConvertError(f"--calibration-chats must be from 1 to {TRAIN.stop} (Alpaca's training rows), not {calibration_chats}")
    if fit and not 1 <= fit.chats <= TRAIN.stop:
        raise ConvertError(f"--fit-chats must be from 1 to {TRAIN.stop} (Alpaca's training rows), not {fit.chats}")
    if fit and not fit.ridge > 0:
        raise ConvertError(f"--fit-ridge must be above 0, not {fit.ridge}")
    if fit and fit.output_ridge is not None and not fit.output_ridge > 0:
        raise ConvertError(f"--fit-output-ridge must be above 0, not {fit.output_ridge}")
    shards = find_shards(resolved.directory)
    check_tensors(resolved.directory, shards, config)
    with output_lock(output, "--output"):
        check_output(output, overwrite, "--output")  # again: a run of ours may have written it meanwhile
        measured = fitted = None
        if placement == "measured" or fit:
            model, tokenizer = load_original(resolved.directory, config)
        if placement == "measured":
            layers, measured = measured_placement(model, tokenizer, len(layers), calibration_chats)
        if fit:
            fitted = fit_checkpoint(model, tokenizer, layers, fit)
        with staged(output, overwrite=overwrite) as staging:
            write_checkpoint(resolved, config, layers, shards, staging, measured, fitted)
        # The checkpoint is complete: a failed gate, or one that cannot run, leaves it in place with the reason.
        verdict = run_after_convert_gate(output, resolved, gates_file) if gates_file else None
    if verdict and not verdict.passed:
        raise GateFailed(f"{output} was written, but its after_convert gate failed on: {', '.join(verdict.failing)}")
    return output


def check_gates_file(gates_file: Path) -> None:
    """Before any work: a malformed gates file, or one without an after_convert gate, is bad input."""
    try:
        gates = load_gates_file(gates_file)
    except GateUsageError as error:
        raise ConvertError(str(error)) from None
    if "after_convert" not in gates.gates:
        raise ConvertError(f"{gates_file} defines no after_convert gate (or pass --no-eval)")


def run_after_convert_gate(candidate: Path, source: Source, gates_file: Path):
    try:
        return run_gate(candidate, "after_convert", str(source.directory), gates_file)
    except Exception as error:  # bad input, or a crash (out of memory, ...): exit code 2, never "gate failed"
        raise ConvertError(f"{candidate} was written, but its after_convert gate could not run: {first_line(error)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hub model id (e.g. meta-llama/Llama-3.1-8B-Instruct) or local checkpoint dir")
    parser.add_argument("--layers", required=True, help=f"ladder layers: {LAYERS_HELP}")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    parser.add_argument("--gates-file", type=Path, default=None, help="suite and thresholds (default: gates' own)")
    parser.add_argument("--no-eval", action="store_true", help="skip the after_convert gate")
    parser.add_argument("--placement", choices=["top", "measured"], default="top",
                        help="with a count: the top layers (default), or those measured to hurt least (loads the model)")
    parser.add_argument("--calibration-chats", type=int, default=8, metavar="N",
                        help="training chats --placement measured measures on (default 8)")
    parser.add_argument("--fit", action="store_true",
                        help="refit each ladder module's input projections by least squares (loads the model)")
    parser.add_argument("--fit-chats", type=int, default=FitSettings.chats, metavar="N",
                        help=f"training chats --fit fits on (default {FitSettings.chats})")
    parser.add_argument("--fit-ridge", type=float, default=FitSettings.ridge, metavar="R",
                        help=f"the input fits' pull towards the unfitted module (default {FitSettings.ridge})")
    parser.add_argument("--fit-outputs", action="store_true",
                        help="--fit also refits o_proj and down_proj towards the original's streams")
    parser.add_argument("--fit-output-ridge", type=float, default=OUTPUT_RIDGE, metavar="R",
                        help=f"--fit-outputs' pull towards the unfitted weights (default {OUTPUT_RIDGE})")
    args = parser.parse_args(argv)
    output_ridge = args.fit_output_ridge if args.fit_outputs else None
    fit = FitSettings(args.fit_chats, args.fit_ridge, output_ridge) if args.fit else None
    gates_file = None if args.no_eval else (args.gates_file or DEFAULT_GATES_FILE)
    try:
        with unwind_on_termination():
            output = convert(args.source, args.layers, args.output, args.overwrite, args.revision, gates_file,
                             args.placement, args.calibration_chats, fit)  # fmt: skip
    except GateFailed as failure:
        print(f"ladder-convert: {failure}", file=sys.stderr)
        return 1
    except (CheckpointError, OSError) as error:  # OSError: an unreadable source, a full disk, ...
        print(f"ladder-convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ladder-convert: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    except Exception as error:  # a bug of ours, or an environment we did not foresee
        return crashed("ladder-convert", error)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
