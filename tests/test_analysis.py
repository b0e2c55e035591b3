"""analysis: spectra, energy table, sensitivity scans and plots."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.analysis import (SensitivityTable, Table, energy_curve, energy_table, plot_energy, plot_pareto,
                      plot_sensitivity, plot_spectrum, sensitivity, spectra, spectrum, tradeoff_curve)
from decomp_toolkit.decomp.rank import rank_for_energy, tail_errors
from decomp_toolkit.layers import compress, decompose

THRESHOLDS = (0.5, 0.8, 0.9, 0.95, 0.99)


def _seeded(module, seed=0):
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p)
    return module


class Net(nn.Module):
    """Linear, plain / grouped / depthwise / bias-free Conv2d, Conv1d and Conv3d layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 12, (3, 2), groups=4, bias=False)
        self.depthwise = nn.Conv2d(12, 12, 3, groups=12)
        self.conv1d = nn.Conv1d(4, 6, 3)
        self.conv3d = nn.Conv3d(2, 5, 2)
        self.head = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5, bias=False))

    def forward(self, x):
        y = self.depthwise(self.grouped(torch.relu(self.conv(x))))
        return self.head(y.mean(dim=(2, 3)).repeat(1, 2))


@pytest.fixture
def net():
    return _seeded(Net()).double().eval()


# ---------------------------------------------------------------- spectrum

