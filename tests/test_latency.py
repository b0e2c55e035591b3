"""Latency budgets (layers.latency): the timed rank grid, the measured cost curves, the allocation under a
time budget, and compress(budget=dict(latency=...)). Times are synthetic (a cost model patched in for
layers.speed.time_modules): no wall-clock figure is asserted."""
import copy
import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import decomp_toolkit.layers.latency as latency
import decomp_toolkit.layers.speed as speed
from decomp_toolkit.layers import compress
from decomp_toolkit.layers.budget import LossProfile, allocate_by_loss
from decomp_toolkit.layers.latency import rank_costs, rank_grid, timed_rank


@given(st.integers(1, 2048))
def test_rank_grid_is_increasing_ends_at_full_and_holds_kernel_friendly_ranks(full):
    grid = rank_grid(full)
    assert grid == sorted(set(grid)) and grid[-1] == full and grid[0] >= 1
    assert set(range(1, min(full, 8))) <= set(grid)
    assert all(r % 8 == 0 for r in grid[:-1] if r >= 8)
    assert len(grid) <= 7 + 8 + 4 + 4 + full // 64 + 1


@given(st.dictionaries(st.integers(1, 40), st.floats(0.1, 10.0), min_size=1, max_size=12), st.floats(0.5, 8.0))
def test_rank_costs_is_the_cheapest_faster_timed_rank_at_or_above(times, dense):
    costs = rank_costs(times, 40, dense)
    assert all(a <= b for a, b in zip(costs[:-1], costs[1:]))  # non-decreasing (inf stays inf)
    for k in range(41):
        faster = [t for r, t in times.items() if r >= k and t < dense]
        assert costs[k] == (min(faster) if faster else np.inf)
        if faster:
            chosen = timed_rank(costs, times, k)
            assert chosen >= k and times[chosen] == costs[k]


def _step_profile(seed, full=24):
    rng = np.random.default_rng(seed)
    times = {r: float(r * rng.uniform(0.5, 1.5)) for r in (2, 4, 8, 16, 24)}
    dense = float(full * 0.8)
    return LossProfile(losses=np.sort(rng.gamma(0.5, 1.0, full))[::-1], step=1, dense_cost=dense,
                       rank_costs=rank_costs(times, full, dense)), times


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_allocation_on_measured_costs_meets_the_budget_with_timed_ranks(seed, keep):
    pairs = {f"l{i}": _step_profile(seed * 10 + i) for i in range(3)}
    profiles = {n: p for n, (p, _) in pairs.items()}
    target = keep * sum(p.dense_cost for p in profiles.values())
    result = allocate_by_loss(profiles, target)
    costs = {n: profiles[n].cost(None if r is None else r[0]) for n, r in result.ranks.items()}
    assert result.met and sum(costs.values()) == pytest.approx(result.cost) and result.cost <= target
    assert all(np.isfinite(c) for c in costs.values())
    # the exhaustive optimum over the timed ranks is no better than the allocation by more than one step's loss
    options = {n: [None] + sorted(t) for n, (_, t) in pairs.items()}
    best = min(sum(profiles[n].loss(r) for n, r in zip(options, combo))
               for combo in itertools.product(*options.values())
               if sum(profiles[n].cost(r) for n, r in zip(options, combo)) <= target)
    step_loss = max(float(p.losses.max()) for p in profiles.values()) * 8
    assert result.objective <= best + step_loss


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.Linear(64 * 8 * 8, 32)).eval()


def _synthetic_times(modules, x, **_):
    """Seconds = parameters x 1e-6, the factorized forms of the first conv (3 input channels) 50x slower."""
    def seconds(module):
        slow = 50.0 if getattr(module, "in_channels", None) == 3 and not isinstance(module, torch.nn.Conv2d) else 1.0
        return sum(p.numel() for p in module.parameters()) * 1e-6 * slow
    return {k: seconds(m) for k, m in modules.items()}


