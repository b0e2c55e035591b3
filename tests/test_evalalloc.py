"""Eval-driven allocation: compress(budget=..., eval_fn=...) measures, caches, fits monotone, meets the budget."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import compress
from decomp_toolkit.layers.evalalloc import monotone_tail


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with torch.no_grad():  # layer 2 low-rank-ish, layer 0 full-rank: they need different ranks
        model[2].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 32) / 4 + 0.01 * torch.randn(32, 32))
    return model.eval()


X = torch.randn(256, 32, generator=torch.Generator().manual_seed(1))


def _metric(reference):
    with torch.no_grad():
        target = reference(X)

    def eval_fn(model):
        with torch.no_grad():
            return -float((model(X) - target).pow(2).mean() / target.pow(2).mean())
    return eval_fn


def test_monotone_tail_is_nonincreasing_and_exact_at_full_rank():
    tail = monotone_tail({2: 0.5, 4: 0.6, 8: 0.1}, 16)  # a noisy bump at rank 4
    assert np.isnan(tail[:2]).all()
    assert tail[2] == tail[4] == pytest.approx(0.6) and tail[16] == 0.0
    assert (np.diff(tail[2:]) <= 1e-12).all()


def test_eval_fn_allocation_meets_budget_and_caches():
    model = _model()
    eval_fn, calls = _metric(model), []

    def counted(m):
        calls.append(1)
        return eval_fn(m)

    cache = {}
    small, report = compress(model, method="svd", budget=dict(params=0.5), eval_fn=counted, eval_cache=cache,
                             progress=False)
    before, after = report.targeted_totals("params")
    assert after <= 0.5 * before
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    assert cache and len(calls) == len(cache) + 1  # one baseline + one per (layer, rank)
    first = len(calls)
    compress(model, method="svd", budget=dict(params=0.4), eval_fn=counted, eval_cache=cache, progress=False)
    assert len(calls) == first + 1 + (len(cache) - (first - 1))  # only new (layer, rank) pairs are measured
    assert any("eval-driven allocation" in n for n in report.notes)


def test_eval_fn_beats_or_matches_energy_allocation_on_its_metric():
    model = _model()
    eval_fn = _metric(model)
    energy, _ = compress(model, method="svd", budget=dict(params=0.35), progress=False)
    driven, _ = compress(model, method="svd", budget=dict(params=0.35), eval_fn=eval_fn, progress=False)
    assert eval_fn(driven) >= eval_fn(energy) - 1e-6


def test_eval_fn_must_be_callable():
    with pytest.raises(TypeError, match="eval_fn must be a callable"):
        compress(_model(), method="svd", budget=dict(params=0.5), eval_fn=0.5, progress=False)
