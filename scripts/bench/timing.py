"""Timing shared by the benchmarks: CUDA events on the GPU, the wall clock on CPU, and fresh processes.

A measurement in a process that already ran another one inherits its caching allocator's pool,
dynamo's caches and the GPU's clocks; :func:`run_fresh` runs each in its own Python process with
empty TorchInductor/Triton cache directories, so compile time and peak memory are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def cuda_times_ms(fn: Callable[[], object], reps: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_graph_ms(fn: Callable[[], object], reps: int, calls: int = 10) -> list[float]:
    """GPU milliseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph and replayed ``reps`` times,
    so the host's launch cost is left out (the kernels' own time, as in a busy stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [ms / calls for ms in cuda_times_ms(graph.replay, reps, warmup=1)]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def times_ms(fn: Callable[[], object], reps: int, warmup: int = 0, device: torch.device | str = "cuda") -> list[float]:
    """:func:`cuda_times_ms` on a CUDA device, else the wall clock per call."""
    if torch.device(device).type == "cuda":
        return cuda_times_ms(fn, reps, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1e3)
    return times


def once_s(fn: Callable[[], object], device: torch.device | str) -> tuple[float, object]:
    """Wall-clock seconds of one call (host and device work both finished), and its result."""
    sync(device)
    tic = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - tic, out


def cap_memory(gb: float | None) -> None:
    """Allow this process at most ``gb`` GiB of the GPU (e.g. an 80 GB H100's share on a larger card); None: all."""
    if gb:
        torch.cuda.set_per_process_memory_fraction(gb * 2**30 / torch.cuda.mem_get_info()[1])


def memory_gb(device: torch.device | str) -> dict[str, float | None]:
    """Peak ``max_memory_allocated`` and ``max_memory_reserved`` since the last reset (None off the GPU)."""
    if torch.device(device).type != "cuda":
        return {"peak_mem_gb": None, "peak_reserved_gb": None}
    return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def run_fresh(script: str | Path, args: Sequence[str], out_flag: str = "--out") -> dict:
    """Run ``python script *args out_flag TMP.json`` in a new process with empty compile caches and return the
    JSON it wrote, or ``{"error": ...}`` with its last stderr line. Its stdout streams through."""
    with tempfile.TemporaryDirectory(prefix="tc_bench_") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor"),
               "TRITON_CACHE_DIR": str(Path(tmp) / "triton")}
        child = subprocess.run([sys.executable, str(script), *args, out_flag, str(out)], env=env,
                               stderr=subprocess.PIPE, text=True)
        if child.returncode != 0 or not out.exists():
            lines = child.stderr.strip().splitlines()
            sys.stderr.write("\n".join(lines[-20:]) + "\n")
            return {"error": lines[-1] if lines else f"exit status {child.returncode}"}
        return json.loads(out.read_text())
