"""Global rank allocation under a whole-model parameter or FLOP budget.

Zhang et al. 2016 (Accelerating Very Deep CNNs, sec. 3.3) choose per-layer ranks that
maximise ``prod_l E_l`` (E_l: kept energy of layer l) under a cost budget, greedily
removing the component whose removal loses the least relative energy per unit of
cost saved. We do the same for every spectral method with a *budget profile*:

* ``energies``: per rank axis, the squared singular values (descending; summed over
  groups) whose sum is the energy kept at a given rank;
* ``build(ranks)``: the factorized module at those ranks on the ``meta`` device, so
  the cost (``num_params`` or ``flops(shape)``) is read off the real layer class, never
  re-typed.

A layer starts dense. Its first move jumps to the largest ranks that are cheaper than
dense; later moves drop one component of one axis. Moves are taken in order of
``(log E_before - log E_after) / cost saved`` until the budget is met.

:func:`allocate_by_loss` is the allocator for additive, comparable per-component LOSS
estimates (:class:`LossProfile`, e.g. Fisher-weighted output spectra from
:func:`layers.sequential.layer_loss_profiles`): it minimizes the summed estimated loss
increase under the cost budget, the dense state being one option of every layer (no
dense -> break-even jump), by a Lagrangian search over the price of a parameter, then fills
the remaining budget one rank at a time; it ends within one rank step of the budget.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Components keeping less than this fraction of a layer's energy are rounding noise (e.g.
# the jitter of a whitened spectrum); the fill-up pass does not spend budget on them.
NOISE_ENERGY = 1e-9


@dataclass
class BudgetProfile:
    """What the allocator needs from one layer (see module docstring)."""

    energies: list
    build: Callable
    dense_cost: int = 0
    objective: str = "energy"  # "loss": energies are absolute estimated loss increases, comparable across layers
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def full_ranks(self) -> tuple:
        return tuple(len(e) for e in self.energies)

    def kept_fraction(self, ranks) -> float:
        """Kept energy fraction: 1 - sum over axes of the discarded fractions (HOSVD-style)."""
        lost = sum(float(e[r:].sum()) / max(float(e.sum()), 1e-300) for e, r in zip(self.energies, ranks))
        return max(1.0 - lost, 1e-300)


@dataclass
class Allocation:
    """Result: ``ranks[name]`` (tuple, or None = keep dense), the cost reached and the target.

    When ``met`` is False every layer is at its cheapest reachable state, so ``cost`` is
    the smallest cost the method can reach.
    """

    ranks: dict
    cost: float
    target: float
    objective: float | None = None  # allocate_by_loss: the estimated loss increase of the allocation

    @property
    def met(self) -> bool:
        return self.cost <= self.target


def _break_even_ranks(profile, cost) -> tuple | None:
    """Largest uniformly scaled ranks whose cost is below the dense cost (None if none)."""
    full = np.array(profile.full_ranks, dtype=float)
    low, high = 0.0, 1.0
    best = None
    for _ in range(40):
        mid = (low + high) / 2
        ranks = tuple(max(1, int(math.floor(f * mid))) for f in full)
        if cost(ranks) < profile.dense_cost:
            best, low = ranks, mid
        else:
            high = mid
    if best is None and cost(tuple(1 for _ in full)) < profile.dense_cost:
        best = tuple(1 for _ in full)
    return best


def allocate(profiles: dict, cost_of: Callable, fixed_cost: float, target: float) -> Allocation:
    """Ranks maximizing ``prod_l E_l`` at total cost <= ``target``. ``cost_of(name, module)`` gives a
    module's cost (params or MACs).

    ``fixed_cost`` counts everything outside the profiled layers. Returns the ranks per
    layer (None for layers that stay dense), the total cost reached and the objective
    ``sum -log E_l`` (:func:`energy_objective`): the better of the greedy rule and, when every
    layer has one rank axis with an affine cost, the price search of :func:`allocate_by_loss`
    on ``-log E`` (a budget that is met beats one that is not; then the lower objective wins).
    """
    costs = {name: _cost_function(profile, lambda module, name=name: cost_of(name, module))
             for name, profile in profiles.items()}

    def cost(name):
        return costs[name]

    state = {name: None for name in profiles}
    total = fixed_cost + sum(p.dense_cost for p in profiles.values())
    heap, version = [], {name: 0 for name in profiles}

    def push_next(name):
        move = _next_move(profiles[name], state[name], cost(name))
        if move is not None:
            priority, ranks, saving = move
            heapq.heappush(heap, (priority, name, version[name], ranks, saving))

    for name in profiles:
        push_next(name)
    while total > target and heap:
        _, name, ver, ranks, saving = heapq.heappop(heap)
        if ver != version[name]:
            continue
        state[name] = ranks
        total -= saving
        version[name] += 1
        push_next(name)
    total = _fill_up(profiles, state, cost, total, target)
    greedy = Allocation(ranks=state, cost=total, target=target, objective=energy_objective(profiles, state))
    lagrangian = _lagrangian_energy_allocation(profiles, costs, fixed_cost, target)
    if lagrangian is not None and (lagrangian.met, -lagrangian.objective) > (greedy.met, -greedy.objective):
        return lagrangian
    return greedy


def energy_objective(profiles: dict, ranks: dict) -> float:
    """``sum_l -log E_l``: the energy allocator's objective (E_l = kept energy fraction; dense keeps 1)."""
    return sum(-math.log(profiles[n].kept_fraction(r)) for n, r in ranks.items() if r is not None)


