"""Shrinkage chosen by held-out error, and the effective sample size of correlated calibration rows.

* ``compress(..., held_out=, shrinkage="held_out")`` keeps, per layer, the weight whose fit has the
  smallest relative output error on the held-out inputs: never worse than no shrinkage or OAS there.
* ``Calibration.effective_samples``: N for independent rows, N / f(rho, T) for AR(1) sequences.
"""
import math

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import calibrate, compress
from decomp_toolkit.layers.calibrate import HELD_OUT_WEIGHTS, Calibration
from decomp_toolkit.layers.compress import _output_error
from decomp_toolkit.layers.sample_size import row_correlation, variance_inflation


def ar1_sequences(batch, length, dim, rho, seed=0, mean=2.0, dtype=torch.float32):
    """``(batch, length, dim)`` rows: along each sequence a Gaussian AR(1) with coefficient ``rho``, unit variance."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    x = torch.empty_like(noise)
    x[:, 0] = noise[:, 0]
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + math.sqrt(1 - rho * rho) * noise[:, t]
    return (x + mean).to(dtype)


def mixed_inputs(rows, dim, seed):
    """Inputs with a decaying spectrum (a few strong directions, many weak ones) plus an offset."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, dim)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=gen)).Q
    return (torch.randn(rows, dim, generator=gen) * scales) @ basis.T + 0.5


def two_layers(dim=48, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 6)).eval()


# --------------------------------------------------------------------------- held-out choice

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_choice_is_no_worse_than_no_shrinkage_or_oas_on_the_held_out_data(seed):
    model = two_layers(seed=seed)
    cal = calibrate(model, mixed_inputs(30, 48, seed), progress=False)   # 30 rows < 48 inputs
    held = mixed_inputs(500, 48, seed + 100)
    errors = {}
    for rule in ("held_out", None, "oas"):
        small, report = compress(model, rank=6, calibration=cal, held_out=held, shrinkage=rule, progress=False)
        assert report.model_params_after == sum(p.numel() for p in small.parameters())
        errors[rule] = report.layers[0].held_out_error
    assert errors["held_out"] <= errors[None] * (1 + 1e-9)
    assert errors["held_out"] <= errors["oas"] * (1 + 1e-9)
    assert errors["held_out"] < errors[None]   # 30 rows for 48 inputs: some shrinkage does help here


def test_the_installed_layer_is_the_best_candidate_and_its_error_is_the_true_held_out_error():
    model = two_layers(seed=3)
    x = mixed_inputs(30, 48, 3)
    cal = calibrate(model, x, progress=False)
    held = mixed_inputs(400, 48, 7)
    small, report = compress(model, rank=5, calibration=cal, held_out=held, shrinkage="held_out", progress=False)
    record = report.layers[0]
    assert set(record.shrinkage_errors) == {f"{w:g}" for w in HELD_OUT_WEIGHTS} | {"oas", "oas ess"}
    assert record.held_out_error == pytest.approx(min(record.shrinkage_errors.values()), rel=1e-9)
    # the reported error is the layer's real output error on the held-out rows (its bias absorbs the
    # calibration mean: ||(W - W')(X - mean)^T|| / ||W (X - mean)^T||)
    dense, fitted = model[0], small[0]
    mean = x.double().mean(0)
    with torch.no_grad():
        reference = (held.double() - mean) @ dense.weight.double().T
        delta = dense(held).double() - fitted(held).double()
    assert float(delta.norm() / reference.norm()) == pytest.approx(record.held_out_error, rel=1e-4)
    assert any("held-out choice" in n for n in report.notes)


def test_auto_with_held_out_validates_only_the_undersampled_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16)).eval()
    cal = calibrate(model, torch.randn(40, 64), progress=False)   # layer 0: 40 < 64; layer 2: 40 >= 16
    _, report = compress(model, rank=4, calibration=cal, held_out=torch.randn(200, 64), progress=False)
    first, last = report.layers
    assert first.shrinkage_errors is not None and last.shrinkage_errors is None and last.shrinkage is None
    assert first.samples == 40 and first.input_dim == 64 and last.input_dim == 16
    assert "effective_samples" in report.columns and "shrinkage" in report.columns


