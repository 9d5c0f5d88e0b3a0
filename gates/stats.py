"""Standard errors of the gates' means, so that a difference can be told from the noise of a finite sample."""

import math

import torch


def pooled_mean(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """The mean over all items of groups (sum of each chat's token values / all their tokens), and its standard error
    with the groups as the independent samples: the tokens of one chat are not independent of each other.

    The delta method for a ratio of means (a cluster-robust standard error): sqrt(n / (n - 1) * sum((s_i - m c_i)^2))
    / sum(c_i). With every count 1 it is the plain standard error of the mean, std / sqrt(n)."""
    sums, counts = sums.double(), counts.double()
    mean = (sums.sum() / counts.sum()).item()
    groups = len(sums)
    if groups < 2:
        return mean, float("nan")
    spread = ((sums - mean * counts) ** 2).sum() * groups / (groups - 1)
    return mean, (spread.sqrt() / counts.sum()).item()


def drop_stderr(reference_stderr: float | None, candidate_stderr: float | None) -> float:
    """The standard error of reference - candidate, taking the two as independent (for the same questions, whose
    results are positively correlated, it is an upper bound); 0 when neither is known."""
    known = [se for se in (reference_stderr, candidate_stderr) if se is not None and math.isfinite(se)]
    return math.sqrt(sum(se**2 for se in known))
