"""``optimize="speed"`` and the slower-than-dense check: factorized layers timed against the dense layer.

Every method's ``decompose`` (and ``compress``) takes

* ``optimize=None`` (default: ranks are exactly what the spec gives) or ``optimize="speed"``;
* ``input_shape=``: the shape the layer will see (batch included). Required for convs
  (their cost depends on the spatial size); for Linear it defaults to ``(64, in_features)``;
  ``compress`` passes the shape each layer sees on ``example_input``;
* ``on_slower="warn"`` (default) or ``"raise"``.

With ``optimize="speed"``, after decomposing as asked, :func:`optimize_for_speed`

1. builds rank candidates near the rank the spec gave -- the same rounding applied to
   every mode: the nearest multiple of 8 (at least 8), the rank itself, and the
   multiples of 8, 16, 32 and 64 just below and above, those kept only within
   ``[0.8 r, 1.25 r]`` of that mode's rank ``r``, and none whose layer would hold more parameters than the dense
   one (GEMM/conv kernels run full vector widths on such multiples; which
   one a given shape likes is measured, not assumed: a k x 1 conv can run 2x slower at
   rank 104 than at 113);
2. crosses them with the module's forward implementations (``module.implementations``:
   CP separable/fused, TT contraction orders, ...);
3. times every candidate (random weights: time does not depend on values) and the dense
   layer in ONE interleaved run (:func:`layers.timing.compare`, median of ``REPEATS``
   rounds on a random input of ``input_shape``, ``inference_mode``), keeps the fastest
   (times within a factor ``1 + TIE`` of the fastest are ties, won by the earlier
   candidate: the nearest multiple of 8, then the asked rank), and re-decomposes the
   layer at that rank if it changed (skipping a rank the layer's shape cannot take); then times it against dense again,
   in a fresh interleaved pair (the fastest of several noisy candidates is biased low);
4. sets ``module.fit.speedup = dense_time / factorized_time`` and
   ``module.fit.diagnostics["speed"]`` (:func:`speed_info`: times in ms, ``theoretical`` =
   dense MACs / factorized MACs, ``efficiency`` = speedup / theoretical,
   ``slower_than_dense``, the candidates' times, shape, threads, implementation).

If ``speedup < 1``: with ``on_slower="warn"`` a :class:`SlowerThanDenseWarning` names the
layer and both times (the module is still returned: it is smaller); with
``on_slower="raise"`` an :class:`~layers.errors.UnsupportedLayerError`, so ``compress``
keeps that layer dense and says why in its report.

:func:`check_speed` is the same measurement without any choice; ``compress`` runs it on
every layer it builds when given ``example_input`` so that no slow-down is silent.
Without either, ``module.fit.speedup`` is None. Wall-clock numbers are
never asserted in tests: :func:`time_modules` is the one place that measures.
"""
from __future__ import annotations

import copy
import itertools
import warnings

import torch

from .errors import UnsupportedLayerError
from .fit import Fit
from .timing import compare_modules

SPEED_OPTIONS = ("optimize", "input_shape", "on_slower")
SPEED_DOCS = {
    "optimize": "None, or 'speed': time rank/implementation candidates on input_shape and keep the fastest "
                "(layers.speed)",
    "input_shape": "with optimize='speed': the input shape the layer sees (required for convs)",
    "on_slower": "with optimize='speed': 'warn' (default) or 'raise' when the layer runs slower than dense",
}
# the same, as lines of a builder docstring's ``Options:`` block (layers.registry parses them)
SPEED_OPTIONS_DOC = "".join(f"\n    {name}: {meaning}" for name, meaning in SPEED_DOCS.items()) + "\n"
ROUND_TO = 8
MULTIPLES = (8, 16, 32, 64)
WINDOW = (0.8, 1.25)
TIE = 0.03
REPEATS = 7
DEFAULT_LINEAR_BATCH = 64
ON_SLOWER = ("warn", "raise")
MIN_SAMPLE_S = 0.002  # fast layers: several calls per sample, so timer overhead does not decide


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


