"""Evaluation gates: before/after numbers that decide whether a model may go on (used by convert and adapt)."""

from .config import GateUsageError, load_gates_file
from .evaluate import Verdict, run_gate

__all__ = ["GateUsageError", "Verdict", "load_gates_file", "run_gate"]
