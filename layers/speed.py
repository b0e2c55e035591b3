"""``optimize="speed"``: tensor-method layers that are measured against the dense layer.

Every tensor-method builder (``tucker``, ``cp``, ``tt``, ``btd``) takes

* ``optimize=None`` (default: nothing is timed, ranks are exactly what the spec gives) or
  ``optimize="speed"``;
* ``input_shape=``: the shape the layer will see (batch included). Required for convs
  (their cost depends on the spatial size); for Linear it defaults to ``(64, in_features)``;
* ``on_slower="warn"`` (default) or ``"raise"``.

With ``optimize="speed"`` the builder, after decomposing as asked:

1. rounds every rank to the nearest multiple of 8 (at least 8, at most the largest rank
   the mode allows; ranks whose limit is below 8 are kept) and re-decomposes at those
   ranks if they changed -- GEMM kernels run full vector widths on multiples of 8;
2. for layers with several forward implementations (``module.implementations``, e.g.
   the CP layer's separable / fused depthwise stages, the TT layer's contraction
   orders), times each on ``input_shape`` and keeps the fastest (``module.implementation``);
3. times the dense layer and the factorized one on a random input of ``input_shape``
   (same dtype/device; ``inference_mode``; rounds interleaved -- dense, factorized,
   dense, ... -- so a machine's load drift hits both alike; median of ``repeats`` rounds
   after warm-up) and sets ``module.speedup = dense_time / factorized_time`` and
   ``module.speed_info`` (both times in ms, the shape, the thread count, the
   implementation chosen);
4. if ``speedup < 1`` (factorizing cannot win at this shape): with ``on_slower="warn"``
   it emits a :class:`SlowerThanDenseWarning` naming the layer and both times and sets
   ``module.slower_than_dense = True`` -- the factorized module is still returned
   (it is smaller), never silently; with ``on_slower="raise"`` it raises ValueError, so
   ``compress`` keeps that layer dense and writes the reason into its report.

Without ``optimize`` every module has ``speedup = None`` and ``slower_than_dense = None``.
Wall-clock numbers are never asserted in tests: :func:`time_modules` is the one place
that measures, so tests replace it.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

ROUND_TO = 8
DEFAULT_LINEAR_BATCH = 64
ON_SLOWER = ("warn", "raise")


class SlowerThanDenseWarning(UserWarning):
    """A factorized layer measured slower than the dense layer it replaces."""


def check_speed_options(optimize, input_shape, on_slower, context):
    if optimize not in (None, "speed"):
        raise ValueError(f"{context}: optimize={optimize!r} is not understood; pass None or 'speed'")
    if on_slower not in ON_SLOWER:
        raise ValueError(f"{context}: on_slower={on_slower!r} is not one of {ON_SLOWER}")
    if input_shape is not None and optimize is None:
        raise ValueError(f"{context}: input_shape= is only used with optimize='speed'")


def round_ranks(rank, limits, multiple=ROUND_TO):
    """Each rank to the nearest multiple of ``multiple`` within ``[multiple, limit]`` (int or tuple in, same out)."""
    def one(r, limit):
        if limit < multiple:
            return r
        rounded = max(multiple, int(round(r / multiple)) * multiple)
        return min(rounded, limit)
    if isinstance(rank, tuple):
        return tuple(one(r, lim) for r, lim in zip(rank, limits))
    return one(rank, limits)


def time_modules(modules: dict, x, repeats: int = 7, warmup: int = 2) -> dict:
    """Median seconds of ``module(x)`` for each entry, rounds interleaved (see module docstring)."""
    samples = {k: [] for k in modules}
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for module in modules.values():
            for _ in range(warmup):
                module(x)
        for _ in range(repeats):
            for key, module in modules.items():
                sync()
                start = time.perf_counter()
                module(x)
                sync()
                samples[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def default_input_shape(layer, input_shape, context):
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    if isinstance(layer, torch.nn.Linear):
        return (DEFAULT_LINEAR_BATCH, layer.in_features)
    raise ValueError(f"{context}: optimize='speed' on a conv needs input_shape=(N, C, *spatial), the shape "
                     f"the layer will see, to time it against the dense conv")


def finish(module, layer, *, optimize, input_shape, on_slower, context, rebuild=None, limits=None):
    """Apply the ``optimize`` policy (module docstring) to a freshly built ``module``; returns it."""
    module.speedup = None
    module.slower_than_dense = None
    if optimize is None:
        return module
    shape = default_input_shape(layer, input_shape, context)
    if rebuild is not None and limits is not None:
        rounded = round_ranks(module.rank, limits)
        if rounded != module.rank:
            module = rebuild(rounded)
            module.speedup = module.slower_than_dense = None
    weight = layer.weight
    x = torch.randn(shape, dtype=weight.dtype, device=weight.device)
    impls = getattr(module, "implementations", ())
    if len(impls) > 1:
        variants = {}
        for impl in impls:
            variant = copy.copy(module)  # shallow: shares the parameters, own implementation flag
            variant.implementation = impl
            variants[impl] = variant
        times = time_modules(variants, x)
        module.implementation = min(times, key=times.get)
    dense = copy.deepcopy(layer)
    times = time_modules({"dense": dense, "factorized": module}, x)
    module.speedup = times["dense"] / times["factorized"]
    module.speed_info = dict(dense_ms=times["dense"] * 1e3, factorized_ms=times["factorized"] * 1e3,
                             input_shape=shape, threads=torch.get_num_threads(),
                             implementation=getattr(module, "implementation", None))
    module.slower_than_dense = module.speedup < 1
    if module.slower_than_dense:
        message = (f"{context}: the factorized layer ({type(module).__name__}, rank={module.rank}) ran "
                   f"{times['factorized'] * 1e3:.3g} ms vs {times['dense'] * 1e3:.3g} ms dense on input {shape} "
                   f"(speedup {module.speedup:.2f}x < 1)")
        if on_slower == "raise":
            raise ValueError(message + "; on_slower='raise'")
        warnings.warn(message + "; returned anyway and marked module.slower_than_dense = True "
                      "(pass on_slower='raise' to keep the layer dense in compress)",
                      SlowerThanDenseWarning, stacklevel=4)
    return module


__all__ = ["SlowerThanDenseWarning", "finish", "round_ranks", "time_modules", "check_speed_options"]
