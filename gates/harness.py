"""Benchmarks through lm-evaluation-harness, on models already in memory.

Local tasks (gates/tasks: arc_easy_local, arc_challenge_local) read JSONL shipped in the repo and run offline; any
other harness task (arc_easy, hellaswag, mmlu, gsm8k, ifeval, ...) downloads its data from the Hub.
"""

import socket
from pathlib import Path

from .config import BenchmarkConfig, GateUsageError

TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_TASKS = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
BOOTSTRAP_ITERS = 1000  # lm-eval's resamples for aggregates without a closed-form standard error (its default: 100000)
LOCAL_ALTERNATIVES = {"arc_easy": "arc_easy_local", "arc_challenge": "arc_challenge_local"}


class TaskError(GateUsageError):
    """A task that cannot run here: reported in one line before any model is loaded."""


def task_manager(tasks: list[str]):
    """lm-eval's index of the tasks: ours, and lm-eval's own ~15,000 definitions only when a task is not ours
    (indexing those reads every one of their YAML files: 15-25 s on 2 cores, for each gate run)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= set(LOCAL_TASKS))


def check_tasks(tasks: list[str], manager) -> None:
    for task in tasks:
        if task not in manager.all_tasks:
            raise TaskError(f"unknown task {task!r}: not an lm-evaluation-harness task, nor a local one ({', '.join(LOCAL_TASKS)})")
        if task not in LOCAL_TASKS and not hub_reachable():
            alternative = LOCAL_ALTERNATIVES.get(task)
            instead = f"use {alternative}" if alternative else f"local tasks: {', '.join(LOCAL_TASKS)}"
            raise TaskError(f"task {task!r} needs the Hugging Face Hub for its data, which cannot be reached: {instead}")


def hub_reachable() -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def run(model, tokenizer, config: BenchmarkConfig, manager) -> dict[str, float]:
    """Each task's metrics, named `task/metric` (e.g. `arc_easy_local/acc`), and their standard errors
    (`arc_easy_local/acc_stderr`): lm-eval's, closed-form for means such as accuracies (std / sqrt(n)), bootstrapped
    for the other aggregates."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    results = simple_evaluate(
        model=lm, tasks=config.tasks, limit=config.limit, task_manager=manager, log_samples=False,
        bootstrap_iters=BOOTSTRAP_ITERS,
    )
    metrics = {}
    for task, values in results["results"].items():
        for key, value in values.items():  # keys look like "acc,none": metric, then filter
            name = key.split(",")[0]
            if isinstance(value, float):  # a stderr lm-eval could not compute is the text "N/A"
                metrics[f"{task}/{name}"] = value
    return metrics


def paired(reference: dict[str, float], candidate: dict[str, float]) -> dict[str, tuple[float, ...]]:
    """{metric: (reference, candidate, reference stderr, candidate stderr)}; a stderr is None where it is not known
    (reference results cached before they were recorded)."""
    return {
        name: (reference[name], value, reference.get(f"{name}_stderr"), candidate.get(f"{name}_stderr"))
        for name, value in candidate.items()
        if not name.endswith("_stderr")
    }
