"""CUDA-event timing shared by the GPU benchmarks."""

from __future__ import annotations

from collections.abc import Callable

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