def _channel_matrix_by_loops(weight, groups):
    N = weight.shape[0]
    return [weight[i * N // groups:(i + 1) * N // groups].reshape(N // groups, -1) for i in range(groups)]


def _spatial_matrix_by_loops(weight, groups):
    """M[(c, y), (n, x)] = W[n, c, y, x] per group, written out element by element."""
    N, c, kh, kw = weight.shape
    n_g = N // groups
    out = []
    for g in range(groups):
        M = torch.zeros(c * kh, n_g * kw, dtype=weight.dtype)
        for n in range(n_g):
            for ci in range(c):
                for y in range(kh):
                    for x in range(kw):
                        M[ci * kh + y, n * kw + x] = weight[g * n_g + n, ci, y, x]
        out.append(M)
    return out


def test_spectrum_linear_equals_svdvals_of_weight(net):
    layer = net.head[0]
    s = spectrum(layer)
    assert s.dtype == np.float64 and s.shape == (16,)
    np.testing.assert_allclose(s, torch.linalg.svdvals(layer.weight.detach()).numpy(), rtol=1e-12)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(spectrum(layer.weight.detach().numpy()), s, rtol=1e-12)  # raw 2-D array


@pytest.mark.parametrize("scheme, builder", [("channel", _channel_matrix_by_loops),
                                             ("spatial", _spatial_matrix_by_loops)])
@pytest.mark.parametrize("name", ["conv", "grouped"])
def test_spectrum_conv_equals_svdvals_of_the_svd_matrix(net, name, scheme, builder):
    layer = getattr(net, name)
    s = np.atleast_2d(spectrum(layer, scheme))
    expected = [torch.linalg.svdvals(M).numpy() for M in builder(layer.weight.detach(), layer.groups)]
    assert s.shape == (layer.groups, len(expected[0]))
    np.testing.assert_allclose(s, np.stack(expected), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, scheme", [("head.0", "channel"), ("conv", "channel"), ("grouped", "channel"),
                                          ("conv", "spatial"), ("grouped", "spatial"), ("conv1d", "channel")])
def test_spectrum_is_what_decompose_truncates(net, name, scheme):
    """The Eckart-Young error decompose reports at rank r is the tail of our spectrum."""
    layer = net.get_submodule(name)
    s = spectrum(layer, scheme)
    options = {} if isinstance(layer, nn.Linear) else {"scheme": scheme}
    for rank in (1, 2):
        small = decompose(layer, "svd", rank=rank, **options)
        assert small.fit.error_bound == pytest.approx(tail_errors(s)[rank], rel=1e-9, abs=1e-12)


def test_spectrum_modes_are_unfolding_spectra(net):
    tl = pytest.importorskip("tensorly")
    weight = net.grouped.weight.detach()
    modes = spectrum(net.grouped, modes=True)
    assert sorted(modes) == [0, 1, 2, 3]
    for mode, s in modes.items():
        expected = np.linalg.svd(tl.unfold(weight.numpy(), mode), compute_uv=False)
        np.testing.assert_allclose(s, expected, rtol=1e-10, atol=1e-12)
    assert sorted(spectrum(weight, unfoldings=True)) == [0, 1, 2, 3]
    assert sorted(spectrum(weight, modes=(0, 1))) == [0, 1]


def test_spectrum_errors(net):
    with pytest.raises(ValueError, match="Conv2d"):
        spectrum(net.conv1d, "spatial")
    with pytest.raises(ValueError, match="scheme"):
        spectrum(net.conv, "rows")
    with pytest.raises(TypeError, match="ReLU"):
        spectrum(nn.ReLU())
    with pytest.raises(ValueError, match="2 dimensions"):
        spectrum(np.ones(3))


def test_energy_curve_matches_rank_rule():
    s = np.array([[4.0, 2.0, 1.0, 0.5], [3.0, 1.0, 1.0, 0.1]])
    curve = energy_curve(s)
    assert curve[0] == 0 and curve[-1] == pytest.approx(1.0) and np.all(np.diff(curve) >= 0)
    for t in THRESHOLDS:
        assert rank_for_energy(s, t) == max(1, int(np.argmax(curve >= t - 1e-15)))


# ---------------------------------------------------------------- energy table

@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_energy_table_matches_decompose(net, scheme):
    table = energy_table(net, THRESHOLDS, scheme=scheme)
    assert isinstance(table, Table)
    layers = dict(net.named_modules())
    assert [row["name"] for row in table] == ["conv", "grouped", "depthwise", "conv1d", "conv3d", "head.0", "head.2"]
    checked = 0
    for row in table:
        layer = layers[row["name"]]
        assert row["dense_params"] == sum(p.numel() for p in layer.parameters())
        assert row["shape"] == tuple(layer.weight.shape)
        options = {} if isinstance(layer, nn.Linear) else {"scheme": scheme}
        for t in THRESHOLDS:
            if row[f"rank@{t:g}"] is None:  # the svd method refuses this layer with this scheme
                with pytest.raises(ValueError):
                    decompose(layer, "svd", energy=t, **options)
                continue
            small = decompose(layer, "svd", energy=t, **options)
            assert row[f"rank@{t:g}"] == small.rank, (row["name"], t)
            assert row[f"params@{t:g}"] == small.num_params, (row["name"], t)
            checked += 1
    assert checked >= 4 * len(THRESHOLDS)


def test_energy_table_formats(net):
    table = energy_table(net)
    text, markdown = str(table), table.to_markdown()
    for row in table:
        assert row["name"] in text and row["name"] in markdown
    assert "rank@0.9" in text and "params@0.99" in markdown
    assert "depthwise" in "\n".join(table.notes)  # why that row is empty
    assert repr(table) == text and table._repr_markdown_() == markdown
    assert table.column("name")[0] == "conv"
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            table.to_dataframe()
    else:
        assert list(table.to_dataframe()["name"]) == table.column("name")


def test_energy_table_rejects_bad_threshold(net):
    with pytest.raises(ValueError, match="energy"):
        energy_table(net, thresholds=(0.9, 1.5))


def test_spectra_of_model(net):
    out = spectra(net)
    assert "conv3d" in out and "head.2" in out
    assert "depthwise" not in out  # the channel scheme cannot factorize a depthwise conv
    spatial = spectra(net, "spatial")
    assert "depthwise" in spatial and "conv1d" not in spatial  # the spatial scheme is Conv2d only


# ---------------------------------------------------------------- sensitivity

class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def small():
    return _seeded(Small(), 1).eval()


@pytest.fixture
def inputs():
    return torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sensitivity_does_not_mutate_and_reports_baseline(small, inputs):
    before = _state(small)
    calls = []

    def eval_fn(model):
        calls.append(model)
        with torch.no_grad():
            return float(model(inputs).square().mean())

    grid = (0.5, 0.9, 0.999)
    table = sensitivity(small, eval_fn, grid=grid, progress=False)
    after = small.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, nn.Conv2d if n == "conv" else nn.Linear) for n, m in small.named_children())
    assert isinstance(table, SensitivityTable)
    assert table.baseline == eval_fn(small)
    assert calls[0] is small and all(m is not small for m in calls[1:-1])
    assert table.layers == ["conv", "fc"] and table.values.shape == (2, 3)
    assert [row["layer"] for row in table] == ["conv", "fc"]
    # each cell is eval_fn of the model with only that layer compressed
    expected, report = compress(small, energy=0.5, include=["fc"], progress=False)
    assert table.values[1, 0] == pytest.approx(eval_fn(expected), rel=1e-12)
    assert table.params[1, 0] == report.layers[1].params_after
    assert report.layers[0].status.startswith("skipped")
    # a cell where compress kept the layer dense is NaN, with compress's reason
    for i in range(2):
        for j in range(3):
            assert np.isnan(table.values[i, j]) == (table.status[i][j] != "replaced")
    assert np.isnan(table.values[0, 2])  # 8 x 27 at 99.9% energy is not smaller than dense
    assert "conv energy=0.999" in "\n".join(table.notes) and "energy=0.5" in str(table)