def test_held_out_choice_works_with_a_budget_and_on_convs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    images = torch.nn.functional.avg_pool2d(torch.randn(4, 4, 10, 10), 3, 1, 1)   # smooth: correlated patches
    cal = calibrate(model, images, progress=False)
    small, report = compress(model, budget=dict(params=0.5), calibration=cal, shrinkage="held_out",
                             held_out=torch.nn.functional.avg_pool2d(torch.randn(6, 4, 10, 10), 3, 1, 1),
                             progress=False)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    for record in report.replaced:
        assert record.held_out_error == pytest.approx(min(record.shrinkage_errors.values()), rel=1e-9)
        assert record.effective_samples < record.samples   # neighbouring patches of a smooth image


def test_held_out_shrinkage_without_held_out_data_names_the_option_and_what_to_pass():
    model = two_layers()
    cal = calibrate(model, torch.randn(20, 48), progress=False)
    with pytest.raises(ValueError, match=r"shrinkage='held_out'.*held_out=<batches"):
        compress(model, rank=4, calibration=cal, shrinkage="held_out", progress=False)
    with pytest.raises(ValueError, match=r"shrinkage='held_out'.*pass held_out="):
        cal.statistics("0", shrinkage="held_out")
    with pytest.raises(ValueError, match="held_out"):   # the rule list names the new rule
        cal.statistics("0", shrinkage="validated")


# --------------------------------------------------------------------------- effective sample size

def test_independent_rows_have_an_effective_sample_size_of_n():
    x = ar1_sequences(64, 40, 12, rho=0.0)
    cal = calibrate(nn.Linear(12, 3), [x[:32], x[32:]], progress=False)
    assert abs(cal.autocorrelation("")[0]) < 0.02
    assert cal.effective_samples("") == pytest.approx(cal.samples[""], rel=0.01)
    flat = calibrate(nn.Linear(12, 3), x.reshape(-1, 12), progress=False)   # (N, D): no sequence axis
    assert flat.effective_samples("") == flat.samples[""] and flat.autocorrelation("") == []


@pytest.mark.parametrize("rho", [0.5, 0.9, 0.98])
def test_ar1_sequences_have_the_known_autocorrelation_and_effective_sample_size(rho):
    length = 50
    x = ar1_sequences(96, length, 10, rho, seed=int(rho * 100))
    batches = [x[i:i + 16] for i in range(0, 96, 16)]   # sums combined over calls taken about different means
    cal = calibrate(nn.Linear(10, 3), batches, progress=False)
    n = cal.samples[""]
    assert cal.autocorrelation("")[0] == pytest.approx(rho, abs=0.03)
    expected = n / variance_inflation(rho, length)
    assert cal.effective_samples("") == pytest.approx(expected, rel=0.15)
    assert cal.effective_samples("") < n * (1 - rho * rho) / (1 + rho * rho) * 1.2 + 96   # drops with rho
    assert cal.effective_samples("") >= 96 * 0.8   # never below about one sample per sequence


