"""Latency budgets: ``compress(model, method, budget=dict(latency=f), example_input=x)``.

A FLOP budget assumes every MAC saved is time saved; on real kernels it is not (narrow
stages, layout reorders, ranks the kernels dislike: see ``benchmarks/results/speed_findings.md``),
so the layers the FLOP allocator cuts hardest may be the ones that realize least. A latency
budget allocates on *measured* time instead:

1. for each targeted layer (one rank axis: ``svd``), the dense layer and its factorized
   form at the ranks of :func:`rank_grid` (multiples of 8 up to 64, of 16 up to 128, of 32
   up to 256, of 64 beyond: the widths the kernels run at full speed; every rank below 8)
   are timed in one interleaved run on a random input of the shape the layer sees on
   ``example_input`` (:func:`layers.speed.time_modules`: random weights, the time does not
   depend on the values; the thread's CPU time with one torch thread); layers of the same
   configuration seeing the same input shape (a transformer's blocks) are timed once;
2. a rank ``k`` then costs the time of the cheapest timed rank ``>= k`` (a larger rank only
   loses less), ranks above the largest timed one are not available, and a rank timed
   slower than dense is never chosen (the layer stays dense);
3. :func:`layers.budget.allocate_by_loss` minimizes the summed loss estimate (the Fisher
   loss with ``calibrate(..., fisher=True)``, else ``-log`` of the kept energy, as the
   energy allocator) under ``sum of layer times <= f x sum of dense times``; every chosen
   rank is a timed one.

Guarantee: the allocation's predicted time (the sum of the times measured in step 1) is at
most the target; the report says it, and the time of each built layer is measured again
(``LayerRecord.speedup``), so a prediction the machine did not keep is visible. Wall-clock
figures depend on the machine: run the budget on the machine (and thread count) you deploy on.
"""
from __future__ import annotations

import numpy as np
import torch

from .budget import Allocation, LossProfile, allocate_by_loss, energy_losses, rank_floor
from .speed import _random_input, time_modules

GRID_STEPS = ((64, 8), (128, 16), (256, 32))  # (up to this rank, step); beyond: LARGE_STEP
LARGE_STEP = 64
SMALL_RANKS = 8  # every rank below this one is timed


def rank_grid(full: int) -> list:
    """The ranks a latency budget times for a layer of full rank ``full``: 1 .. 7, then multiples of
    8 up to 64, of 16 up to 128, of 32 up to 256, of 64 beyond, and ``full`` itself."""
    ranks, r = list(range(1, min(full, SMALL_RANKS))), SMALL_RANKS
    while r < full:
        ranks.append(r)
        step = next((s for top, s in GRID_STEPS if r < top), LARGE_STEP)
        r += step
    return ranks + [full]


def _timed_twin(meta_module):
    """The profile builder's ``meta`` module on the CPU with random weights (the time does not depend on them)."""
    module = meta_module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02)
    return module.eval()


def layer_rank_times(layer, profile, input_shape, max_macs=None, macs_of=None) -> tuple:
    """``(dense seconds, {rank: seconds})``: ``layer`` and its factorized form at each rank of
    :func:`rank_grid` (those with fewer MACs than ``max_macs`` when given; ``macs_of(module)``
    counts them) timed in one interleaved run on a random input of ``input_shape``."""
    full = profile.full_ranks[0]
    twins = {}
    for rank in rank_grid(full):
        module = profile.build((rank,))
        if max_macs is not None and macs_of(module) >= max_macs:
            break
        twins[rank] = _timed_twin(module)
    x = _random_input(layer, input_shape)
    with torch.inference_mode():
        times = time_modules({"dense": layer, **twins}, x)
    return times.pop("dense"), times


def rank_costs(times: dict, full: int, dense_time: float) -> np.ndarray:
    """``costs[k]``, k = 0 .. full: the least time of a timed rank ``>= k`` that ran faster than dense
    (``inf`` when none); non-decreasing in ``k``."""
    costs = np.full(full + 1, np.inf)
    for rank, seconds in times.items():
        if seconds < dense_time:
            costs[:rank + 1] = np.minimum(costs[:rank + 1], seconds)
    return costs


def timed_rank(costs: np.ndarray, times: dict, rank: int) -> int:
    """The timed rank whose time ``costs[rank]`` is (the largest such: it loses least)."""
    return max(r for r, t in times.items() if r >= rank and t == costs[rank])


def allocate_latency(profiles: dict, dense: dict, shapes: dict, fraction: float, *, macs_of, min_rank=None,
                     report=None) -> Allocation:
    """Ranks ``{name: (rank,) or None}`` whose summed measured time is <= ``fraction`` x the dense time of
    the targeted layers, at the least summed loss estimate (module docstring). ``profiles``: the
    single-axis :class:`layers.budget.BudgetProfile` of each layer; ``dense[name]``: the layer;
    ``shapes[name]``: the input shape it sees; ``macs_of(name, module)``: its MACs there. The losses are
    the profiles' estimated losses when every profile has them, else ``-log`` kept energy for all (the two
    are not comparable across layers)."""
    on_loss = all(p.objective == "loss" for p in profiles.values())
    converted, measured, cache = {}, {}, {}
    for name, profile in profiles.items():
        if len(profile.full_ranks) != 1:
            raise ValueError(f"{name}: budget=dict(latency=...) needs a method with one rank axis (e.g. "
                             f"method='svd'); this layer's profile has {len(profile.full_ranks)} rank axes")
        full, layer = profile.full_ranks[0], dense[name]
        key = (repr(layer), tuple(shapes[name]), layer.weight.dtype, layer.weight.stride(), full)
        if key not in cache:  # layers of the same configuration on the same input shape are timed once
            cache[key] = layer_rank_times(layer, profile, shapes[name], profile.dense_cost,
                                          lambda m, n=name: macs_of(n, m))
        dense_time, times = cache[key]
        losses = np.asarray(profile.energies[0], dtype=float) if on_loss else energy_losses(profile)
        converted[name] = LossProfile(losses=losses, step=1, dense_cost=dense_time, min_rank=rank_floor(
            name, full, min_rank), rank_costs=rank_costs(times, full, dense_time))
        measured[name] = (dense_time, times)
    dense_total = sum(p.dense_cost for p in converted.values())
    allocation = allocate_by_loss(converted, fraction * dense_total)
    allocation.ranks = {n: None if r is None else (timed_rank(converted[n].rank_costs, measured[n][1], r[0]),)
                        for n, r in allocation.ranks.items()}
    if report is not None:
        report.latency = dict(dense_seconds=dense_total, layers={n: dict(dense_seconds=d, rank_seconds=t) for n, (d, t) in measured.items()})
    return allocation


__all__ = ["rank_grid", "layer_rank_times", "rank_costs", "timed_rank", "allocate_latency"]
