"""`ladder-convert SOURCE --layers N --output DIR`: rewire a Llama checkpoint's upper layers as ladder blocks.

The weights are not touched and the model is never loaded: the shards are hardlinked (copied across filesystems),
`config.json` is rewritten, and the modeling code, tokenizer, chat template and a provenance file are added.
Memory stays small whatever the model size. Output is built in a temporary directory beside the target and renamed
at the end, so a failed or interrupted run leaves no output directory.
"""

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from . import __version__
from .configuration_ladder_llama import LadderLlamaConfig

SUPPORTED_MODEL_TYPES = ("llama",)
MODELING_FILES = ("configuration_ladder_llama.py", "modeling_ladder_llama.py")
PROVENANCE_FILE = "ladder_provenance.json"
# Everything a user needs beside the weights; Meta's `original/` folder and pickled weights stay behind.
SIDE_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.model",
    "chat_template.json", "chat_template.jinja", "generation_config.json", "LICENSE*", "USE_POLICY*", "NOTICE*",
)  # fmt: skip
HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SHA256_NAME = re.compile(r"[0-9a-f]{64}")
LAYERS_HELP = "a count of top layers (16), a range (16-31) or a list (8,9,10 or 0-3,8)"


class ConvertError(Exception):
    """Bad input: reported as one line, with a non-zero exit and no output directory."""


class GateFailed(Exception):
    """The checkpoint was written, but its after_convert gate failed (exit code 1)."""


@dataclass
class Source:
    directory: Path
    name: str  # Hub id or absolute path, as recorded in the provenance
    revision: str | None


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
        indices.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    outside = sorted(i for i in indices if i >= num_layers)
    if outside:
        raise ConvertError(f"--layers {spec!r}: layers {outside} are out of range 0-{num_layers - 1}")
    return sorted(indices)


def resolve_source(source: str, revision: str | None) -> Source:
    path = Path(source).expanduser()
    if path.is_dir():
        return Source(path.resolve(), str(path.resolve()), None)
    if path.exists():
        raise ConvertError(f"{source} is a file, not a checkpoint directory")
    if not HUB_ID.fullmatch(source):
        raise ConvertError(f"{source}: no such directory")
    return download_from_hub(source, revision)