def test_the_inflation_is_the_variance_ratio_of_the_gram_entries():
    """f(rho, T) is what a Gram of correlated rows loses: Var(gram entry) / Var(same with i.i.d. rows)."""
    rho, length, reps = 0.8, 30, 1500
    x = ar1_sequences(reps * 4, length, 2, rho, seed=5, mean=0.0, dtype=torch.float64).reshape(reps, 4 * length, 2)
    iid = torch.randn(reps, 4 * length, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ratio = (torch.einsum("rni,rnj->rij", x, x).var(0) / torch.einsum("rni,rnj->rij", iid, iid).var(0)).mean()
    assert float(ratio) == pytest.approx(variance_inflation(rho, length), rel=0.12)


def test_padding_rows_are_left_out_of_the_correlation():
    x = ar1_sequences(8, 30, 6, rho=0.7, seed=2)
    padded = torch.cat([x, torch.zeros(8, 10, 6)], 1)
    mask = torch.cat([torch.ones(8, 30), torch.zeros(8, 10)], 1).long()
    layer = nn.Linear(6, 2)
    plain, masked = row_correlation(layer, x), row_correlation(layer, padded, mask)
    assert masked.rows == plain.rows == 240
    assert masked.autocorrelation()[0] == pytest.approx(plain.autocorrelation()[0], abs=1e-5)
    assert masked.effective_samples(240) == pytest.approx(plain.effective_samples(240), rel=1e-4)


def test_convs_use_the_stride_and_a_hand_built_calibration_falls_back_to_the_row_count():
    smooth = torch.nn.functional.avg_pool2d(torch.randn(4, 3, 28, 28), 5, 1)   # (4, 3, 24, 24), correlated
    noise = torch.randn(4, 3, 24, 24)
    for conv in (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, stride=4)):
        smooth_cal, noise_cal = calibrate(conv, smooth, progress=False), calibrate(conv, noise, progress=False)
        assert noise_cal.effective_samples("") == pytest.approx(noise_cal.samples[""], rel=0.02)
        assert smooth_cal.effective_samples("") < smooth_cal.samples[""] * (0.3 if conv.stride == (1, 1) else 1.0)
    strided = calibrate(nn.Conv2d(3, 4, 3, stride=4), smooth, progress=False)
    assert strided.autocorrelation("")[0] < calibrate(nn.Conv2d(3, 4, 3), smooth, progress=False).autocorrelation("")[0]
    by_hand = Calibration(grams={"a": torch.eye(3)[None].double()}, sums={"a": torch.zeros(1, 3).double()},
                          samples={"a": 7})
    assert by_hand.effective_samples("a") == 7.0


def test_held_out_choice_with_a_method_without_rank_and_one_without_a_data_aware_variant():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    cal = calibrate(model, mixed_inputs(20, 32, 0), progress=False)
    held = mixed_inputs(100, 32, 1)
    _, pq = compress(model, method="pq", n_centroids=4, block_size=4, calibration=cal, held_out=held,
                     shrinkage="held_out", progress=False)   # PQ takes no rank=: every candidate gets the spec
    first = pq.layers[0]
    assert first.replaced and first.held_out_error == pytest.approx(min(first.shrinkage_errors.values()), rel=1e-9)
    small, tt = compress(model, method="tt", ratio=0.5, calibration=cal, held_out=held, shrinkage="held_out",
                         progress=False)   # weights alone: the shrinkage request does not reach the method
    assert all(r.shrinkage is None and r.shrinkage_errors is None for r in tt.layers)
    assert any("no data-aware variant" in n for n in tt.notes)
    assert tt.model_params_after == sum(p.numel() for p in small.parameters())


def test_auto_decides_on_the_rows_and_ess_on_the_effective_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).eval()
    smooth = torch.nn.functional.avg_pool2d(torch.randn(2, 4, 12, 12), 5, 1, 2)   # 288 rows, strongly correlated
    cal = calibrate(conv, smooth, progress=False)
    rows, ess, dim = cal.samples[""], cal.effective_samples(""), 4 * 9
    assert ess < dim <= rows
    gram, _ = cal.statistics("", shrinkage=None)
    assert torch.equal(cal.statistics("", shrinkage="auto")[0], gram)       # enough rows: unchanged
    shrunk, _ = cal.statistics("", shrinkage="ess")
    assert not torch.allclose(shrunk, gram)
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).sum() / dim
    off = ~torch.eye(dim, dtype=torch.bool)
    assert float(shrunk[..., off].abs().sum()) < float(gram[..., off].abs().sum())  # towards tr(G)/p I
    assert torch.allclose(torch.diagonal(shrunk, dim1=-2, dim2=-1).sum() / dim, diag)