def _synthetic_clock(monkeypatch):
    """The allocation's timings and compress's re-timing of every built layer both on the synthetic cost model."""
    monkeypatch.setattr(latency, "time_modules", _synthetic_times)
    monkeypatch.setattr(speed, "time_modules", _synthetic_times)


def test_compress_latency_budget_keeps_slow_layers_dense_and_meets_the_predicted_time(monkeypatch):
    _synthetic_clock(monkeypatch)
    net, x = _net(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = compress(net, method="svd", budget=dict(latency=0.5), example_input=x, progress=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the input model is unchanged
    records = {r.name: r for r in report.layers}
    assert not records["0"].replaced  # every factorized form of it is slower than dense
    timed = report.latency
    assert report.budget.met and report.budget.cost <= 0.5 * timed["dense_seconds"] + 1e-15
    predicted = 0.0
    for name, record in records.items():
        layer = timed["layers"][name]
        if record.replaced:
            assert record.rank in layer["rank_seconds"]  # a timed rank, never one in between
            predicted += layer["rank_seconds"][record.rank]
        else:
            predicted += layer["dense_seconds"]
    assert predicted == pytest.approx(report.budget.cost)
    assert "budget: time of the targeted layers" in report.notes[0] and "met" in report.notes[0]
    assert sum(p.numel() for p in small.parameters()) == report.model_params_after


def test_latency_budget_bad_requests_say_what_to_pass():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="example_input"):
        compress(net, method="svd", budget=dict(latency=0.5), progress=False)
    with pytest.raises(ValueError, match="of='targeted'"):
        compress(net, method="svd", budget=dict(latency=0.5, of="model"), example_input=x, progress=False)
    with pytest.raises(ValueError, match="eval_fn"):
        compress(net, method="svd", budget=dict(latency=0.5), example_input=x, eval_fn=lambda m: 0.0,
                 progress=False)
    with pytest.raises(ValueError, match="one rank axis"):
        compress(net, method="tucker", budget=dict(latency=0.5), example_input=x, include=["2", "4"],
                 progress=False)


def test_unreachable_latency_budget_is_reported_not_met(monkeypatch):
    _synthetic_clock(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = compress(_net(), method="svd", budget=dict(latency=0.001), example_input=torch.randn(2, 3, 8, 8),
                             progress=False)
    assert report.budget_met is False and not report.budget.met
    assert "NOT met" in report.notes[0] and "ask for a larger fraction" in report.notes[0]


def test_mixed_loss_and_energy_profiles_are_all_allocated_on_energy(monkeypatch):
    """Estimated losses and -log kept energy are not comparable across layers: with one layer lacking a
    loss estimate every layer is allocated on energy, as the MAC / parameter allocator does."""
    from decomp_toolkit.layers.latency import allocate_latency
    from decomp_toolkit.layers.lowrank import svd_budget_profile

    monkeypatch.setattr(latency, "time_modules", _synthetic_times)
    torch.manual_seed(0)
    layers = {"a": torch.nn.Linear(48, 64), "b": torch.nn.Linear(64, 48)}
    gram = torch.eye(48, dtype=torch.float64) + 0.1
    mixed = {"a": svd_budget_profile(layers["a"], gram=gram, fisher=torch.rand(64, dtype=torch.float64) * 1e3),
             "b": svd_budget_profile(layers["b"])}
    assert [p.objective for p in mixed.values()] == ["loss", "energy"]
    shapes = {"a": (16, 48), "b": (16, 64)}

    def macs_of(name, module):
        return sum(p.numel() for p in module.parameters())
    for p, layer in zip(mixed.values(), layers.values()):
        p.dense_cost = macs_of(None, layer)
    as_energy = {n: copy.copy(p) for n, p in mixed.items()}
    as_energy["a"].objective = "energy"
    got = allocate_latency(mixed, layers, shapes, 0.5, macs_of=macs_of)
    expected = allocate_latency(as_energy, layers, shapes, 0.5, macs_of=macs_of)
    assert got.ranks == expected.ranks and got.objective == pytest.approx(expected.objective)