def test_sensitivity_options_layers_and_errors(small, inputs):
    def eval_fn(model):
        with torch.no_grad():
            return float(model(inputs).abs().sum())

    table = sensitivity(small, eval_fn, spec="rank", grid=(1, 2), layers=["co*"], progress=True, scheme="spatial")
    assert table.layers == ["conv"] and table.spec == "rank"
    both = sensitivity(small, eval_fn, spec="ratio", grid=(0.3,), progress=False, scheme="spatial")
    assert both.layers == ["conv", "fc"]  # scheme= is not passed to the Linear layer
    with pytest.raises(ValueError, match="explicit grid"):
        sensitivity(small, eval_fn, spec="rank", progress=False)
    with pytest.raises(ValueError, match="match no"):
        sensitivity(small, eval_fn, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="spec"):
        sensitivity(small, eval_fn, spec="size", progress=False)
    with pytest.raises(TypeError, match="schema"):
        sensitivity(small, eval_fn, schema="spatial", progress=False)


def test_tradeoff_curve(small, inputs):
    def eval_fn(model):
        with torch.no_grad():
            return float(model(inputs).square().mean())

    points = tradeoff_curve(small, eval_fn, grid=(0.5, 0.8), progress=False)
    assert [p["value"] for p in points] == [0.5, 0.8]
    model, report = compress(small, energy=0.5, progress=False)
    assert points[0]["params"] == report.model_params_after
    assert points[0]["metric"] == pytest.approx(eval_fn(model), rel=1e-12)
    assert points[0]["params"] < points[1]["params"] < sum(p.numel() for p in small.parameters())


# ---------------------------------------------------------------- plots

@pytest.fixture
def mpl():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure


def _check_png(fig, Figure, path):
    assert isinstance(fig, Figure)
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_energy_and_spectrum(net, mpl, tmp_path):
    for i, source in enumerate([net, spectra(net, "spatial"), net.conv.weight.detach(),
                                {"grouped": spectrum(net.grouped, modes=True)}]):
        fig = plot_energy(source, save=tmp_path / f"energy{i}.png")
        _check_png(fig, mpl, tmp_path / f"energy{i}.png")
        fig = plot_spectrum(source, rank_fraction=bool(i % 2), save=tmp_path / f"spectrum{i}.png")
        _check_png(fig, mpl, tmp_path / f"spectrum{i}.png")
    assert len(plot_energy(net).axes[0].lines) == len(spectra(net)) + 4  # one per layer + threshold lines