def rank_candidates(rank) -> list:
    """Candidate ranks near ``rank`` (int or tuple) in order of preference (module docstring, step 1):
    the nearest multiple of 8 first, then ``rank`` itself, then the other multiples."""
    modes = rank if isinstance(rank, tuple) else (rank,)
    rules = [lambda r: max(ROUND_TO, int(round(r / ROUND_TO)) * ROUND_TO), lambda r: r]
    for m in MULTIPLES:
        rules += [lambda r, m=m: r // m * m, lambda r, m=m: -(-r // m) * m]
    out = []
    for index, rule in enumerate(rules):
        ranks = []
        for r in modes:
            candidate = rule(r)
            nearest8 = index == 0  # always offered, even outside the window
            inside = candidate >= 1 and (nearest8 or WINDOW[0] * r <= candidate <= WINDOW[1] * r)
            ranks.append(candidate if inside else r)
        value = tuple(ranks) if isinstance(rank, tuple) else ranks[0]
        if value not in out:
            out.append(value)
    return out


def time_modules(modules: dict, x, repeats: int = REPEATS, warmup: int = 2) -> dict:
    """Median seconds of ``module(x)`` for each entry, rounds interleaved (:func:`layers.timing.compare`).

    On CPU with one torch thread the medians are of the measuring thread's CPU time
    (``time.thread_time``: the computation without the time other processes took the core
    away, which on a shared machine can triple the wall time); otherwise of wall time."""
    timings = compare_modules(modules, x, repeats=repeats, warmup=warmup, min_sample_s=MIN_SAMPLE_S)
    on_cpu_thread = not x.is_cuda and torch.get_num_threads() == 1
    return {k: (t.cpu_median if on_cpu_thread else t.median) for k, t in timings.items()}


def default_input_shape(layer, input_shape, context):
    if input_shape is not None:
        return tuple(int(d) for d in input_shape)
    if isinstance(layer, torch.nn.Linear):
        return (DEFAULT_LINEAR_BATCH, layer.in_features)
    raise ValueError(f"{context}: optimize='speed' on a conv needs input_shape=(N, C, *spatial), the shape "
                     f"the layer will see, to time it against the dense conv")


def _with_rank(module, rank):
    """A random-weight twin of ``module`` at ``rank`` (same class/config), or None if that rank is invalid."""
    if rank == getattr(module, "rank", None):
        return module
    weight = next(module.parameters())
    try:
        return type(module)(**{**module.config, "rank": rank}, device=weight.device, dtype=weight.dtype)
    except (ValueError, TypeError, RuntimeError):
        return None


def _variants(module, tune_rank: bool, max_params: int) -> dict:
    """``{(rank, implementation): module}`` to time (module docstring, steps 1-2); a candidate rank other than the
    built one whose layer would hold more than ``max_params`` parameters (the dense layer's) is not offered."""
    rank = getattr(module, "rank", None)
    ranks = rank_candidates(rank) if tune_rank and rank is not None and hasattr(module, "config") else [rank]
    impls = tuple(getattr(module, "implementations", ())) or (getattr(module, "implementation", None),)
    variants = {}
    for r, impl in itertools.product(ranks, impls):
        twin = _with_rank(module, r)
        if twin is None or (r != rank and sum(p.numel() for p in twin.parameters()) > max_params):
            continue
        if impl is not None and len(impls) > 1:
            twin = copy.copy(twin)  # shallow: shares the parameters, own implementation flag
            twin.implementation = impl
        variants[(r, impl)] = twin
    return variants


def _ranking(times: dict) -> list:
    """Keys to try, best first: those within ``1 + TIE`` of the fastest in their order of preference
    (insertion order), then the others by time."""
    best = min(times.values())
    close = [k for k in times if times[k] <= best * (1 + TIE)]
    return close + sorted((k for k in times if k not in close), key=times.get)


def optimize_for_speed(module, layer, *, optimize=None, input_shape=None, on_slower="warn", context="",
                       rebuild=None):
    """Apply ``optimize`` (module docstring) to the freshly built ``module`` of ``layer``; returns the module.

    ``rebuild(rank)`` re-decomposes ``layer`` at another rank (same method and options);
    without it the rank is kept and only the implementation is chosen."""
    check_speed_options(optimize, input_shape, on_slower, context)
    if optimize is None:
        return module
    shape = default_input_shape(layer, input_shape, context)
    variants = _variants(module, tune_rank=rebuild is not None, max_params=sum(p.numel() for p in layer.parameters()))
    x = _random_input(layer, shape)
    dense = copy.deepcopy(layer)
    times = time_modules({"dense": dense, **variants}, x)
    times.pop("dense")
    module, (rank, impl) = _build_best(module, _ranking(times), rebuild, context)
    if impl is not None:
        module.implementation = impl
    candidates = {_label(k): t * 1e3 for k, t in times.items()}
    # a fresh A/B pair for the verdict: the minimum over several noisy candidates is biased low
    final = time_modules({"dense": dense, "factorized": module}, x)
    return _record(module, final["dense"], final["factorized"], shape, on_slower, context, candidates, 4)


def _build_best(module, ranked, rebuild, context):
    """The module at the fastest candidate rank the layer admits (a rank the shape cannot take is skipped)."""
    for rank, impl in ranked:
        if rank == getattr(module, "rank", None):
            return module, (rank, impl)
        try:
            return rebuild(rank), (rank, impl)
        except ValueError:  # e.g. rounded above what this layer's shape allows
            continue
    raise RuntimeError(f"{context}: optimize='speed' could rebuild none of its candidates")  # pragma: no cover


def check_speed(module, layer, input_shape, context="", on_slower="warn", stacklevel=6):
    """Time ``module`` against the dense ``layer`` on ``input_shape``; set ``speedup``/``speed_info``; warn if slower.

    ``stacklevel`` of the warning: the default points at the caller of ``compress``."""
    shape = tuple(int(d) for d in input_shape)
    times = time_modules({"dense": copy.deepcopy(layer), "factorized": module}, _random_input(layer, shape))
    return _record(module, times["dense"], times["factorized"], shape, on_slower, context, None, stacklevel)


def _random_input(layer, shape):
    """A random input of ``shape``; channels-last when the layer's weight is (a model converted with
    ``model.to(memory_format=torch.channels_last)`` runs its convs on channels-last activations)."""
    weight = layer.weight
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    x = torch.randn(shape, dtype=dtype, device=weight.device)
    if weight.dim() == 4 and len(shape) == 4 and _channels_last(weight):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _channels_last(weight) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def _label(key):
    rank, impl = key
    return f"rank={rank}" + (f", {impl}" if impl is not None else "")


def _record(module, dense_time, factorized_time, shape, on_slower, context, candidates, stacklevel):
    """Write the measurement into ``module.fit`` (``speedup``, ``diagnostics["speed"]``); warn or raise if slower."""
    fit = _fit_of(module)
    fit.speedup = dense_time / factorized_time
    theoretical = _theoretical(module, shape)
    slower = fit.speedup < 1
    fit.diagnostics["speed"] = dict(
        dense_ms=dense_time * 1e3, factorized_ms=factorized_time * 1e3, speedup=fit.speedup, theoretical=theoretical,
        efficiency=fit.speedup / theoretical if theoretical else None, slower_than_dense=slower, input_shape=shape,
        threads=torch.get_num_threads(),
        clock="thread CPU" if torch.get_num_threads() == 1 and next(module.parameters()).device.type == "cpu"
        else "wall", implementation=getattr(module, "implementation", None),
        rank=getattr(module, "rank", None), candidates=candidates)
    if slower:
        message = (f"the factorized layer ({type(module).__name__}, rank={getattr(module, 'rank', None)}) "
                   f"ran {factorized_time * 1e3:.3g} ms vs {dense_time * 1e3:.3g} ms dense on input {shape} "
                   f"(speedup {fit.speedup:.2f}x < 1)")
        if on_slower == "raise":
            raise UnsupportedLayerError(context, message + "; on_slower='raise'")
        warnings.warn(f"{context}: {message}; returned anyway, marked module.fit.diagnostics['speed']"
                      f"['slower_than_dense'] (pass on_slower='raise' to keep the layer dense in compress)",
                      SlowerThanDenseWarning, stacklevel=stacklevel)
    return module


def _fit_of(module):
    if not isinstance(getattr(module, "fit", None), Fit):  # a module built directly, not by decompose
        module.fit = Fit(ranks=getattr(module, "rank", None))
    return module.fit


def speed_info(module) -> dict | None:
    """The measurement of :func:`optimize_for_speed` / :func:`check_speed` on ``module`` (None if not timed)."""
    fit = getattr(module, "fit", None)
    return fit.diagnostics.get("speed") if isinstance(fit, Fit) else None


def _theoretical(module, shape):
    try:
        macs = module.flops(shape)
        return module.dense_flops(shape) / macs if macs > 0 else None
    except (AttributeError, NotImplementedError, ValueError, TypeError):
        return None


def finish(module, layer, *, optimize, input_shape, on_slower, context, rebuild=None, limits=None):
    """Compatibility entry of builders that still apply ``optimize`` themselves (see optimize_for_speed)."""
    return optimize_for_speed(module, layer, optimize=optimize, input_shape=input_shape, on_slower=on_slower,
                              context=context, rebuild=rebuild)


__all__ = ["SlowerThanDenseWarning", "SPEED_OPTIONS", "SPEED_DOCS", "SPEED_OPTIONS_DOC", "optimize_for_speed", "check_speed", "speed_info", "finish",
           "round_ranks", "rank_candidates", "time_modules", "check_speed_options"]
