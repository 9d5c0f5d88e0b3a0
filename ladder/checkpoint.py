"""Checkpoint I/O that every stage shares: where a checkpoint comes from (a directory or the Hub), its safetensors
shards and their hashes, the ladder `config.json`, `ladder_provenance.json`, and writing an output atomically.

Every problem with a checkpoint is a `CheckpointError`: one line for the user, exit code 2 in every command.
"""

import ctypes
import errno
import fcntl
import fnmatch
import glob
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import LadderLlamaConfig, __version__, cache_root

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODELING_FILES = ("configuration_ladder_llama.py", "modeling_ladder_llama.py")  # shipped as remote code
MODEL_CODE_DIR = Path(inspect.getfile(LadderLlamaConfig)).parent  # where the installed package keeps them
PROVENANCE_FILE = "ladder_provenance.json"
# Beside an original that is not its Hub weights (ladder-fetch-smollm2's dequantized GGUF): what it was made from.
# ladder-convert copies it into the provenance under SOURCE_ORIGIN, and the model card says so.
ORIGIN_FILE = "ladder_origin.json"
SOURCE_ORIGIN = "source_origin"
# Everything a user needs beside the weights, by name; Meta's `original/` folder and pickled weights stay behind.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "chat_template.json", "chat_template.jinja",
    "generation_config.json", "LICENSE*", "USE_POLICY*", "NOTICE*",
)  # fmt: skip
# The only extensions a side file may have: data and text, never code (our model code is written by us).
SIDE_SUFFIXES = ("", ".json", ".txt", ".md", ".model", ".jinja", ".png")
HUB_PATTERNS = ("config.json", "*.safetensors", "model.safetensors.index.json", *SIDE_FILES)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
SHA256_NAME = re.compile(r"[0-9a-f]{64}")
AT_FDCWD, RENAME_NOREPLACE = -100, 1  # <fcntl.h>, <linux/fs.h>


class CheckpointError(ValueError):
    """A missing, malformed or unreachable checkpoint: reported as one line, exit code 2."""


def first_line(error: BaseException) -> str:
    """An exception as one line: the first of its message, or its type when it has none."""
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@dataclass
class Source:
    directory: Path
    name: str  # Hub id or absolute path, as recorded in the provenance
    revision: str | None


