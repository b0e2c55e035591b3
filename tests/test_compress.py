"""Whole-model compression: walker, policy, report, global budget allocation."""
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import LowRankConv, LowRankLinear, compress
from decomp_toolkit.layers.budget import BudgetProfile, allocate
from conftest import decaying_matrix


def small_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():  # trained-like decaying spectra
        model[5].weight.copy_(decaying_matrix(64, 2048, decay=0.3, seed=1, dtype=torch.float32))
        model[2].weight.copy_(decaying_matrix(32, 288, decay=0.5, seed=2, dtype=torch.float32).reshape(32, 32, 3, 3))
    return model.eval()


EXAMPLE = torch.randn(1, 8, 8, 8)


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for key in saved:
        assert torch.equal(now[key], saved[key]), key


def test_compress_does_not_mutate_and_replaces_layers():
    model = small_model()
    saved = state_copy(model)
    small, report = compress(model, energy=0.9, example_input=EXAMPLE, progress=False)
    assert_same_state(model, saved)
    assert small is not model
    assert isinstance(small[5], LowRankLinear) and isinstance(small[2], LowRankConv)
    assert isinstance(model[5], nn.Linear)
    replaced = {r.name for r in report.replaced}
    assert "5" in replaced and "2" in replaced


def test_inplace_replaces_in_the_given_model():
    model = small_model()
    same, _ = compress(model, energy=0.9, inplace=True, progress=False)
    assert same is model and isinstance(model[5], LowRankLinear)


def test_include_exclude_and_policy():
    model = small_model()
    _, report = compress(model, energy=0.9, exclude=["5"], progress=False)
    status = {r.name: r.status for r in report.layers}
    assert status["5"] == "skipped: excluded"
    policy = {"0": dict(method="svd", rank=2), "*": dict(method="svd", energy=0.5)}
    small, report = compress(model, policy=policy, progress=False)
    ranks = {r.name: r.rank for r in report.layers}
    assert ranks["0"] == 2
    _, only = compress(model, energy=0.9, include=["5"], progress=False)
    assert [r.name for r in only.replaced] == ["5"]


def test_report_totals_and_formats():
    model = small_model()
    small, report = compress(model, energy=0.9, example_input=EXAMPLE, progress=False)
    totals = report.totals()
    assert totals["params_after"] == sum(r.params_after for r in report.layers)
    assert totals["flops_before"] == sum(r.flops_before for r in report.layers)
    assert totals["model_params_after"] == sum(p.numel() for p in small.parameters())
    for record in report.replaced:
        assert record.rel_error == pytest.approx(record.rel_error_bound, rel=1e-4, abs=1e-6)
        module = small.get_submodule(record.name)
        assert record.params_after == module.num_params
    data = json.loads(report.to_json())
    assert len(data["layers"]) == 4
    assert report.to_markdown().count("\n") >= 5 and "total" in str(report)


def test_layer_not_smaller_is_skipped_with_reason():
    model = nn.Sequential(nn.Linear(16, 4))
    _, report = compress(model, rank=4, progress=False)
    assert report.layers[0].status.startswith("skipped: factorized form has")


def test_unreachable_request_is_reported_not_silent():
    model = nn.Sequential(nn.Linear(16, 4))
    _, report = compress(model, ratio=0.01, progress=False)
    assert "even rank 1" in report.layers[0].status


@pytest.mark.parametrize("budget", [dict(params=0.5), dict(params=0.2), dict(flops=0.5), dict(flops=0.3)])
def test_budget_is_met(budget):
    model = small_model()
    small, report = compress(model, budget=budget, example_input=EXAMPLE, progress=False)
    kind, fraction = next(iter(budget.items()))
    if kind == "params":
        assert report.model_params_after <= fraction * report.model_params_before
    else:
        totals = report.totals()
        assert totals["flops_after"] <= fraction * totals["flops_before"]
    assert report.notes and report.notes[0].startswith("budget:")
    assert report.budget.met