def _lagrangian_energy_allocation(profiles, costs, fixed_cost, target):
    """The energy objective minimized by :func:`allocate_by_loss`'s price search (single rank axis, affine
    costs only; else None): each layer's loss at rank k is ``-log E(k)``, dense being one option, so
    no layer has to jump from dense to its break-even rank."""
    converted = {}
    for name, profile in profiles.items():
        full = profile.full_ranks[0] if len(profile.full_ranks) == 1 else 0
        if full < 2:
            return None
        affine = _affine_rank_cost(costs[name], full)
        if affine is None or affine[0] <= 0:
            return None
        step, first = affine
        converted[name] = LossProfile(losses=energy_losses(profile), step=int(step),
                                      dense_cost=int(profile.dense_cost), fixed_cost=int(first - step))
    result = _allocate_converted(converted, fixed_cost, target)
    result.objective = energy_objective(profiles, result.ranks)
    return result


def energy_losses(profile) -> np.ndarray:
    """Per-component losses of a single-axis energy profile: ``-log E(k) + log E(k + 1)`` (E: kept fraction)."""
    energies = np.asarray(profile.energies[0], dtype=float)
    lost = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]]) / max(float(energies.sum()), 1e-300)
    curve = -np.log(np.maximum(1.0 - lost, 1e-300))  # -log E(k), k = 0 .. full (as kept_fraction)
    return np.maximum(-np.diff(curve), 0.0)


def _affine_rank_cost(cost, full):
    """``(step, cost at rank 1)`` when ``cost((k,)) = cost((1,)) + step * (k - 1)`` holds at ranks 1, 2 and
    ``full``; else None. The per-rank price a :class:`LossProfile` needs."""
    step, first = cost((2,)) - cost((1,)), cost((1,))
    if full >= 2 and cost((full,)) != first + step * (full - 1):
        return None
    return step, first


def _allocate_converted(converted, fixed_cost, target):
    """:func:`allocate_by_loss` on ``converted`` LossProfiles, with ``fixed_cost`` added back to cost and target."""
    allocation = allocate_by_loss(converted, target - fixed_cost)
    allocation.cost += fixed_cost
    allocation.target = target
    return allocation


def _fill_up(profiles, state, cost, total, target):
    """Give back single components (best energy gain per cost first) while the budget holds.

    The greedy removal overshoots by at most its last move; this closes the gap.
    """
    while True:
        best = None
        for name, ranks in state.items():
            if ranks is None:
                continue
            profile, of = profiles[name], cost(name)
            for axis, r in enumerate(ranks):
                if r >= profile.full_ranks[axis]:
                    continue
                larger = ranks[:axis] + (r + 1,) + ranks[axis + 1:]
                extra = of(larger) - of(ranks)
                if extra <= 0 or total + extra > target or of(larger) >= profile.dense_cost:
                    continue
                gain = math.log(profile.kept_fraction(larger)) - math.log(profile.kept_fraction(ranks))
                if gain <= NOISE_ENERGY:  # a component that keeps (numerically) no energy is not worth its cost
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, name, larger, extra)
        if best is None:
            return total
        _, name, larger, extra = best
        state[name] = larger
        total += extra


def _cost_function(profile, measure):
    """``ranks -> cost`` for one layer, memoized.

    Costs are always read off real modules built at those ranks; when the layer has one
    rank axis and its cost is affine in the rank (checked at ranks 1, 2 and full), the
    line through the measured points is used instead of building a module per rank.
    """
    def built(ranks):
        if ranks not in profile._cache:
            profile._cache[ranks] = measure(profile.build(ranks))
        return profile._cache[ranks]

    if len(profile.full_ranks) == 1 and profile.full_ranks[0] >= 3:
        first, second, full = built((1,)), built((2,)), built(profile.full_ranks)
        slope = second - first
        if full == first + slope * (profile.full_ranks[0] - 1):
            return lambda ranks: first + slope * (ranks[0] - 1)
    return built


