"""Run a gate: measure candidate and reference with the parts of the suite the gate's thresholds read, judge the
thresholds, write the report.

The reference's results are cached per part of the suite, keyed by its weights (shard hashes), its tokenizer, that
part's settings, the data, the device type and the dtype, so gating a second candidate against the same original
does not recompute it, and a later gate that reads more parts measures only those.
"""

import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ladder
from ladder.checkpoint import (
    check_checkpoint,
    CheckpointError,
    find_shards,
    first_line,
    hash_shards,
    read_json_object,
    read_provenance,
    resolve_source,
    shard_hashes,
    staged,
)

from . import fidelity, generation, harness, report
from .config import DEFAULT_GATES_FILE, GateUsageError, Suite, load_gates_file
from .alpaca import DATA_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")
SAMPLE_CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]


class EvalUsageError(GateUsageError):
    """A missing candidate or reference, or two models that cannot be compared."""


@dataclass
class Verdict:
    passed: bool
    failing: list[str]
    report_path: Path
    rows: list[report.Row]


def run_gate(
    candidate: Path | str,
    gate: str,
    reference: str | None = None,
    gates_file: Path | str = DEFAULT_GATES_FILE,
    device: str | None = None,
    dtype: str = "auto",
    use_cache: bool = True,
    label: str | None = None,
) -> Verdict:
    """`label` names the candidate in the report (default: its path)."""
    start = time.perf_counter()
    gates = load_gates_file(gates_file)
    if gate not in gates.gates:
        raise EvalUsageError(f"unknown gate {gate!r}; {Path(gates_file).name} defines: {', '.join(gates.gates)}")
    manager = harness.task_manager(gates.suite.benchmarks.tasks) if gates.suite.benchmarks else None
    if manager:  # every task of the file, also those this gate does not read: a typo is an error either way
        harness.check_tasks(gates.suite.benchmarks.tasks, manager)
    suite = gates.suite.read_by(gates.gates[gate])
    candidate = Path(candidate)
    device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, device)
    try:
        reference_name, reference_dir = _check_models(candidate, reference)
    except CheckpointError as error:
        raise EvalUsageError(str(error)) from None
    tokenizer = _matching_tokenizer(reference_dir, candidate, bool(suite.fidelity or suite.generation))
    weights = shard_hashes(candidate, find_shards(candidate))  # what the report is about

    reference_results = _reference_results(reference_name, reference_dir, tokenizer, suite, manager, device, torch_dtype,
                                           use_cache)  # fmt: skip
    print(f"measuring the candidate {candidate}: {', '.join(suite.parts())}", flush=True)
    metrics = measure(_load(candidate, device, torch_dtype), tokenizer, suite, manager, reference_results)

    rows = report.judge(metrics, gates.gates[gate])
    seconds = time.perf_counter() - start
    facts = {
        "candidate": label or str(candidate), "reference": reference_name, "device": str(device),
        "dtype": str(torch_dtype).removeprefix("torch."), "suite": suite.as_dict(), "seconds": round(seconds, 1),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "shards_sha256": weights,
        "thresholds": gates.gates[gate],
    }  # fmt: skip
    report_path = report.write(candidate, gate, rows, facts)
    print(report.markdown(rows, f"gate {gate}"))
    print(f"gate {gate}: {'passed' if not report.failing(rows) else 'FAILED'} in {seconds:.0f} s; report: {report_path}")
    return Verdict(not report.failing(rows), report.failing(rows), report_path, rows)


def measure(model, tokenizer, suite: Suite, manager, reference: dict | None = None):
    """Without `reference`: the reference's raw results, by part of the suite (cacheable). With it: {metric:
    (reference, candidate, reference stderr, candidate stderr)}."""
    raw, metrics = {}, {}
    if suite.fidelity:
        batches = fidelity.chat_batches(tokenizer, suite.fidelity)
        if reference is None:
            raw["fidelity"] = fidelity.reference_targets(model, batches, suite.fidelity.top_k)
        else:
            metrics |= fidelity.compare(model, batches, reference["fidelity"])
    if suite.benchmarks:
        scores = harness.run(model, tokenizer, suite.benchmarks, manager)
        if reference is None:
            raw["benchmarks"] = scores
        else:
            metrics |= harness.paired(reference["benchmarks"], scores)
    if suite.generation:
        answers = generation.greedy_answers(model, tokenizer, suite.generation)
        if reference is None:
            raw["generation"] = answers
        else:
            metrics |= generation.compare(reference["generation"], answers)
    return raw if reference is None else metrics