def download_from_hub(repo_id: str, revision: str | None) -> Source:
    """Download what conversion needs (never pickled weights); huggingface_hub reads HF_TOKEN itself."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        directory = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS)))
    except GatedRepoError:
        raise ConvertError(
            f"{repo_id} is gated: accept its license on its Hub page, then set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise ConvertError(f"{repo_id} is not a local directory nor a Hub repository you can see (private? set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise ConvertError(f"{repo_id} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise ConvertError(
            f"{repo_id} is not a local directory, and the Hugging Face Hub cannot be reached (offline) "
            "nor has it in its local cache: download it where the Hub is reachable, or pass a local checkpoint directory"
        ) from None
    except HfHubHTTPError as error:
        raise ConvertError(f"{repo_id}: the Hub answered {str(error).splitlines()[0]}") from None
    return Source(directory, repo_id, directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else revision)


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in `path`; `missing` says what its absence means."""
    if not path.is_file():
        raise ConvertError(f"{path.parent} has no {path.name}: {missing}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConvertError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return content


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


def find_shards(directory: Path) -> list[str]:
    """The safetensors shard names, from the index when there is one."""
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            shards = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise ConvertError(f"{index_file} is not a valid safetensors index") from None
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(fnmatch.fnmatch(f.name, p) for f in directory.iterdir() for p in PICKLE_WEIGHTS):
        raise ConvertError(
            f"{directory} has only pickled weights (.bin/.pt), which ladder-convert refuses to unpickle: "
            "save the model with safetensors first (model.save_pretrained(dir) does)"
        )
    else:
        raise ConvertError(f"{directory} has no weights (model.safetensors or model.safetensors.index.json)")
    missing = [name for name in shards if not (directory / name).is_file()]
    if missing:
        raise ConvertError(f"{directory} is missing shards {missing} named in its index")
    return shards


def read_shard_tensor_names(path: Path) -> set[str]:
    """Check a shard's header against its size (catches truncation and a corrupted header) and list its tensors."""
    size = path.stat().st_size
    with open(path, "rb") as shard:
        header_size = int.from_bytes(shard.read(8), "little")
        try:
            if size < 8 or header_size > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(shard.read(header_size))
            data_size = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
            raise ConvertError(f"{path.name} is not a valid safetensors file ({error})") from None
    if 8 + header_size + data_size != size:
        raise ConvertError(
            f"{path.name} is truncated or corrupted: its header describes {8 + header_size + data_size} bytes, "
            f"the file has {size}"
        )
    return {name for name in header if name != "__metadata__"}


def check_layer_tensors(tensor_names: set[str], num_layers: int) -> None:
    found = {int(m[1]) for name in tensor_names if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if found != set(range(num_layers)):
        raise ConvertError(f"the shards hold {len(found)} decoder layers, config.json says num_hidden_layers={num_layers}")


def sha256_of(path: Path, progress: tqdm) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)  # releases the GIL: shards hash in parallel threads
            progress.update(len(chunk))
    return digest.hexdigest()


def hash_shards(paths: list[Path]) -> list[str]:
    total = sum(p.stat().st_size for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256 of shards") as progress:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda p: sha256_of(p, progress), paths))


def verify_hub_blob(source_path: Path, sha256: str) -> None:
    """A Hub cache stores each weight file under its sha256: a mismatch means the cached download is corrupted."""
    blob_name = Path(os.path.realpath(source_path)).name
    if SHA256_NAME.fullmatch(blob_name) and blob_name != sha256:
        raise ConvertError(f"{source_path.name} is corrupted: its sha256 is {sha256}, the Hub says {blob_name}")


def link_or_copy(source: Path, target: Path) -> str:
    real_source = os.path.realpath(source)  # Hub cache snapshots hold symlinks to blobs
    try:
        os.link(real_source, target)
        return "hardlinked"
    except OSError:  # another filesystem, or one without hardlinks
        shutil.copyfile(real_source, target)
        return "copied"


def ladder_config(config: dict, layers: list[int]) -> dict:
    return {
        **config,
        "model_type": LadderLlamaConfig.model_type,
        "architectures": ["LadderLlamaForCausalLM"],
        "ladder_layers": layers,
        "auto_map": {
            "AutoConfig": "configuration_ladder_llama.LadderLlamaConfig",
            "AutoModelForCausalLM": "modeling_ladder_llama.LadderLlamaForCausalLM",
        },
    }


def write_checkpoint(source: Source, config: dict, layers: list[int], shards: list[str], target: Path) -> None:
    how = {link_or_copy(source.directory / name, target / name) for name in shards}
    index = source.directory / "model.safetensors.index.json"
    if index.is_file():
        shutil.copyfile(index, target / index.name)
    for side_file in sorted(source.directory.iterdir()):
        if side_file.is_file() and any(fnmatch.fnmatch(side_file.name, p) for p in SIDE_FILES):
            shutil.copyfile(side_file, target / side_file.name)
    for name in MODELING_FILES:
        shutil.copyfile(Path(__file__).with_name(name), target / name)
    (target / "config.json").write_text(json.dumps(ladder_config(config, layers), indent=2, sort_keys=True) + "\n")

    hashes = hash_shards([target / name for name in shards])
    for name, sha256 in zip(shards, hashes):
        verify_hub_blob(source.directory / name, sha256)
    provenance = {
        "source": source.name,
        "revision": source.revision,
        "ladder_layers": layers,
        "num_hidden_layers": config["num_hidden_layers"],
        "shards_sha256": dict(zip(shards, hashes)),
        "tool": "ladder-convert",
        "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (target / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"{len(shards)} shard(s) {' and '.join(sorted(how))}, byte-identical to the source", file=sys.stderr)


def convert(
    source: str,
    layers_spec: str,
    output: Path,
    overwrite: bool = False,
    revision: str | None = None,
    gates_file: Path | None = None,
) -> Path:
    """Write the ladder checkpoint; with `gates_file`, also judge it with the `after_convert` gate (report inside).

    Returns the output directory, or raises GateFailed (after writing it) when the gate fails.
    """
    output = Path(output).expanduser().absolute()
    if output.exists() and not overwrite:
        raise ConvertError(f"{output} already exists: pass --overwrite to replace it")
    if gates_file:
        check_gates_file(gates_file)
    resolved = resolve_source(source, revision)
    if output.resolve() == resolved.directory:
        raise ConvertError("--output is the source directory itself: choose another one")
    config = read_llama_config(resolved.directory)
    layers = parse_layers(layers_spec, config["num_hidden_layers"])
    shards = find_shards(resolved.directory)
    tensor_names = set().union(*(read_shard_tensor_names(resolved.directory / name) for name in shards))
    check_layer_tensors(tensor_names, config["num_hidden_layers"])

    staging = staging_directory(output)
    try:
        write_checkpoint(resolved, config, layers, shards, staging)
        verdict = run_after_convert_gate(staging, resolved, gates_file, label=str(output)) if gates_file else None
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if verdict and not verdict.passed:
        raise GateFailed(f"{output} was written, but its after_convert gate failed on: {', '.join(verdict.failing)}")
    return output


def check_gates_file(gates_file: Path) -> None:
    """Before any work: a malformed gates file, or one without an after_convert gate, is bad input."""
    from gates import GateUsageError, load_gates_file

    try:
        gates = load_gates_file(gates_file)
    except GateUsageError as error:
        raise ConvertError(str(error)) from None
    if "after_convert" not in gates.gates:
        raise ConvertError(f"{gates_file} defines no after_convert gate (or pass --no-eval)")


def run_after_convert_gate(candidate: Path, source: Source, gates_file: Path, label: str):
    from gates import GateUsageError, run_gate

    try:
        return run_gate(candidate, "after_convert", str(source.directory), gates_file, label=label)
    except GateUsageError as error:
        raise ConvertError(f"after_convert gate: {error}") from None


def default_gates_file() -> Path:
    from gates.config import DEFAULT_GATES_FILE

    return DEFAULT_GATES_FILE


def staging_directory(output: Path) -> Path:
    """A hidden temporary directory beside `output` (same filesystem: shards hardlink, the final rename is atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the output is an ordinary directory
    return staging


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def replace_directory(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`; an existing `output` (only with --overwrite) goes only once the new one is in."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(retired)
    staging.rename(output)
    shutil.rmtree(retired)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="Hub model id (e.g. meta-llama/Llama-3.1-8B-Instruct) or local checkpoint dir")
    parser.add_argument("--layers", required=True, help=f"ladder layers: {LAYERS_HELP}")
    parser.add_argument("--output", required=True, type=Path, help="directory to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    parser.add_argument("--gates-file", type=Path, default=None, help="suite and thresholds (default: gates' own)")
    parser.add_argument("--no-eval", action="store_true", help="skip the after_convert gate")
    args = parser.parse_args(argv)
    gates_file = None if args.no_eval else (args.gates_file or default_gates_file())
    try:
        output = convert(args.source, args.layers, args.output, args.overwrite, args.revision, gates_file)
    except GateFailed as failure:
        print(f"ladder-convert: {failure}", file=sys.stderr)
        return 1
    except ConvertError as error:
        print(f"ladder-convert: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unreadable source, full disk, ...
        print(f"ladder-convert: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ladder-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
