"""The gates YAML: a suite (what to measure) and named gates (thresholds on what was measured).

    suite:
      fidelity:   {chats: 200, max_length: 512, top_k: 512, batch_size: 8}
      benchmarks: {tasks: [arc_easy_local], limit: 500, batch_size: 16}
      generation: {prompts: 50, max_new_tokens: 32, batch_size: 16}
    gates:
      after_adapt:
        kl: {max: 0.05}
        response_perplexity: {ratio_max: 1.03}
        arc_easy_local/acc: {drop_max: 1.0}

A section left out of the suite is not measured. Every key is checked: an unknown one is an error naming it.
"""

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

DEFAULT_GATES_FILE = Path(__file__).with_name("default_gates.yaml")
FIDELITY_METRICS = ("kl", "top1_agreement", "response_perplexity")
GENERATION_METRICS = ("generation_exact_match", "generation_common_prefix")
# How each kind of threshold judges (reference, candidate); accuracies are fractions, drops are in points.
THRESHOLD_KINDS = {
    "max": lambda ref, cand, limit: cand <= limit,
    "min": lambda ref, cand, limit: cand >= limit,
    "ratio_max": lambda ref, cand, limit: cand / ref <= limit,
    "drop_max": lambda ref, cand, limit: (ref - cand) * 100 <= limit,
}


class GateUsageError(ValueError):
    """Bad input to a gate: reported in one line, exit code 2."""


class GateConfigError(GateUsageError):
    """A malformed gates file."""


@dataclass(frozen=True)
class FidelityConfig:
    chats: int = 200  # held-out Alpaca chats; only response tokens are scored
    max_length: int = 512
    top_k: int = 512  # reference log-probs kept per token (plus one bucket for the rest): the cached KL target
    batch_size: int = 8


@dataclass(frozen=True)
class BenchmarkConfig:
    tasks: list[str] = field(default_factory=lambda: ["arc_easy_local"])
    limit: int | None = 500  # questions per task; null for all
    batch_size: int = 16


@dataclass(frozen=True)
class GenerationConfig:
    prompts: int = 50  # held-out Alpaca prompts, answered greedily by both models
    max_new_tokens: int = 32
    batch_size: int = 16


@dataclass(frozen=True)
class Suite:
    fidelity: FidelityConfig | None = None
    benchmarks: BenchmarkConfig | None = None
    generation: GenerationConfig | None = None

    def metric_names(self) -> list[str]:
        names = list(FIDELITY_METRICS) if self.fidelity else []
        for task in self.benchmarks.tasks if self.benchmarks else []:
            names += [f"{task}/acc", f"{task}/acc_norm"]
        return names + (list(GENERATION_METRICS) if self.generation else [])

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GatesFile:
    suite: Suite
    gates: dict[str, dict[str, dict[str, float]]]  # gate -> metric -> threshold kind -> limit


def load_gates_file(path: Path | str = DEFAULT_GATES_FILE) -> GatesFile:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise GateConfigError(f"gates file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise GateConfigError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    where = Path(path).name
    raw = _mapping(raw, where, {"suite", "gates"})
    suite_raw = _mapping(raw.get("suite") or {}, f"{where}: suite", {"fidelity", "benchmarks", "generation"})
    sections = {
        name: _section(cls, suite_raw[name], f"{where}: suite.{name}")
        for name, cls in (("fidelity", FidelityConfig), ("benchmarks", BenchmarkConfig), ("generation", GenerationConfig))
        if name in suite_raw
    }
    suite = Suite(**sections)
    gates = {
        name: _thresholds(thresholds, suite, f"{where}: gates.{name}")
        for name, thresholds in _mapping(raw.get("gates") or {}, f"{where}: gates", None).items()
    }
    return GatesFile(suite, gates)


def _mapping(value, where: str, known: set[str] | None) -> dict:
    if not isinstance(value, dict):
        raise GateConfigError(f"{where} must be a mapping, not {type(value).__name__}")
    unknown = sorted(set(value) - known) if known is not None else []
    if unknown:
        raise GateConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return value


def _section(cls, value, where: str):
    value = _mapping(value or {}, where, {f.name for f in fields(cls)})
    for f in fields(cls):
        if f.name in value and not _has_type(value[f.name], f.type):
            raise GateConfigError(f"{where}.{f.name} must be {f.type}, not {value[f.name]!r}")
    return cls(**value)


def _has_type(value, annotation) -> bool:
    expected = {int: (int,), int | None: (int, type(None)), list[str]: (list,)}[annotation]
    if isinstance(value, bool) or not isinstance(value, expected):
        return False
    return not isinstance(value, list) or all(isinstance(v, str) for v in value)


def _thresholds(value, suite: Suite, where: str) -> dict[str, dict[str, float]]:
    known_metrics = suite.metric_names()
    thresholds = {}
    for metric, rule in _mapping(value, where, set(known_metrics)).items():
        rule = _mapping(rule, f"{where}.{metric}", set(THRESHOLD_KINDS))
        for kind, limit in rule.items():
            if isinstance(limit, bool) or not isinstance(limit, (int, float)):
                raise GateConfigError(f"{where}.{metric}.{kind} must be a number, not {limit!r}")
        thresholds[metric] = {kind: float(limit) for kind, limit in rule.items()}
    return thresholds
