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

import re
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from .alpaca import HELDOUT

DEFAULT_GATES_FILE = Path(__file__).with_name("default_gates.yaml")
GATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
FIDELITY_METRICS = ("kl", "top1_agreement", "response_perplexity")
GENERATION_METRICS = ("generation_exact_match", "generation_common_prefix")
# A drop passes within its limit plus this many standard errors of the drop (gates/report.py judge).
DROP_STDERRS = 2.0
# How each kind of threshold judges (reference, candidate) given the drop's standard error in points; accuracies are
# fractions, drops are in points.
THRESHOLD_KINDS = {
    "max": lambda ref, cand, limit, noise: cand <= limit,
    "min": lambda ref, cand, limit, noise: cand >= limit,
    "ratio_max": lambda ref, cand, limit, noise: cand / ref <= limit,
    "drop_max": lambda ref, cand, limit, noise: (ref - cand) * 100 <= limit + DROP_STDERRS * noise,
}
ThresholdKind = Literal["max", "min", "ratio_max", "drop_max"]
# pydantic checks every field's type and range: no unknown key, no coercion ("10" and true are not numbers).
STRICT = ConfigDict(extra="forbid")
Positive = Annotated[StrictInt, Field(ge=1)]
HeldoutCount = Annotated[StrictInt, Field(ge=1, le=HELDOUT.stop - HELDOUT.start)]  # rows exist to measure on


def task_metrics(task: str) -> list[str]:
    return [f"{task}/acc", f"{task}/acc_norm"]


def fidelity_targets(thresholds: dict[str, dict[str, float]]) -> dict[str, float]:
    """A gate's KL ceiling and top-1 floor, where it sets them: the lines healing curves are drawn against."""
    bounds = {"kl": "max", "top1_agreement": "min"}
    return {metric: thresholds[metric][kind] for metric, kind in bounds.items() if kind in thresholds.get(metric, {})}


class GateUsageError(ValueError):
    """Bad input to a gate: reported in one line, exit code 2."""


class GateConfigError(GateUsageError):
    """A malformed gates file."""


@dataclass(frozen=True, config=STRICT)
class FidelityConfig:
    chats: HeldoutCount = 200  # held-out Alpaca chats; only response tokens are scored
    max_length: Positive = 512
    top_k: Positive = 512  # reference log-probs kept per token (plus one bucket for the rest): the cached KL target
    batch_size: Positive = 8


@dataclass(frozen=True, config=STRICT)
class BenchmarkConfig:
    tasks: list[StrictStr] = field(default_factory=lambda: ["arc_easy_local"])
    limit: Positive | None = 500  # questions per task; null for all
    batch_size: Positive = 16


@dataclass(frozen=True, config=STRICT)
class GenerationConfig:
    prompts: HeldoutCount = 50  # held-out Alpaca prompts, answered greedily by both models
    max_new_tokens: Positive = 32
    batch_size: Positive = 16


@dataclass(frozen=True, config=STRICT)
class Suite:
    fidelity: FidelityConfig | None = None
    benchmarks: BenchmarkConfig | None = None
    generation: GenerationConfig | None = None

    def metric_names(self) -> list[str]:
        names = list(FIDELITY_METRICS) if self.fidelity else []
        for task in self.benchmarks.tasks if self.benchmarks else []:
            names += task_metrics(task)
        return names + (list(GENERATION_METRICS) if self.generation else [])

    def parts(self) -> dict[str, FidelityConfig | BenchmarkConfig | GenerationConfig]:
        """The parts this suite measures, by name."""
        return {name: part for name in ("fidelity", "benchmarks", "generation") if (part := getattr(self, name))}

    def read_by(self, thresholds: dict) -> "Suite":
        """What a gate with these thresholds measures: the parts (and tasks) whose metrics they name, so that a
        sanity gate on perplexity does not spend minutes on benchmarks. A gate without thresholds measures it all."""
        if not thresholds:
            return self
        tasks = [task for task in self.benchmarks.tasks if set(task_metrics(task)) & set(thresholds)] if self.benchmarks else []
        return Suite(
            fidelity=self.fidelity if set(FIDELITY_METRICS) & set(thresholds) else None,
            benchmarks=replace(self.benchmarks, tasks=tasks) if tasks else None,
            generation=self.generation if set(GENERATION_METRICS) & set(thresholds) else None,
        )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, config=STRICT)
class GatesFile:
    suite: Suite = field(default_factory=Suite)
    gates: dict[str, dict[str, dict[ThresholdKind, StrictFloat]]] = field(default_factory=dict)  # gate -> metric -> kind -> limit


def load_gates_file(path: Path | str = DEFAULT_GATES_FILE) -> GatesFile:
    where = Path(path).name
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise GateConfigError(f"gates file {path} does not exist") from None
    except IsADirectoryError:
        raise GateConfigError(f"gates file {path} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise GateConfigError(f"gates file {path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise GateConfigError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    try:
        gates = TypeAdapter(GatesFile).validate_python(raw)
    except ValidationError as error:
        raise GateConfigError(f"{where}: {first_problem(error)}") from None
    known = gates.suite.metric_names()
    for name, thresholds in gates.gates.items():
        if not GATE_NAME.fullmatch(name):  # it names the report files
            raise GateConfigError(f"{where}: gate name {name!r} may hold only letters, digits, '_', '-' and '.'")
        unknown = sorted(set(thresholds) - set(known))
        if unknown:
            raise GateConfigError(f"{where}: gates.{name}: unknown key {unknown[0]!r} (the suite measures: {', '.join(known)})")
    return gates


def first_problem(error: ValidationError) -> str:
    """pydantic's first error as one line: where in the file, and what is wrong there."""
    problem = error.errors()[0]
    path = [str(part) for part in problem["loc"] if part != "[key]"]
    if problem["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key {path[-1]!r}" + (f" in {'.'.join(path[:-1])}" if len(path) > 1 else "")
    return f"{'.'.join(path) or 'the file'}: {problem['msg']} (got {problem['input']!r})"
