"""Interleaved timing of several callables on a noisy machine (the one place that measures).

:func:`compare` runs ``{label: fn}`` in rounds -- A B C, then C B A, then A B C ... (every
round holds one sample of each, the order alternating so neither always runs first after
another) -- after ``warmup`` un-timed calls of each. A sample is ``number`` back-to-back
calls (chosen at warm-up so a sample lasts at least ``min_sample_s``) divided by ``number``.
For every sample it records

* the wall time (``time.perf_counter``; on CUDA the elapsed time between two CUDA events,
  synchronized), and
* the CPU time of the measuring thread (``time.thread_time``): with one torch thread
  (the default everywhere here) the computation runs on that thread, so this is the
  compute time without the time the scheduler gave to other processes. With more threads
  it misses the worker threads' share; on CUDA it is the host's launch cost.

:class:`Timing` holds the samples; its statistics are the median and the inter-quartile
range (IQR) relative to the median ("spread"). :func:`paired_ratio` is the median of the
per-round ratios ``a[i] / b[i]`` -- load drift between rounds cancels within a round.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Samples (seconds per call) of one callable: ``wall`` and measuring-thread ``cpu``."""
    label: str
    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    number: int = 1
    device: str = "cpu"

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def spread(self) -> float:
        """Inter-quartile range of the wall samples divided by their median (0 for < 2 samples)."""
        return relative_iqr(self.wall)

    @property
    def cpu_spread(self) -> float:
        return relative_iqr(self.cpu)

    @property
    def off_cpu(self) -> float:
        """Share of the median wall time the measuring thread did not spend on a CPU
        (``1 - cpu/wall``): near 0 on an idle machine with 1 thread, large when other
        processes took the core (CPU device only)."""
        return max(0.0, 1.0 - self.cpu_median / self.median) if self.median > 0 else 0.0

    def summary(self, unit: float = 1e3) -> str:
        """``"12.3 ms ±4%"`` (median, relative IQR) in milliseconds by default."""
        return f"{self.median * unit:.3g} ±{self.spread:.0%}"


def quantile(values, q: float) -> float:
    """Linear-interpolated ``q``-quantile (numpy's default) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("quantile of no values")
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def relative_iqr(values) -> float:
    """(Q3 - Q1) / median; 0 for fewer than 2 values or a zero median."""
    if len(values) < 2:
        return 0.0
    middle = statistics.median(values)
    return (quantile(values, 0.75) - quantile(values, 0.25)) / middle if middle > 0 else 0.0


@dataclass
class Ratio:
    """Median and relative IQR of per-round ratios (see :func:`paired_ratio`)."""
    median: float
    spread: float
    samples: list

    def __str__(self) -> str:
        return f"{self.median:.2f}x ±{self.spread:.0%}"


def paired_ratio(numerator: Timing, denominator: Timing, cpu: bool = False) -> Ratio:
    """Median over rounds of ``numerator[i] / denominator[i]`` (wall, or thread CPU with ``cpu=True``).

    Both must come from the same :func:`compare` call (same rounds)."""
    a, b = (numerator.cpu, denominator.cpu) if cpu else (numerator.wall, denominator.wall)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio: {numerator.label!r} has {len(a)} samples and {denominator.label!r} "
                         f"{len(b)}; time them in one compare() call")
    ratios = [x / y if y > 0 else math.inf for x, y in zip(a, b)]
    return Ratio(statistics.median(ratios), relative_iqr(ratios), ratios)


class _Clock:
    """Wall + thread-CPU time of ``number`` calls; CUDA events on a CUDA device."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sample(self, fn, number):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cpu0 = time.thread_time()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            cpu = time.thread_time() - cpu0
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / number, cpu / number
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for _ in range(number):
            fn()
        return (time.perf_counter() - wall0) / number, (time.thread_time() - cpu0) / number


def compare(fns: dict, repeats: int = 9, warmup: int = 2, min_sample_s: float = 0.0, device="cpu",
            inference: bool = True) -> dict:
    """Time each zero-argument callable of ``fns`` in interleaved rounds; ``{label: Timing}``.

    ``repeats`` rounds (>= 1) after ``warmup`` un-timed calls of each; ``min_sample_s`` > 0
    batches calls of fast callables into one sample (module docstring). Runs under
    ``torch.inference_mode`` unless ``inference=False``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"compare: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    clock = _Clock(device)
    labels = list(fns)
    with torch.inference_mode(inference):
        numbers = {}
        for label in labels:
            for _ in range(warmup):
                fns[label]()
            once = clock.sample(fns[label], 1)[0] if min_sample_s > 0 else 0.0
            numbers[label] = max(1, math.ceil(min_sample_s / once)) if once > 0 else 1
        timings = {k: Timing(k, number=numbers[k], device=str(device)) for k in labels}
        for round_index in range(repeats):
            for label in (labels if round_index % 2 == 0 else labels[::-1]):
                wall, cpu = clock.sample(fns[label], numbers[label])
                timings[label].wall.append(wall)
                timings[label].cpu.append(cpu)
    return timings


def compare_modules(modules: dict, x, **kwargs) -> dict:
    """:func:`compare` of ``module(x)`` for each ``{label: module}`` (on ``x``'s device)."""
    return compare({k: (lambda m=m: m(x)) for k, m in modules.items()}, device=x.device, **kwargs)


__all__ = ["Timing", "Ratio", "compare", "compare_modules", "paired_ratio", "relative_iqr", "quantile"]
