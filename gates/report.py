"""A gate's verdict: one row per metric (reference | candidate | delta | threshold | pass), each value with its
standard error where it is known, as JSON and Markdown.

The report files, `ladder_gate_<gate>.json` and `.md` in the candidate's directory, are written and read here only.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ladder.checkpoint import CheckpointError, read_json_object

from .config import DROP_STDERRS, THRESHOLD_KINDS
from .stats import drop_stderr

SYMBOLS = {"max": "≤", "min": "≥", "ratio_max": "ratio ≤", "drop_max": "drop ≤"}


@dataclass
class Row:
    metric: str
    reference: float
    candidate: float
    delta: float
    threshold: str  # empty when the gate sets none
    passed: bool | None  # None when the gate sets no threshold on this metric
    reference_stderr: float | None = None  # None where it is not known (reports written before they were recorded)
    candidate_stderr: float | None = None


def judge(metrics: dict[str, tuple[float, ...]], thresholds: dict[str, dict[str, float]]) -> list[Row]:
    """`metrics`: {name: (reference, candidate)}, or (reference, candidate, reference stderr, candidate stderr).

    A drop (`drop_max`, in points) passes while it is within the limit plus DROP_STDERRS standard errors of the drop:
    a benchmark of a few hundred questions moves by points between equal models, and the gate fails a model on a
    drop that noise does not explain, not on the noise."""
    rows = []
    for metric, (reference, candidate, *stderr) in metrics.items():
        rules = thresholds.get(metric, {})
        noise = drop_stderr(*stderr) * 100 if stderr else 0.0  # in points, as drop_max
        passed = all(THRESHOLD_KINDS[kind](reference, candidate, limit, noise) for kind, limit in rules.items())
        threshold = ", ".join(threshold_text(kind, limit, noise) for kind, limit in rules.items())
        row = Row(metric, reference, candidate, candidate - reference, threshold, passed if rules else None, *stderr)
        rows.append(row)
    missing = sorted(m for m in set(thresholds) - set(metrics) if thresholds[m])  # `{}` entries judge nothing
    rows += [Row(m, float("nan"), float("nan"), float("nan"), "not measured", False) for m in missing]
    return rows


@dataclass
class Report:
    gate: str
    passed: bool
    rows: list[Row]
    suite: dict  # what was measured, as the gates file set it
    shards_sha256: dict | None  # the candidate's weights, shard by shard: what the report is about
    thresholds: dict | None  # the gate's, as the gates file set them


NUMBER, TEXT, VERDICT = ((int, float), "a number"), ((str,), "text"), ((bool, type(None)), "true, false or null")
NUMBER_OR_NULL = ((int, float, type(None)), "a number or null")
ROW_TYPES = {"metric": TEXT, "reference": NUMBER, "candidate": NUMBER, "delta": NUMBER, "threshold": TEXT, "passed": VERDICT}
STDERR_TYPES = {"reference_stderr": NUMBER_OR_NULL, "candidate_stderr": NUMBER_OR_NULL}  # absent from older reports


def threshold_text(kind: str, limit: float, noise: float) -> str:
    allowance = f" + {DROP_STDERRS:g} SE ({DROP_STDERRS * noise:.1f})" if kind == "drop_max" and noise else ""
    return f"{SYMBOLS[kind]} {limit:g}{allowance}"


def report_files(gate: str = "*") -> tuple[str, str]:
    """The names of a gate's report files (a glob pattern for every gate's by default)."""
    return f"ladder_gate_{gate}.json", f"ladder_gate_{gate}.md"


def failing(rows: list[Row]) -> list[str]:
    return [row.metric for row in rows if row.passed is False]


def markdown(rows: list[Row], title: str) -> str:
    lines = [f"### {title}", "", "| metric | reference | candidate | delta | threshold | pass |", "|---|---:|---:|---:|---|---|"]
    for row in rows:
        verdict = {True: "yes", False: "**NO**", None: ""}[row.passed]
        delta_stderr = drop_stderr(row.reference_stderr, row.candidate_stderr) or None
        lines.append(
            f"| {row.metric} | {with_stderr(row.reference, row.reference_stderr)} | "
            f"{with_stderr(row.candidate, row.candidate_stderr)} | {with_stderr(row.delta, delta_stderr, '+')} | "
            f"{row.threshold} | {verdict} |"
        )
    note = "Values ± one standard error (over chats, prompts or questions), where it is known."
    return "\n".join(lines) + f"\n\n{note}\n"


def with_stderr(value: float, stderr: float | None, sign: str = "") -> str:
    """`0.4760 ± 0.0223`; the value alone when its standard error is unknown or zero (the reference's own KL)."""
    return f"{value:{sign}.4f}" + (f" ± {stderr:.4f}" if stderr else "")


def write(directory: Path, gate: str, rows: list[Row], facts: dict) -> Path:
    """`ladder_gate_<gate>.json` and `.md` in the candidate's directory, where later stages look for them."""
    passed = not failing(rows)
    report = {"gate": gate, "passed": passed, **facts, "rows": [asdict(row) for row in rows]}
    json_name, markdown_name = report_files(gate)
    (directory / json_name).write_text(json.dumps(report, indent=2) + "\n")
    title = f"Gate `{gate}`: {'passed' if passed else 'FAILED'} ({facts['candidate']} vs {facts['reference']})"
    (directory / markdown_name).write_text(markdown(rows, title))
    return directory / json_name


def read(directory: Path, gate: str) -> Report | None:
    """The report `write` left in `directory`, or None when that gate never ran there."""
    path = directory / report_files(gate)[0]
    if not path.is_file():
        return None
    report = read_json_object(path, "")
    try:
        if not isinstance(report.get("passed"), bool):
            raise TypeError("no passed verdict")
        rows = [checked_row(row) for row in report["rows"]]
        bound = (report.get("shards_sha256"), report.get("thresholds"))
        return Report(gate, report["passed"], rows, report.get("suite") or {}, *bound)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is not a gate report ({error})") from None


def checked_row(row: dict) -> Row:
    if not isinstance(row, dict) or not ROW_TYPES.keys() <= row.keys() <= ROW_TYPES.keys() | STDERR_TYPES.keys():
        raise TypeError(f"a row is not {{{', '.join(ROW_TYPES)}}} (and the standard errors)")
    for field, (types, kind) in (ROW_TYPES | STDERR_TYPES).items():
        if field in row and (not isinstance(row[field], types) or (isinstance(row[field], bool) and bool not in types)):
            raise TypeError(f"{field} {row[field]!r} of row {row['metric']!r} is not {kind}")
    return Row(**row)
