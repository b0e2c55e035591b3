"""The global rank allocators of layers.budget: budgets met, objectives no worse than the alternatives."""
import numpy as np
import pytest

import decomp_toolkit.layers.budget as budget
from decomp_toolkit.layers.budget import BudgetProfile, LossProfile, allocate, allocate_by_loss, energy_objective
from decomp_toolkit.layers.lowrank import LowRankLinear

SHAPES = [(64, 32), (32, 64), (48, 48), (96, 24), (128, 128)]


def _energy_profiles(seed):
    rng = np.random.default_rng(seed)
    profiles = {}
    for i, (m, n) in enumerate(SHAPES):
        energies = np.sort(rng.gamma(0.3, 1.0, min(m, n)))[::-1]
        energies[0] *= 10.0 ** rng.uniform(0, 2)   # one dominant component, as in whitened transformer spectra
        profiles[f"l{i}"] = BudgetProfile([energies], lambda r, m=m, n=n: LowRankLinear(n, m, rank=r[0], device="meta"),
                                          dense_cost=m * n + m)
    return profiles


def _params(name, module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.7])
def test_energy_allocation_meets_the_budget_and_beats_the_greedy_rule_alone(seed, keep, monkeypatch):
    profiles = _energy_profiles(seed)
    dense = sum(p.dense_cost for p in profiles.values())
    best = allocate(profiles, _params, 0, keep * dense)
    cost = sum(_params(n, profiles[n].build(r)) if r is not None else profiles[n].dense_cost
               for n, r in best.ranks.items())
    assert best.met and cost == best.cost <= keep * dense
    assert best.objective == pytest.approx(energy_objective(profiles, best.ranks))
    monkeypatch.setattr(budget, "_lagrangian_energy_allocation", lambda *args: None)
    greedy = allocate(_energy_profiles(seed), _params, 0, keep * dense)
    assert best.objective <= greedy.objective + 1e-12


def test_loss_allocation_is_never_worse_than_uniform_ranks_on_its_objective():
    rng = np.random.default_rng(0)
    profiles = {}
    for i, (m, n) in enumerate([(64, 32), (32, 64), (48, 48), (96, 24)]):
        losses = np.sort(rng.gamma(0.5, 10.0 ** rng.uniform(-2, 2), min(m, n)))[::-1]
        profiles[f"l{i}"] = LossProfile(losses=losses, step=m + n, dense_cost=m * n + m, fixed_cost=m)
    dense = sum(p.dense_cost for p in profiles.values())
    for keep in (0.2, 0.35, 0.5):
        allocation = allocate_by_loss(profiles, keep * dense)
        uniform = {k: max(1, int((keep * p.dense_cost - p.fixed_cost) // p.step)) for k, p in profiles.items()}
        assert sum(profiles[k].cost(r) for k, r in uniform.items()) <= keep * dense
        assert allocation.met
        assert allocation.objective <= sum(profiles[k].loss(r) for k, r in uniform.items()) + 1e-12


@pytest.mark.parametrize("multiple,min_rank", [(4, 1), (3, 5), (8, 2)])
def test_loss_allocation_over_multiples_only_takes_them_and_no_layer_can_take_the_next_one(multiple, min_rank):
    rng = np.random.default_rng(multiple)
    profiles = {}
    for i, (units, step) in enumerate([(24, 40), (32, 24), (16, 56), (40, 16)]):
        losses = np.sort(rng.gamma(0.5, 10.0 ** rng.uniform(-1, 1), units))[::-1]
        profiles[f"p{i}"] = LossProfile(losses=losses, step=step, fixed_cost=7, dense_cost=units * step + 7,
                                        min_rank=min_rank,
                                        rank_costs=budget.multiple_rank_costs(units, step, 7, multiple))
    dense = sum(p.dense_cost for p in profiles.values())
    for keep in (0.4, 0.6, 0.8):   # above every floor (the smallest multiple >= min_rank of each layer)
        allocation = allocate_by_loss(profiles, keep * dense)
        assert allocation.met and allocation.cost <= keep * dense
        for name, r in allocation.ranks.items():
            p = profiles[name]
            if r is None:
                continue
            assert r[0] % multiple == 0 and r[0] >= min_rank and np.isfinite(p.cost(r[0]))
            up = p.next_rank(r[0])   # the next multiple (or dense) would break the budget
            assert up is None or up == r[0] + multiple
            extra = (p.cost(up) if up is not None else p.dense_cost) - p.cost(r[0])
            assert allocation.cost + extra > keep * dense


def test_floor_rank_is_the_first_available_rank_at_or_above_min_rank():
    costs = budget.multiple_rank_costs(20, 10, 0, 8)
    assert LossProfile(losses=np.ones(20), step=10, dense_cost=200, min_rank=3, rank_costs=costs).floor_rank == 8
    assert LossProfile(losses=np.ones(20), step=10, dense_cost=200, min_rank=17, rank_costs=costs).floor_rank is None
    assert LossProfile(losses=np.ones(20), step=10, dense_cost=200, min_rank=3).floor_rank == 3