def test_plot_pareto_and_sensitivity(small, inputs, mpl, tmp_path):
    results = [dict(method="svd", params=100, metric=0.5, label="energy=0.5"), dict(method="svd", params=300, metric=0.9),
               dict(method="tucker", params=150, metric=0.7), dict(method="tucker", params=250, metric=0.8)]
    fig = plot_pareto(results, baseline=dict(params=400, metric=1.0), save=tmp_path / "pareto.png")
    _check_png(fig, mpl, tmp_path / "pareto.png")
    assert [line.get_label() for line in fig.axes[0].lines] == ["svd", "tucker", "dense"]
    with pytest.raises(ValueError, match="metric"):
        plot_pareto([dict(method="svd", params=1)])

    def eval_fn(model):
        with torch.no_grad():
            return float(model(inputs).square().mean())

    table = sensitivity(small, eval_fn, grid=(0.5, 0.999), progress=False)
    for relative in (False, True):
        path = tmp_path / f"sens{relative}.png"
        _check_png(plot_sensitivity(table, relative=relative, save=path), mpl, path)
    with pytest.raises(TypeError, match="sensitivity"):
        plot_sensitivity(energy_table(small))


def test_plots_name_the_extra_when_matplotlib_is_missing(net, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install decomp-toolkit\[plots\]"):
        plot_energy(net)
    assert math.isfinite(energy_table(net)[0]["dense_params"])  # the rest works without matplotlib


# ---------------------------------------------------------------- layer kinds beyond Linear / ConvNd

class KindsNet(nn.Module):
    """GPT-2's Conv1D (weight (in, out)) and transposed convs, plain and grouped: layers compress factorizes."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.attn = Conv1D(12, 8)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2)
        self.up_grouped = nn.ConvTranspose2d(4, 8, 2, stride=2, groups=2, bias=False)

    def forward(self, x):
        return self.up_grouped(self.up(x))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_energy_table_lists_registered_kinds_and_transposed_convs_as_decompose_sees_them(scheme):
    pytest.importorskip("transformers")
    net = _seeded(KindsNet()).double().eval()
    table = energy_table(net, THRESHOLDS, scheme=scheme)
    assert [row["name"] for row in table] == ["attn", "up", "up_grouped"]
    layers = dict(net.named_modules())
    assert list(table)[0]["shape"] == (12, 8)  # the (out, in) Linear it computes, not Conv1D's (in, out) storage
    for row in table:
        layer = layers[row["name"]]
        assert row["dense_params"] == sum(p.numel() for p in layer.parameters())
        options = {"scheme": scheme} if row["name"] != "attn" else {}
        for t in THRESHOLDS:
            small = decompose(layer, "svd", energy=t, **options)
            assert (row[f"rank@{t:g}"], row[f"params@{t:g}"]) == (small.rank, small.num_params), (row["name"], t)
    np.testing.assert_allclose(spectrum(net.attn), torch.linalg.svdvals(net.attn.weight.detach().T).numpy(), rtol=1e-12)


def test_sensitivity_scans_registered_kinds_and_transposed_convs():
    pytest.importorskip("transformers")
    net = _seeded(KindsNet()).eval()
    x = torch.randn(2, 6, 5, 5)
    reference = net(x).detach()
    table = sensitivity(net, lambda m: float((m(x) - reference).norm()), grid=(0.5,), progress=False,
                        layers=["up*"])
    assert table.layers == ["up", "up_grouped"]
    assert all(status == "replaced" for row in table.status for status in row)
    assert (table.values > 0).all()
