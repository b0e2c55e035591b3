"""Eval-driven rank allocation: ``compress(model, budget=..., eval_fn=callable)``.

AIMET's greedy compression-ratio selection is the anchor: every targeted layer is
compressed ALONE at a few candidate ranks and the user's metric is measured each time
(``eval_fn(model) -> float``, higher is better); the drop from the uncompressed metric is a
per-layer cost curve. Here:

* candidate ranks: ``candidates`` fractions (default 1/16, 1/8, 1/4, 1/2) of the layer's
  break-even rank (the largest rank cheaper than dense); the full rank is exact (drop 0);
* monotone fit: the measured drops are clipped at 0 and replaced by their upper envelope
  (``drop(k) = max over measured k' >= k``), so a larger rank never looks worse; between
  measured ranks the drop is interpolated linearly; below the smallest candidate the layer
  is never taken (``min_rank``: unmeasured ground is not guessed);
* ties (flat curves, e.g. layers whose drops are all within noise) are broken by the
  layer's discarded energy, weighted ``1e-6`` of the metric's scale;
* allocation: :func:`layers.budget.allocate_by_loss` minimizes the summed drops under the
  budget (the additive approximation AIMET makes too).

Measurements are cached in ``cache`` (a dict the caller may keep across calls:
``{(layer name, method, rank, options key): drop}``), so several budgets on one model cost
one scan. The scan runs ``len(layers) * len(candidates) + 1`` evaluations: make ``eval_fn``
cheap (a few batches). The model passed to ``eval_fn`` is compress's working copy with one
layer swapped; ``eval_fn`` must not keep it.
"""
from __future__ import annotations

import numpy as np
import torch

from .budget import LossProfile, allocate_by_loss

DEFAULT_CANDIDATES = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
TIE_BREAK = 1e-6


def _swap(model, name, module):
    parent, _, child = name.rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    old = getattr(holder, child)
    setattr(holder, child, module)
    return old


def _linear_cost(profile, cost_of, name):
    """``(step, fixed)`` with cost(rank) = step * rank + fixed, read off modules built at ranks 1 and 2."""
    one, two = cost_of(name, profile.build((1,))), cost_of(name, profile.build((2,)))
    return two - one, one - (two - one)


def _options_key(options) -> str:
    return repr(sorted((k, v) for k, v in options.items() if not isinstance(v, torch.Tensor)))


def measure_drops(model, name, dense, ranks, method, options, eval_fn, baseline, cache):
    """``{rank: metric drop}`` of ``model`` with only layer ``name`` decomposed at each rank (cached)."""
    from .decompose import decompose

    drops, key = {}, _options_key(options)
    for rank in ranks:
        slot = (name, method, int(rank), key)
        if slot not in cache:
            factorized = decompose(dense, method=method, rank=int(rank), name=name, **options)
            original = _swap(model, name, factorized)
            try:
                with torch.no_grad():
                    cache[slot] = baseline - float(eval_fn(model))
            finally:
                _swap(model, name, original)
        drops[int(rank)] = cache[slot]
    return drops


def monotone_tail(drops, full_rank) -> np.ndarray:
    """``tail[k]`` for k = 0..full_rank: the fitted drop at rank k (see module docstring); NaN below the smallest."""
    ranks = sorted(drops)
    values = np.maximum([drops[r] for r in ranks], 0.0)
    envelope = np.maximum.accumulate(values[::-1])[::-1]
    points_r = np.array(ranks + [full_rank], dtype=float)
    points_d = np.append(envelope, 0.0)
    tail = np.full(full_rank + 1, np.nan)
    k = np.arange(ranks[0], full_rank + 1)
    tail[ranks[0]:] = np.interp(k, points_r, points_d)
    return tail


def eval_driven_plan(model, layers, plan, budget_total, fraction, cost_of, method, eval_fn, *, candidates=None,
                     cache=None, report=None) -> tuple:
    """``(new plan, Allocation)``: ranks chosen from measured metric drops (see module docstring).

    ``layers``: ``{name: dense module}`` of the targeted layers (as in ``plan``); ``cost_of(name,
    module)``: the budget's cost of a module; ``budget_total``: the cost the fraction applies to;
    the profiled layers' dense cost counts against it, everything else is fixed.
    """
    from .registry import available_methods

    entry = available_methods().get(method)
    if entry is None or entry.budget_profile is None:
        raise ValueError(f"eval_fn= allocation needs a method with a budget profile; method={method!r} has none")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a callable model -> float, got {type(eval_fn).__name__}")
    cache = {} if cache is None else cache
    candidates = DEFAULT_CANDIDATES if candidates is None else tuple(candidates)
    if not candidates or any(not 0 < c < 1 for c in candidates):
        raise ValueError(f"candidates={candidates!r}: pass fractions of the break-even rank in (0, 1)")
    with torch.no_grad():
        baseline = float(eval_fn(model))
    targeted = [n for n, s in plan.items() if not isinstance(s, str)]
    options = {n: {k: v for k, v in plan[n].items() if v is not None and k not in
                   ("method", "rank", "energy", "tol", "ratio")} for n in targeted}
    profiles = {name: _loss_profile(model, name, layers[name], method, options[name], entry, cost_of, eval_fn,
                                    baseline, cache, candidates) for name in targeted}
    usable = {n: p for n, p in profiles.items() if p is not None}
    fixed = budget_total - sum(p.dense_cost for p in usable.values())
    allocation = allocate_by_loss(usable, fraction * budget_total - fixed)
    allocation.cost += fixed
    allocation.target += fixed
    new_plan = dict(plan)
    for name in targeted:
        ranks = allocation.ranks.get(name)
        new_plan[name] = ("skipped: kept dense by the eval-driven allocation" if ranks is None else
                          dict(method=method, rank=ranks[0], **options[name]))
    if report is not None:
        report.notes.append(f"eval-driven allocation: baseline metric {baseline:.4f}; {len(cache)} cached "
                            f"single-layer measurements; summed predicted drop {allocation.objective:.4f}")
    return new_plan, allocation


def _loss_profile(model, name, dense, method, options, entry, cost_of, eval_fn, baseline, cache, candidates):
    from .transposed import budget_profile_of
    profile = budget_profile_of(entry, dense, **options)
    if len(profile.full_ranks) != 1:
        raise ValueError(f"{name}: eval_fn= allocation handles one rank axis (svd); method={method!r} has "
                         f"{len(profile.full_ranks)}")
    full = profile.full_ranks[0]
    dense_cost = cost_of(name, dense)
    step, fixed = _linear_cost(profile, cost_of, name)
    break_even = min(full, (dense_cost - fixed - 1) // max(step, 1))
    if break_even < 1:
        return None
    ranks = sorted({max(1, int(round(c * break_even))) for c in candidates})
    drops = measure_drops(model, name, dense, ranks, method, options, eval_fn, baseline, cache)
    tail = monotone_tail(drops, full)
    energies = np.asarray(profile.energies[0], dtype=float)
    lost = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]]) / max(energies.sum(), 1e-300)
    tail = np.nan_to_num(tail, nan=float(np.nanmax(tail)) if np.isfinite(tail).any() else 0.0)
    tail = tail + TIE_BREAK * max(abs(baseline), 1e-12) * lost
    losses = tail[:-1] - tail[1:]
    return LossProfile(losses=losses, step=step, dense_cost=dense_cost, fixed_cost=fixed, min_rank=ranks[0])


__all__ = ["eval_driven_plan", "measure_drops", "monotone_tail", "DEFAULT_CANDIDATES"]
