"""Sequential fits on few calibration rows: the report flags them, and ``shrinkage=`` shrinks the three
statistics alike so that the fit generalizes; the reported error stays the exact calibration error."""
import math

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.decomp.asymmetric import sequential_objective
from decomp_toolkit.layers.sequential import FitStatistics, compress_sequential, fit_layer


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(_Block(), _Block()).eval()


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_few_rows_are_flagged_and_oas_shrinkage_generalizes():
    net, gen = _net(), torch.Generator().manual_seed(1)
    x, new = torch.randn(64, 32, generator=gen), torch.randn(512, 32, generator=gen)
    errors = {}
    for shrinkage in (None, "oas"):
        with pytest.warns(UserWarning, match=r"fewer than 4 calibration rows per input entry: .*fc2 \(64 rows"):
            small, report = compress_sequential(net, [x], ratio=0.9, blocks=["0", "1"], progress=False,
                                                shrinkage=shrinkage)
        assert any("shrinkage='oas'" in note for note in report.notes)
        assert all((fit.diagnostics["shrinkage"] > 0) == (shrinkage == "oas") for fit in report.fits.values())
        with torch.no_grad():
            errors[shrinkage] = _rel(small(new), net(new))
    assert errors["oas"] < 0.5 * errors[None]


def test_many_rows_are_not_flagged_and_auto_leaves_them_unshrunk():
    net = _net()
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(2))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = compress_sequential(net, [x], ratio=0.5, blocks=["0", "1"], progress=False)
    assert all(fit.diagnostics["shrinkage"] == 0 for fit in report.fits.values())
    assert not any("calibration rows per input" in note for note in report.notes)


def _statistics(n_rows, seed=3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n_rows, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                                   dtype=torch.float64)
    Xp = X + 0.2 * torch.randn(X.shape, generator=gen, dtype=torch.float64)
    stats = FitStatistics.empty(12)
    stats.add(X, Xp)
    return X, Xp, stats


@pytest.mark.parametrize("shrinkage", [0.3, 1.0, "oas"])
def test_the_error_of_a_shrunk_fit_is_the_exact_calibration_error(shrinkage):
    X, Xp, stats = _statistics(8)
    layer = nn.Linear(12, 6, bias=False).double()
    module, fit = fit_layer(layer, stats, 3, shrinkage=shrinkage)
    W, Wp = layer.weight.detach(), module.dense_weight().detach()
    direct = float(torch.linalg.norm(W @ X.T - Wp @ Xp.T))
    assert math.isclose(fit.error, direct, rel_tol=1e-8) and fit.error_bound == fit.error
    assert math.isclose(fit.error, sequential_objective(W, Wp, X.T @ X, Xp.T @ Xp, Xp.T @ X), rel_tol=1e-8)
    if shrinkage == 1.0:   # fully shrunk statistics: the truncated SVD of the weight, rescaled
        U, S, Vh = torch.linalg.svd(W)
        truncated = (U[:, :3] * S[:3]) @ Vh[:3]
        scale = float(torch.trace(Xp.T @ X) / torch.trace(Xp.T @ Xp))
        torch.testing.assert_close(Wp, scale * truncated, rtol=1e-8, atol=1e-10)


def test_a_bad_shrinkage_says_what_to_pass():
    with pytest.raises(ValueError, match=r"shrinkage='held_out': pass 'auto'.*'oas'.*\[0, 1\] or None"):
        compress_sequential(_net(), torch.randn(16, 32), ratio=0.5, shrinkage="held_out", progress=False)
