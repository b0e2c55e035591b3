"""Timing helpers shared by the benchmarks (median of repeats, inference mode)."""
from __future__ import annotations

import statistics
import time

import torch


_WARMED = False


def warm_up_process() -> None:
    """Run a few convolutions and matmuls once per process: the first timed case of a run
    otherwise also pays for waking the thread pool and building oneDNN primitives."""
    global _WARMED
    if _WARMED:
        return
    with torch.inference_mode():
        conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(4, 64, 32, 32)
        a = torch.randn(512, 512)
        for _ in range(10):
            conv(x)
            a @ a
    _WARMED = True


def median_time(fn, *args, repeats: int = 15, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median wall time in seconds of ``fn(*args)`` under ``torch.inference_mode``."""
    warm_up_process()
    with torch.inference_mode():
        for _ in range(warmup):
            fn(*args)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