def _reference_results(name: str, directory: Path, tokenizer, suite: Suite, manager, device: torch.device,
                       dtype: torch.dtype, use_cache: bool) -> dict:  # fmt: skip
    """The reference's raw results for each part of the suite: from the cache where it has them, the rest measured
    (and cached)."""
    cache_files = _cache_files(directory, suite, device, dtype)
    results = {part: cached for part, path in cache_files.items() if use_cache and (cached := _load_cached(path)) is not None}
    if results:
        print(f"reference results from the cache: {', '.join(results)} ({ladder.cache_root() / 'gates'})", flush=True)
    missing = Suite(**{part: settings for part, settings in suite.parts().items() if part not in results})
    if missing.parts():
        print(f"measuring the reference {name}: {', '.join(missing.parts())}", flush=True)
        measured = measure(_load(directory, device, dtype), tokenizer, missing, manager)
        for part, part_results in measured.items():
            _save_cached(cache_files[part], part_results)
        results |= measured
    return results


def _check_models(candidate: Path, reference: str | None) -> tuple[str, Path]:
    """Before anything loads: both are checkpoints with safetensors weights, and the report can be written. Returns
    the reference's name and directory (the candidate's provenance names it when `reference` does not)."""
    check_checkpoint(candidate, "the candidate is not a checkpoint directory")
    try:
        tempfile.TemporaryFile(dir=candidate).close()  # a read-only directory, or filesystem
    except OSError:
        raise CheckpointError(f"candidate {candidate} is read-only: the gate writes its report there") from None
    try:
        name = reference or read_provenance(candidate)["source"]
        reference_dir = resolve_source(name).directory
    except CheckpointError as error:
        raise CheckpointError(f"reference: {error}" + ("" if reference else " (or pass --reference)")) from None
    check_checkpoint(reference_dir, "the reference is not a checkpoint directory")
    return name, reference_dir


def _resolve_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise EvalUsageError(f"--device {name!r} is not a device ({str(error).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalUsageError(f"--device {name}: this torch has no usable CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise EvalUsageError(f"--device {name}: the gates run on cpu or cuda")
    return device


def _load_tokenizer(directory: Path, which: str):
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # the tokenizers library raises plain Exceptions for a corrupt tokenizer.json
        raise EvalUsageError(f"the {which}'s tokenizer ({directory}) does not load: {first_line(error)}") from None


def load_chat_tokenizer(directory: Path, which: str):
    """The tokenizer, its chat template tried on a two-turn chat before any model loads."""
    tokenizer = _load_tokenizer(directory, which)
    try:
        tokenizer.apply_chat_template(SAMPLE_CHAT, tokenize=False)
    except Exception as error:  # no template, jinja2's errors, a template's raise_exception
        raise EvalUsageError(f"the {which}'s chat template ({directory}) fails on a two-turn chat: {first_line(error)}") from None
    return tokenizer


def _matching_tokenizer(reference_dir: Path, candidate: Path, chats: bool):
    """The reference's tokenizer (its chat template tried when the suite measures chats), the candidate's same."""
    reference_tokenizer = (load_chat_tokenizer if chats else _load_tokenizer)(reference_dir, "reference")
    candidate_tokenizer = _load_tokenizer(candidate, "candidate")
    if reference_tokenizer.get_vocab() != candidate_tokenizer.get_vocab():
        raise EvalUsageError("the reference's tokenizer differs from the candidate's: they cannot be compared token by token")
    vocab_sizes = {read_json_object(d / "config.json", "").get("vocab_size") for d in (reference_dir, candidate)}
    if len(vocab_sizes) != 1:
        raise EvalUsageError(f"the reference and the candidate have different vocabulary sizes {sorted(vocab_sizes)}")
    if reference_tokenizer.pad_token is None:  # Llama 3 has none; padding is masked out anyway
        reference_tokenizer.pad_token = reference_tokenizer.eos_token
    return reference_tokenizer


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _load(path: Path, device: torch.device, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _cache_files(reference_dir: Path, suite: Suite, device: torch.device, dtype: torch.dtype) -> dict[str, Path]:
    """Where the reference's results for each part of the suite are cached."""
    try:
        weights = hash_shards([reference_dir / shard for shard in find_shards(reference_dir)])
    except CheckpointError as error:
        raise EvalUsageError(f"reference: {error}") from None
    small_files = [reference_dir / n for n in TOKENIZER_FILES] + sorted(DATA_DIR.iterdir())
    key = {
        "weights": weights,
        "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in small_files if f.is_file()},
        "device": device.type, "dtype": str(dtype), "version": ladder.__version__,
        "results": "with standard errors",  # results cached before they were recorded are measured again
    }  # fmt: skip
    files = {}
    for name, part in suite.parts().items():
        digest = hashlib.sha256(json.dumps(key | {"part": name, "settings": asdict(part)}, sort_keys=True).encode())
        files[name] = ladder.cache_root() / "gates" / f"reference-{digest.hexdigest()[:24]}.pt"
    return files


def _load_cached(path: Path) -> dict | None:
    """The cached reference results; None when there are none, or when the file is unreadable (then recomputed)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        print(f"the cached reference results {path} are unreadable ({type(error).__name__}): measuring again", flush=True)
        return None


def _save_cached(path: Path, results: dict) -> None:
    with staged(path, directory=False) as partial:
        torch.save(results, partial)