def _next_move(profile, ranks, cost):
    """(priority, new ranks, cost saved) of the layer's best next move, or None."""
    if ranks is None:
        start = _break_even_ranks(profile, cost)
        if start is None:
            return None
        saving = profile.dense_cost - cost(start)
        loss = -math.log(profile.kept_fraction(start))
        return loss / saving, start, saving
    best = None
    current_cost, kept = cost(ranks), profile.kept_fraction(ranks)
    for axis, r in enumerate(ranks):
        if r <= 1:
            continue
        smaller = ranks[:axis] + (r - 1,) + ranks[axis + 1:]
        saving = current_cost - cost(smaller)
        if saving <= 0:
            continue
        loss = math.log(kept) - math.log(profile.kept_fraction(smaller))
        candidate = (loss / saving, smaller, saving)
        if best is None or candidate[0] < best[0]:
            best = candidate
    return best


@dataclass
class LossProfile:
    """One layer for :func:`allocate_by_loss`.

    ``losses[i]``: estimated loss increase of dropping component ``i`` (components in the order
    they are kept); the layer at rank ``k`` costs ``k * step + fixed_cost`` and loses
    ``sum(losses[k:])``; dense costs ``dense_cost`` and loses nothing. Ranks below
    ``min_rank`` are never chosen (the layer stays dense rather than go below it).
    ``rank_costs`` (optional, ``len(losses) + 1`` values, non-decreasing over the available
    ranks, ``inf`` = rank not available) replaces the affine cost by measured ones (e.g.
    seconds, :mod:`layers.latency`) or leaves only some ranks available (e.g. multiples of 8,
    :func:`multiple_rank_costs`).
    """

    losses: np.ndarray
    step: int
    dense_cost: float
    fixed_cost: int = 0
    min_rank: int = 1
    rank_costs: np.ndarray | None = None

    @property
    def max_rank(self) -> int:
        """Largest rank cheaper than dense (0 when none is)."""
        if self.rank_costs is not None:
            cheaper = np.flatnonzero(np.asarray(self.rank_costs[:len(self.losses) + 1]) < self.dense_cost)
            return int(cheaper[-1]) if len(cheaper) else 0
        cheaper = (self.dense_cost - self.fixed_cost - 1) // self.step
        return int(max(0, min(cheaper, len(self.losses))))

    def cost(self, rank) -> float:
        if rank is None:
            return self.dense_cost
        return float(self.rank_costs[rank]) if self.rank_costs is not None else rank * self.step + self.fixed_cost

    def costs(self, low: int, high: int) -> np.ndarray:
        """Costs of ranks ``low .. high`` (inclusive)."""
        if self.rank_costs is not None:
            return np.asarray(self.rank_costs[low:high + 1], dtype=float)
        return np.arange(low, high + 1) * self.step + self.fixed_cost

    def tail(self) -> np.ndarray:
        """``tail[k] = sum(losses[k:])`` for k = 0 .. len(losses)."""
        values = np.asarray(self.losses, dtype=float)
        return np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])

    def loss(self, rank) -> float:
        return 0.0 if rank is None else float(self.tail()[rank])

    def next_rank(self, rank: int, high=None):
        """The smallest available rank in ``(rank, high]`` (``high`` defaults to :attr:`max_rank`), or None."""
        high = self.max_rank if high is None else high
        if self.rank_costs is None:
            return rank + 1 if rank + 1 <= high else None
        available = np.flatnonzero(np.isfinite(np.asarray(self.rank_costs[rank + 1:high + 1], dtype=float)))
        return rank + 1 + int(available[0]) if len(available) else None

    @property
    def floor_rank(self):
        """The smallest available rank ``>= min_rank`` cheaper than dense, or None (the layer stays dense)."""
        if self.max_rank < self.min_rank:
            return None
        return self.next_rank(self.min_rank - 1)


def multiple_rank_costs(units: int, step: int, fixed_cost: int, multiple: int) -> np.ndarray:
    """``costs[k] = k * step + fixed_cost`` for k = 0 .. ``units`` where ``k`` is a multiple of ``multiple``,
    ``inf`` (not available) elsewhere: a :class:`LossProfile` that only takes kernel-friendly ranks."""
    costs = np.arange(units + 1, dtype=float) * step + fixed_cost
    costs[np.arange(units + 1) % multiple != 0] = np.inf
    return costs


def _choice(profile, tail, price):
    """The rank (None = dense) minimizing ``loss + price * cost`` for one layer."""
    low, high = profile.min_rank, profile.max_rank
    if high < low:
        return None
    ranks = np.arange(low, high + 1)
    values = tail[low:high + 1] + price * profile.costs(low, high)
    best = int(np.argmin(values))
    return None if price * profile.dense_cost <= values[best] else int(ranks[best])


