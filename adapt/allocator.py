"""Keep freed host memory in the process instead of handing it back to the kernel after every step.

glibc's malloc serves large blocks (a 49k-vocabulary logits tensor is 400 MB) with fresh mmap calls and returns them
on free, so every training step page-faults and zeroes gigabytes again: a quarter of the CPU time of a SmolLM2 step
on 2 cores was in the kernel. With mmap off and trimming off, freed blocks are reused. Peak RSS grows a little
(measured: 9.5 -> 10.5 GB for SmolLM2 distillation); the step time drops (README "Benchmarks", train_speed.py).
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory; True if it took effect (False off glibc, e.g. macOS or musl)."""
    libc_name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None) if libc_name else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