def resolve_source(source: str, revision: str | None = None) -> Source:
    """A local checkpoint directory, or a Hub id downloaded (or found in the local Hub cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Source(path.resolve(), str(path.resolve()), None)
    if path.exists():
        raise CheckpointError(f"{source} is a file, not a checkpoint directory")
    if not HUB_ID.fullmatch(source):
        raise CheckpointError(f"{source}: no such directory")
    return download_from_hub(source, revision)


def download_from_hub(repo_id: str, revision: str | None) -> Source:
    """Download what the stages need (never pickled weights); huggingface_hub reads HF_TOKEN itself."""
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
        raise CheckpointError(
            f"{repo_id} is gated: accept its license on its Hub page, then set HF_TOKEN to a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id} is not a local directory nor a Hub repository you can see (private? set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise CheckpointError(
            f"{repo_id} is not a local directory, and the Hugging Face Hub cannot be reached (offline) "
            "nor has it in its local cache: download it where the Hub is reachable, or pass a local checkpoint directory"
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"{repo_id}: the Hub answered {str(error).splitlines()[0]}") from None
    return Source(directory, repo_id, directory.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else revision)


def read_json_object(path: Path, missing: str) -> dict:
    """The JSON object in `path`; `missing` says what its absence means."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path.parent} has no {path.name}: {missing}")
    try:
        content = json.loads(checked_file(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return content


def find_shards(directory: Path) -> list[str]:
    """The safetensors shard names, from the index when there is one."""
    index_file = directory / "model.safetensors.index.json"
    if os.path.lexists(index_file):
        shards = sorted(set(read_weight_map(directory).values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    elif any(fnmatch.fnmatch(f.name, p) for f in directory.iterdir() for p in PICKLE_WEIGHTS):
        raise CheckpointError(
            f"{directory} has only pickled weights (.bin/.pt), which ladder refuses to unpickle: "
            "save the model with safetensors first (model.save_pretrained(dir) does)"
        )
    else:
        raise CheckpointError(f"{directory} has no weights (model.safetensors or model.safetensors.index.json)")
    escaping = [name for name in shards if Path(name).name != name or name in (".", "..")]
    if escaping:  # a file name in the directory, nothing else: "../x" would be read from, and written, outside it
        raise CheckpointError(f"{index_file} names shards outside the checkpoint directory: {escaping[:3]}")
    missing = [name for name in shards if not os.path.lexists(directory / name)]
    if missing:
        raise CheckpointError(f"{directory} is missing shards {missing} named in its index")
    for name in shards:
        checked_file(directory / name)
    return shards


def read_weight_map(directory: Path) -> dict[str, str]:
    """The index's {tensor name: shard name}."""
    index_file = directory / "model.safetensors.index.json"
    weight_map = read_json_object(index_file, "").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file} is not a valid safetensors index (weight_map: tensor name -> shard name)")
    return weight_map


def shard_tensor_shapes(path: Path) -> dict[str, list[int]]:
    """The tensors in a shard and their shapes, from its header. safetensors checks the header, and that it covers
    the file exactly (truncation)."""
    try:
        with safe_open(path, framework="pt") as shard:
            return {name: shard.get_slice(name).get_shape() for name in shard.keys()}
    except SafetensorError as error:
        raise CheckpointError(f"{path.name} is truncated or corrupted, not a valid safetensors file ({error})") from None


def check_tensors(directory: Path, shards: list[str], config: dict) -> None:
    """From the shards' headers, no weight loaded: every shard is sound, no tensor is in two shards, the index says
    where each tensor is, and the shards hold exactly the decoder layers config.json declares, in its shapes."""
    expected = expected_shapes(config)
    where: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        for name, shape in shard_tensor_shapes(directory / shard).items():
            if name in where:
                raise CheckpointError(f"tensor {name} is in two shards, {where[name]} and {shard}")
            where[name], shapes[name] = shard, shape
    if os.path.lexists(directory / "model.safetensors.index.json"):
        check_index(read_weight_map(directory), where)
    num_layers = config["num_hidden_layers"]
    found = {int(m[1]) for name in where if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if found != set(range(num_layers)):
        raise CheckpointError(f"the shards hold {len(found)} decoder layers, config.json says num_hidden_layers={num_layers}")
    for name, shape in expected.items():
        if name in shapes and list(shapes[name]) != list(shape):
            raise CheckpointError(f"tensor {name} has shape {list(shapes[name])}, config.json implies {list(shape)}")


def check_index(weight_map: dict[str, str], where: dict[str, str]) -> None:
    """The index names every tensor of the shards, each in the shard that holds it."""
    for name, shard in weight_map.items():
        if where.get(name) != shard:
            raise CheckpointError(f"the index puts tensor {name} in {shard}, which does not hold it")
    unindexed = sorted(set(where) - set(weight_map))
    if unindexed:
        raise CheckpointError(f"tensor {unindexed[0]} of {where[unindexed[0]]} is not in the index")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The Llama weights' shapes that config.json implies."""
    keys = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_hidden_layers")
    bad = [key for key in keys if not positive_int(config.get(key))]
    if bad:
        raise CheckpointError(f"config.json has no valid {bad[0]} (a positive integer)")
    hidden, inner, vocab, heads, num_layers = (config[key] for key in keys)
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "mlp.gate_proj.weight": (inner, hidden), "mlp.up_proj.weight": (inner, hidden), "mlp.down_proj.weight": (hidden, inner),
    }  # fmt: skip
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for index in range(num_layers):
        shapes |= {f"model.layers.{index}.{name}": shape for name, shape in layer.items()}
    return shapes


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: object) -> bool:
    return is_int(value) and value > 0


def read_ladder_config(directory: Path) -> dict:
    """`config.json` of a ladder checkpoint, its ladder layers checked."""
    config = read_json_object(directory / "config.json", "not a transformers checkpoint")
    if config.get("model_type") != LadderLlamaConfig.model_type:
        raise CheckpointError(
            f"{directory} is not a ladder checkpoint (model type {config.get('model_type')!r}): run ladder-convert"
        )
    check_ladder_layers(config, directory / "config.json")
    return config


def check_checkpoint(directory: Path, missing: str = "not a transformers checkpoint", ladder: bool = False) -> dict:
    """Before a model loads: its `config.json` (a ladder one's ladder layers checked; with `ladder`, it must be one),
    its shards' headers and its side files. Returns the config."""
    config = read_ladder_config(directory) if ladder else read_json_object(directory / "config.json", missing)
    if config.get("model_type") == LadderLlamaConfig.model_type:
        check_ladder_layers(config, directory / "config.json")
    check_tensors(directory, find_shards(directory), config)
    side_files(directory)
    return config


def check_ladder_layers(config: dict, config_file: Path) -> list[int]:
    """A ladder config's `ladder_layers`: distinct decoder layer indices."""
    layers, count = config.get("ladder_layers"), config.get("num_hidden_layers")
    if not positive_int(count):
        raise CheckpointError(f"{config_file}: num_hidden_layers {count!r} is not a positive integer")
    indices = isinstance(layers, list) and all(is_int(i) and 0 <= i < count for i in layers)
    if not indices or len(set(layers)) != len(layers):
        raise CheckpointError(f"{config_file}: ladder_layers {layers!r} are not distinct layer indices from 0 to {count - 1}")
    return layers


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


def shard_hashes(directory: Path, shards: list[str]) -> dict[str, str]:
    """{shard name: sha256}, as the provenance and the gate reports record them."""
    return dict(zip(shards, hash_shards([directory / name for name in shards])))


def verify_hub_blob(source_path: Path, sha256: str) -> None:
    """A Hub cache stores each weight file under its sha256: a mismatch means the cached download is corrupted."""
    blob_name = Path(os.path.realpath(source_path)).name
    if SHA256_NAME.fullmatch(blob_name) and blob_name != sha256:
        raise CheckpointError(f"{source_path.name} is corrupted: its sha256 is {sha256}, the Hub says {blob_name}")


def checked_file(path: Path) -> Path:
    """The real path of `path`, a file of a checkpoint directory, when it may be read: a regular file, or a symlink
    that resolves inside the directory or into the Hugging Face cache's blob store (how Hub snapshots are laid out).
    Anything else (a link to /etc/passwd or /proc/self/environ, a device, a pipe) is refused, naming the file."""
    real = Path(os.path.realpath(path))
    if path.is_symlink() and not inside_checkpoint(real, Path(os.path.realpath(path.parent))):
        raise CheckpointError(f"{path} is a symlink to {real}, outside the checkpoint: refusing to read it")
    if not real.is_file():
        raise CheckpointError(f"{path} is not a regular file: refusing to read it")
    return real


def inside_checkpoint(real: Path, directory: Path) -> bool:
    """In `directory`, or in the blob store of the Hub cache repository whose snapshot `directory` is."""
    if real.is_relative_to(directory):
        return True
    snapshots = directory.parent
    return snapshots.name == "snapshots" and real.parent == snapshots.parent / "blobs"


def link_or_copy(source: Path, target: Path) -> str:
    real_source = checked_file(source)  # Hub cache snapshots hold symlinks to blobs
    try:
        os.link(real_source, target)
        return "hardlinked"
    except OSError:  # another filesystem, or one without hardlinks
        shutil.copyfile(real_source, target)
        return "copied"


def write_shard(source: Path, target: Path, replaced: dict) -> str:
    """`source`'s shard at `target`, with the tensors named in `replaced` swapped for theirs (in the shard's dtype):
    linked or copied when it holds none of them, rewritten otherwise."""
    with safe_open(checked_file(source), framework="pt") as shard:
        if not replaced.keys() & set(shard.keys()):
            return link_or_copy(source, target)
        from safetensors.torch import save_file  # torch only where tensors are written: the serving side needs none

        tensors = {name: shard.get_tensor(name) for name in shard.keys()}
        tensors |= {name: replaced[name].to(tensors[name].dtype) for name in replaced.keys() & tensors.keys()}
        save_file(tensors, target, metadata=shard.metadata() or {"format": "pt"})
    return "rewritten"


def side_files(directory: Path, patterns: tuple[str, ...] = SIDE_FILES) -> list[Path]:
    """The files of `directory` that a pattern names, with a data or text extension, each checked as `checked_file`
    does. A config among them that names code to run (`auto_map`: a tokenizer or processor of its own) is refused:
    an export loads with `trust_remote_code=True`, which would run that code on every user's machine."""
    named = [
        path for path in sorted(directory.iterdir())
        if any(fnmatch.fnmatch(path.name, p) for p in patterns) and path.suffix in SIDE_SUFFIXES
    ]  # fmt: skip
    for path in named:
        checked_file(path)
        if path.name.endswith("config.json") and "auto_map" in read_json_object(path, ""):
            raise CheckpointError(
                f"{path} names code to run (auto_map): ladder carries no code but its own model's; remove auto_map"
            )
    return named


def copy_side_files(source: Path, target: Path, patterns: tuple[str, ...]) -> None:
    """The side files of `source` that `patterns` name, into `target` (never over a file already there)."""
    for path in side_files(source, patterns):
        if not os.path.lexists(target / path.name):
            shutil.copyfile(checked_file(path), target / path.name)


def write_ladder_config(directory: Path, config: dict, layers: list[int]) -> None:
    """`config.json` of a ladder checkpoint, with the `auto_map` that loads our model code shipped beside it (which
    this also writes: the files of the installed package, the code that was tested and gated)."""
    ladder = {
        **config,
        "model_type": LadderLlamaConfig.model_type,
        "architectures": ["LadderLlamaForCausalLM"],
        "ladder_layers": layers,
        "auto_map": {
            "AutoConfig": "configuration_ladder_llama.LadderLlamaConfig",
            "AutoModelForCausalLM": "modeling_ladder_llama.LadderLlamaForCausalLM",
        },
    }
    (directory / "config.json").write_text(json.dumps(ladder, indent=2, sort_keys=True) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(MODEL_CODE_DIR / name, directory / name)


def tool_stamp(tool: str) -> dict:
    """Which of our commands wrote a provenance entry, in which version (and commit, run from a git checkout), when."""
    stamp = {"tool": tool, "tool_version": __version__, **source_commit()}
    return stamp | {"created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def source_commit() -> dict:
    """The git commit of the source checkout this package runs from (an editable install), and whether its tracked
    files differ from it; nothing for an installed release, or without git."""
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / ".git").exists():
        return {}
    git = ["git", "-C", str(checkout)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit.stdout.strip(), "git_modified": bool(changed.stdout.strip())}


def read_provenance(directory: Path) -> dict:
    """`ladder_provenance.json`: written by ladder-convert (source, revision, ladder layers, shard hashes), extended
    with an `adaptation` section by adapt/sft.py and a `publication` section by ladder-publish."""
    provenance = read_json_object(directory / PROVENANCE_FILE, "not written by ladder-convert or adapt/sft.py")
    if not isinstance(provenance.get("source"), str):
        raise CheckpointError(f"{directory / PROVENANCE_FILE} names no source (the original model)")
    return provenance


def read_origin(directory: Path) -> dict | None:
    """What `directory` (an original) was made from, when ORIGIN_FILE says it."""
    path = directory / ORIGIN_FILE
    return read_json_object(path, "") if os.path.lexists(path) else None


def write_provenance(directory: Path, provenance: dict) -> None:
    (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")


def check_apart(output: Path, source: Path, option: str) -> None:
    """Refuse an output that is, contains or lies inside the source: replacing it would delete the source."""
    output, source = output.resolve(), source.resolve()
    if output == source or output in source.parents or source in output.parents:
        raise CheckpointError(f"{option} {output} is, contains or lies inside the source {source}: choose another directory")


def check_output(output: Path, overwrite: bool, option: str) -> None:
    """Before any work: may `output` be written? `--overwrite` replaces only an earlier output of ours (a directory
    with a provenance file, or an empty one), never a file or a folder of the user's."""
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise CheckpointError(f"{output} already exists: pass --overwrite to replace it")
    if output.is_symlink() or not output.is_dir():
        raise CheckpointError(f"{option} {output} is not a directory: refusing to replace it")
    if any(output.iterdir()) and not (output / PROVENANCE_FILE).is_file():
        raise CheckpointError(
            f"{option} {output} holds files ladder did not write (no {PROVENANCE_FILE}): refusing to delete them"
        )


@contextmanager
def output_lock(output: Path, option: str) -> Iterator[None]:
    """Hold `output` for the whole run: an exclusive lock on a file beside it, removed at the end. A second run on
    the same output is refused at once."""
    output.parent.mkdir(parents=True, exist_ok=True)
    lock_file = output.with_name(f".{output.name}.lock")
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(descriptor).st_ino != os.stat(lock_file).st_ino:  # a run that just ended removed it
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(descriptor)
        raise CheckpointError(f"{option} {output} is being written by another ladder run: wait for it to end") from None
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)  # before the lock goes: a waiting run then sees a new lock file
        os.close(descriptor)


@contextmanager
def staged(output: Path, directory: bool = True, overwrite: bool = False, option: str = "--output") -> Iterator[Path]:
    """A temporary sibling of `output` to write into, renamed to `output` when the block ends normally and removed
    when it raises. An existing `output` goes only once the new one is in place, so a failed or interrupted run
    leaves the output as it was. A directory never lands on anything but an earlier output of ours, and that only
    with `overwrite`: what appeared at `output` while the run was writing is checked again at the rename."""
    with scratch(output, directory) as staging:
        yield staging
        if directory:
            move_into_place(staging, output, overwrite, option)
        else:
            os.replace(staging, output)


@contextmanager
def scratch(beside: Path, directory: bool = True) -> Iterator[Path]:
    """A hidden temporary directory (or file) beside `beside`, on its filesystem (shards hardlink, renames are atomic),
    removed at the end unless renamed away. What killed runs of ours left beside it is removed first."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(beside)
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".{beside.name}.{owner_tag()}.", suffix=".partial", dir=beside.parent)
    if not directory:
        os.close(made[0])
    path = Path(made if directory else made[1])
    path.chmod((0o777 if directory else 0o666) & ~current_umask())  # mkdtemp/mkstemp make it private
    try:
        yield path
    finally:
        remove(path)  # already gone once renamed into place


def owner_tag() -> str:
    """Names this process in the names of its temporary files: host and pid."""
    return f"{host_name()}-{os.getpid()}"


def host_name() -> str:
    return socket.gethostname().replace(".", "_")  # dots would split the file name


def remove_stale_siblings(output: Path) -> None:
    """The staging and retired siblings of `output` that a run of ours on this host left when it was killed."""
    ours = re.compile(rf"\.{re.escape(output.name)}\.(?P<host>[^.]+)-(?P<pid>\d+)\.(\w+\.partial|old)")
    for sibling in output.parent.glob(f".{glob.escape(output.name)}.*"):
        match = ours.fullmatch(sibling.name)
        if match and match["host"] == host_name() and not process_alive(int(match["pid"])):
            remove(sibling)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def move_into_place(staging: Path, output: Path, overwrite: bool, option: str) -> None:
    if overwrite and os.path.lexists(output):
        check_output(output, overwrite, option)  # still an earlier output of ours, not a folder made meanwhile
        retired = output.with_name(f".{output.name}.{owner_tag()}.old")
        output.rename(retired)
        rename_without_replacing(staging, output, option)
        remove(retired)
    else:
        rename_without_replacing(staging, output, option)


def rename_without_replacing(source: Path, target: Path, option: str) -> None:
    """Linux's renameat2(RENAME_NOREPLACE): atomic, and never over anything. Where the filesystem or the C library
    lacks it, a check then a rename (under the output's lock, so only another program could slip in between)."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        if renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL, errno.EEXIST):
            raise OSError(error, os.strerror(error), str(target))
    if os.path.lexists(target):
        raise CheckpointError(f"{option} {target} appeared while this run was writing it: left as it is, nothing written")
    os.rename(source, target)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def crashed(prog: str, error: Exception) -> int:
    """An unexpected exception: one line on stderr, the traceback in a log file, exit code 3 (1 means only that a
    gate failed)."""
    log = cache_root() / "logs" / f"{prog.replace('/', '-')}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(error)))
        where = f"traceback in {log}"
    except OSError:
        traceback.print_exception(error)
        where = "traceback above"
    print(f"{prog}: internal error: {type(error).__name__}: {first_line(error)} ({where})", file=sys.stderr)
    return 3


@contextmanager
def unwind_on_termination() -> Iterator[None]:
    """SIGTERM (timeout, Slurm, docker stop) and SIGHUP unwind the stack like Ctrl-C, so what `staged` was writing is
    removed and the command ends with its interrupted message. SIGKILL cannot be caught: the next run cleans up."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
