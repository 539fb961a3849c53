"""Process-wide numerics the apps fix before any work: CPU threads and deterministic kernels.

On a CPU the order of a parallel reduction follows the number of threads, so the same run on a
machine with more cores sums differently and, over hundreds of steps, ends on a different model.
A fixed ``threads`` (the README demo's 2) makes the numbers independent of the machine's core count.
"""

from __future__ import annotations

import os

import torch


def check_numerics(threads: object, deterministic: object) -> None:
    """``threads``: null or an integer >= 1; ``deterministic``: true or false (named as the configs name them)."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"threads={threads!r}: expected null (torch's default, one per core) or an integer >= 1")
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic={deterministic!r}: expected true or false")


def fix_numerics(threads: int | None, deterministic: bool) -> None:
    """Set torch's intra-op threads and, with ``deterministic``, its deterministic kernels where it has
    them (``warn_only``: an op without one, e.g. flash attention's CUDA backward, warns instead of failing)."""
    check_numerics(threads, deterministic)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