def test_budget_fill_up_leaves_less_than_one_component():
    model = small_model()
    _, report = compress(model, budget=dict(params=0.3), progress=False)
    target = 0.3 * report.model_params_before
    slack = target - report.model_params_after
    smallest_step = min(r.params_after // r.rank for r in report.replaced)
    assert 0 <= slack < max(smallest_step * 2, 1) + 64


def test_budget_that_cannot_be_met_says_by_how_much():
    model = small_model()
    _, report = compress(model, budget=dict(params=0.01), exclude=["5"], progress=False)
    assert "NOT met" in report.notes[0] and "over" in report.notes[0]
    assert not report.budget.met


def test_budget_prefers_the_compressible_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        model[0].weight.copy_(decaying_matrix(256, 256, decay=0.05, seed=3, dtype=torch.float32))
        model[1].weight.copy_(torch.linalg.qr(torch.randn(256, 256)).Q)  # flat spectrum
    _, report = compress(model, budget=dict(params=0.6), progress=False)
    ranks = {r.name: r.rank for r in report.layers}
    assert ranks["0"] is not None and (ranks["1"] is None or ranks["0"] < ranks["1"])


def test_single_layer_budget_matches_ratio():
    """With one layer, the allocation keeps the largest rank within the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200, bias=False))
    _, report = compress(model, budget=dict(params=0.25), progress=False)
    _, by_ratio = compress(model, ratio=0.25, progress=False)
    assert report.layers[0].rank == by_ratio.layers[0].rank


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=dict(params=0.5), energy=0.9), "do not also pass"),
    (dict(budget=dict(params=1.5)), "fraction must be in"),
    (dict(budget=dict(size=0.5)), "pass dict\\(params=fraction\\)"),
    (dict(budget=dict(flops=0.5)), "needs example_input"),
])
def test_bad_budget_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compress(small_model(), progress=False, **kwargs)


def test_allocate_greedy_order_on_synthetic_profiles():
    """Two one-axis profiles with linear cost: the flatter spectrum keeps more components."""
    def cost_model(ranks):  # stands in for a module: the cost is 20 per component
        return 20 * ranks[0]

    steep = BudgetProfile([torch.tensor([0.5 ** i for i in range(20)]).numpy() ** 2], cost_model, dense_cost=400)
    flat = BudgetProfile([torch.ones(20).numpy()], cost_model, dense_cost=400)
    profiles = {"steep": steep, "flat": flat}
    allocation = allocate(profiles, lambda name, cost: cost, fixed_cost=0, target=400)
    assert allocation.met and allocation.cost <= 400
    assert allocation.ranks["steep"][0] < allocation.ranks["flat"][0]
    assert math.isclose(allocation.cost, 20 * sum(r[0] for r in allocation.ranks.values()))


def test_mnist_cnn_budget_beats_uniform_ratio():
    zoo = pytest.importorskip("decomp_toolkit.analysis.zoo")
    try:
        model = zoo.load_mnist_cnn()
        images, labels = zoo.load_mnist_images(limit=1000)
    except zoo.MissingZooPackage as err:
        pytest.skip(str(err))
    by_budget, report = compress(model, budget=dict(params=0.25), example_input=images[:1], progress=False)
    uniform, uniform_report = compress(model, ratio=0.25, example_input=images[:1], progress=False)
    assert report.model_params_after <= 0.25 * report.model_params_before
    assert zoo.accuracy(by_budget, images, labels) > zoo.accuracy(uniform, images, labels) + 0.5


def test_optimize_speed_times_layers_and_keeps_slower_ones_dense(monkeypatch):
    """compress passes each layer's recorded input shape; a layer measured slower stays dense."""
    from decomp_toolkit.layers import speed

    def fake_times(modules, x, repeats=7, warmup=2):  # the factorized conv "loses", the linear "wins"
        slow = x.ndim == 4
        return {name: (2.0 if (name == "factorized") == slow else 1.0) for name in modules}

    monkeypatch.setattr(speed, "time_modules", fake_times)
    model = small_model()
    small, report = compress(model, method="tucker", rank=4, optimize="speed", example_input=EXAMPLE,
                             include=["2", "5"], progress=False)
    status = {r.name: r for r in report.layers}
    assert "slower" in status["2"].status or "speedup" in status["2"].status
    assert isinstance(small[2], nn.Conv2d)
    assert status["5"].replaced and status["5"].speedup == 2.0
    assert "speedup" in report.columns


def test_optimize_speed_needs_example_input():
    with pytest.raises(ValueError, match="needs example_input"):
        compress(small_model(), method="tucker", rank=4, optimize="speed", include=["2"], progress=False)


def test_calibrated_budget_allocates_by_output_energy():
    """With calibration, the allocation reads s_i(W L), so an input that only excites a few
    directions makes the layer cheap to compress even though its weight spectrum is flat."""
    from decomp_toolkit.layers import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(torch.linalg.qr(torch.randn(64, 64)).Q)        # flat spectrum
        model[1].weight.copy_(torch.linalg.qr(torch.randn(64, 64)).Q * 0.5)  # flat spectrum
    # inputs of layer 0 live in 4 directions; layer 1 sees them rotated: 4 directions too
    data = torch.randn(512, 4) @ torch.randn(4, 64)
    cal = calibrate(model, data, progress=False)
    small, report = compress(model, budget=dict(params=0.3), calibration=cal, progress=False)
    blind, blind_report = compress(model, budget=dict(params=0.3), progress=False)
    assert report.budget.met and blind_report.budget.met
    with torch.no_grad():
        reference = model(data)
        out_error = float((small(data) - reference).norm() / reference.norm())
        blind_error = float((blind(data) - reference).norm() / reference.norm())
    assert out_error < 1e-4 < 0.1 < blind_error


def test_time_layers_false_skips_the_speed_check():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SlowerThanDenseWarning can come from an untimed layer
        _, report = compress(model, method="svd", rank=4, example_input=x, time_layers=False, progress=False)
    replaced = [r for r in report.layers if r.status == "replaced"]
    assert replaced and all(r.speedup is None for r in replaced)
    assert all(r.flops_after is not None and r.flops_after < r.flops_before for r in replaced)
    _, timed = compress(model, method="svd", rank=4, example_input=x, progress=False)
    assert all(r.speedup is not None for r in timed.layers if r.status == "replaced")
    with pytest.raises(TypeError, match="time_layers"):
        compress(model, method="svd", rank=4, time_layers="no")