def allocate_by_loss(profiles: dict, target: float) -> Allocation:
    """Ranks ``{name: (k,) or None (dense)}`` minimizing the summed estimated loss at total cost <= ``target``.

    ``target`` counts the profiled layers only. Finds the smallest price per parameter
    whose per-layer choices fit (bisection; the total cost falls as the price rises), then
    adds single ranks (or switches a layer back to dense) in order of loss saved per extra
    cost while the budget holds. On return no layer can take one more rank within the
    budget; ``met`` is False only when every layer at its floor is still over.
    """
    tails = {name: p.tail() for name, p in profiles.items()}

    def solve(price):
        return {name: _choice(p, tails[name], price) for name, p in profiles.items()}

    def total(choice):
        return sum(profiles[n].cost(r) for n, r in choice.items())

    high = 1.0
    top = max((float(t[0]) for t in tails.values()), default=1.0) or 1.0
    floor_choice = {n: p.floor_rank for n, p in profiles.items()}
    if total(floor_choice) > target:
        state = floor_choice
    else:
        high = top
        while total(solve(high)) > target and high < top * 1e30:
            high *= 2
        low = 0.0
        for _ in range(200):
            mid = (low + high) / 2
            if total(solve(mid)) > target:
                low = mid
            else:
                high = mid
        state = solve(high)
        _fill_by_loss(profiles, tails, state, target)
    cost = total(state)
    objective = sum(float(tails[n][r]) if r is not None else 0.0 for n, r in state.items())
    return Allocation(ranks={n: (None if r is None else (r,)) for n, r in state.items()}, cost=cost, target=target,
                      objective=objective)


def allocate_profiles_by_loss(profiles: dict, cost_of: Callable, fixed_cost: float, target: float,
                              min_rank=None) -> Allocation:
    """:func:`allocate_by_loss` over single-axis :class:`BudgetProfile` s whose objective is ``"loss"``.

    Same arguments as :func:`allocate` (``target`` counts the whole ``fixed_cost +`` profiled
    layers). Each layer's cost must be affine in its rank (read off real modules at ranks 1, 2
    and full); ``min_rank`` (``{fnmatch pattern: int rank or float fraction of the full rank}``,
    first match wins) is the smallest rank a layer may take (else it stays dense).
    """
    converted = {}
    for name, profile in profiles.items():
        if profile.objective != "loss" or len(profile.full_ranks) != 1:
            raise ValueError(f"{name}: loss allocation needs a single-axis profile of estimated losses "
                             f"(objective {profile.objective!r}, {len(profile.full_ranks)} rank axes)")
        full = profile.full_ranks[0]
        affine = _affine_rank_cost(_cost_function(profile, lambda module, name=name: cost_of(name, module)), full)
        if affine is None:
            raise ValueError(f"{name}: its cost is not affine in the rank; loss allocation cannot price it")
        step, first = affine
        converted[name] = LossProfile(losses=np.asarray(profile.energies[0], dtype=float), step=max(int(step), 1),
                                      dense_cost=int(profile.dense_cost), fixed_cost=int(first - step),
                                      min_rank=rank_floor(name, full, min_rank))
    return _allocate_converted(converted, fixed_cost, target)


def rank_floor(name: str, full: int, min_rank=None) -> int:
    """The smallest rank ``name`` may take: the first ``fnmatch`` pattern of ``min_rank`` matching it
    (an int rank, or a float fraction of ``full`` rounded up), else 1; clipped to ``[1, full]``."""
    import fnmatch

    for pattern, value in (min_rank or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            floor = int(math.ceil(value * full)) if isinstance(value, float) else int(value)
            return max(1, min(floor, full))
    return 1


def _fill_by_loss(profiles, tails, state, target):
    """Spend what is left of the budget: one step at a time to the next available rank (or back to dense),
    best loss saved per cost first."""
    spent = sum(profiles[n].cost(r) for n, r in state.items())
    heap = []

    def push(name):
        p, r = profiles[name], state[name]
        if r is None:
            return
        up = p.next_rank(r)
        extra = p.cost(up) - p.cost(r)
        saved = float(tails[name][r]) - (float(tails[name][up]) if up is not None else 0.0)
        heapq.heappush(heap, (-saved / max(extra, 1e-300), name, r, up, extra))  # a free step first

    for name in state:
        push(name)
    skipped = []
    while heap:
        _, name, r, up, extra = heapq.heappop(heap)
        if state[name] != r:
            continue
        if spent + extra > target:
            skipped.append(name)
            continue
        state[name], spent = up, spent + extra
        push(name)
    return spent
