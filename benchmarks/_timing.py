"""Timing helpers shared by the benchmarks (median of repeats, inference mode)."""
from __future__ import annotations

import statistics
import time

import torch


def median_time(fn, *args, repeats: int = 15, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median wall time in seconds of ``fn(*args)`` under ``torch.inference_mode``."""
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
