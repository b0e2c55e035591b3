"""Hidden-unit (interpolative) compression: the column selection's identities, the MLP pairs of
compress_sequential, the channel-wise check and the bad requests."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from decomp_toolkit.decomp.interpolative import greedy_columns, interpolative_fit
from decomp_toolkit.decomp.rank import InfeasibleRankError
from decomp_toolkit.layers.errors import UnsupportedLayerError
from decomp_toolkit.layers.interpolative import find_pairs, pair_params, pair_profile
from decomp_toolkit.layers.sequential import compress_sequential, select_targets

from _unchanged import assert_unchanged, snapshot


def _problem(rows, n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, n, generator=gen, dtype=torch.float64) @ torch.randn(n, n, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(n, m, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(rows, m, generator=gen,
                                                                                         dtype=torch.float64)
    return X, Y


# ----------------------------------------------------------------------------- decomp.interpolative

@given(n=st.integers(2, 12), m=st.integers(1, 6), k=st.integers(1, 12), group=st.sampled_from([1, 1, 3]),
       seed=st.integers(0, 2**16))
def test_the_error_is_the_least_squares_residual_on_the_kept_columns(n, m, k, group, seed):
    k = min(k, n)
    X, Y = _problem(60, n * group, m, seed)
    fit = interpolative_fit(X.T @ X, X.T @ Y, float(Y.square().sum()), k, group=group)
    columns = (fit.indices[:, None] * group + torch.arange(group)).reshape(-1)
    kept = X[:, columns]
    direct = torch.linalg.norm(Y - kept @ fit.weight.T)
    assert math.isclose(fit.error, float(direct), rel_tol=1e-6, abs_tol=1e-8)
    # the refit is the least-squares optimum on those columns: the residual is orthogonal to them
    assert float((kept.T @ (Y - kept @ fit.weight.T)).abs().max()) <= 1e-7 * float(Y.abs().max() * kept.abs().max() * 60)
    assert fit.indices.tolist() == sorted(set(fit.indices.tolist())) and len(fit.indices) == k
    if group > 1:   # the first group picked is the best single group
        best = min(float(torch.linalg.norm(Y - X[:, g * group:(g + 1) * group] @ torch.linalg.lstsq(
            X[:, g * group:(g + 1) * group], Y).solution)) for g in range(n))
        one = interpolative_fit(X.T @ X, X.T @ Y, float(Y.square().sum()), 1, group=group)
        assert one.error <= best * (1 + 1e-8) + 1e-10


@given(n=st.integers(2, 10), m=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_greedy_errors_fall_with_k_and_the_first_pick_is_the_best_single_column(n, m, seed):
    X, Y = _problem(30, n, m, seed)
    G, C, energy = X.T @ X, X.T @ Y, float(Y.square().sum())
    errors = [interpolative_fit(G, C, energy, k).error for k in range(1, n + 1)]
    assert all(b <= a * (1 + 1e-9) + 1e-9 for a, b in zip(errors, errors[1:]))
    singles = [float(torch.linalg.norm(Y - X[:, [j]] @ torch.linalg.lstsq(X[:, [j]], Y).solution)) for j in range(n)]
    assert errors[0] <= min(singles) * (1 + 1e-9) + 1e-12
    assert errors[-1] <= float(torch.linalg.norm(Y - X @ torch.linalg.lstsq(X, Y).solution)) * (1 + 1e-6) + 1e-9


def test_dead_columns_are_never_kept_and_too_many_raise():
    X, Y = _problem(30, 6, 3, 0)
    X[:, [1, 4]] = 0
    indices, gains = greedy_columns(X.T @ X, X.T @ Y, 4)
    assert not {1, 4} & set(indices.tolist())
    assert greedy_columns(X.T @ X, X.T @ Y, 6, strict=False)[0].tolist() == [0, 2, 3, 5]
    # the gains are each step's drop of the residual energy
    residual = float(Y.square().sum()) - float(gains.sum())
    assert math.isclose(residual, interpolative_fit(X.T @ X, X.T @ Y, float(Y.square().sum()), 4).error ** 2,
                        rel_tol=1e-8)
    with pytest.raises(InfeasibleRankError, match="only 4 of the 6 columns"):
        greedy_columns(X.T @ X, X.T @ Y, 5)
    with pytest.raises(InfeasibleRankError, match="cannot keep 7 of 6"):
        greedy_columns(X.T @ X, X.T @ Y, 7)


# ----------------------------------------------------------------------------- MLP pairs in compress_sequential

class _Mlp(nn.Module):
    def __init__(self, d, h, gated, bias):
        super().__init__()
        self.gated = gated
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        if gated:
            self.gate_proj = nn.Linear(d, h, bias=bias)

    def forward(self, x):
        hidden = nn.functional.gelu(self.up_proj(x))
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * hidden if self.gated else hidden)


class _Block(nn.Module):
    def __init__(self, d, h, gated, bias):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = _Mlp(d, h, gated, bias)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class _Net(nn.Module):
    def __init__(self, d=12, h=40, gated=False, bias=True, blocks=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(_Block(d, h, gated, bias) for _ in range(blocks))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _data(d=12, seed=3):
    return torch.randn(96, 6, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("gated,bias", [(False, True), (True, False)])
def test_pairs_keep_units_their_params_are_counted_and_the_error_is_certified(gated, bias):
    net = _Net(gated=gated, bias=bias).eval()
    data = _data()
    before = snapshot(net)
    small, report = compress_sequential(net, data, ranks={"layers.0.mlp.down_proj": 10, "layers.1.mlp.down_proj": 25},
                                        include=["*.mlp.*"], pairs="auto", batch_size=32, progress=False)
    assert_unchanged(net, before)
    assert small.layers[0].mlp.down_proj.in_features == 10 and small.layers[1].mlp.up_proj.out_features == 25
    expected = sum(p.numel() for p in net.parameters()) - sum(
        pair_params(net, pair, net.get_submodule(pair.consumer).in_features) - pair_params(net, pair, kept)
        for pair, kept in zip(find_pairs(net, select_targets(net, ["*.mlp.*"])), (10, 25)))
    assert sum(p.numel() for p in small.parameters()) == expected == report.model_params_after
    # the first pair's consumer sees the original inputs: its certified error is the measured one
    seen = {}
    for model, label in ((net, "dense"), (small, "small")):
        handle = model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, y, label=label: seen.setdefault(
            label, []).append(y))
        with torch.no_grad():
            for i in range(0, 96, 32):
                model(data[i:i + 32])
        handle.remove()
    measured = float(torch.linalg.norm(torch.cat(seen["dense"]).double() - torch.cat(seen["small"]).double()))
    fit = report.fits["layers.0.mlp.down_proj"]
    assert math.isclose(fit.error, measured, rel_tol=2e-3)
    records = {r.name: r for r in report.layers}
    assert records["layers.0.mlp.up_proj"].rank == 10 and records["layers.0.mlp.up_proj"].replaced


@pytest.mark.parametrize("pair_units", ["fraction", "loss"])
def test_pairs_beside_a_budget_meet_it(pair_units):
    net = _Net(d=8, h=64).eval()
    small, report = compress_sequential(net, _data(d=8), budget=dict(layer_params=0.5), pairs="auto", batch_size=32,
                                        progress=False, pair_units=pair_units)
    assert sum(r.params_after for r in report.layers) <= 0.5 * sum(r.params_before for r in report.layers)
    for i in range(2):
        kept = small.layers[i].mlp.down_proj.in_features
        assert report.units[f"layers.{i}.mlp.up_proj"] == (kept, 64) == report.units[f"layers.{i}.mlp.down_proj"]
        assert kept == 32 or pair_units == "loss"
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    assert any("budget met" in note and "MLP pairs" in note for note in report.notes)


def test_the_pair_profile_spends_the_fisher_weighted_output_energy_unit_by_unit():
    net = _Net(d=8, h=16, bias=True).eval()
    pair = find_pairs(net, select_targets(net))[0]
    X = torch.randn(200, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64).relu()
    fisher = torch.rand(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    profile = pair_profile(net, pair, X.T @ X, X.sum(0), 200, fisher)
    centered = X - X.mean(0)
    Y = centered @ net.get_submodule(pair.consumer).weight.detach().double().T
    assert math.isclose(float(profile.losses.sum()) * 200, float((Y.square().sum(0) * fisher).sum()), rel_tol=1e-6)
    assert profile.dense_cost == pair_params(net, pair, 16) and profile.cost(5) == pair_params(net, pair, 5)


class _Mixing(nn.Module):
    """An MLP whose hidden units are mixed before the consumer (a softmax over them, or a LayerNorm)."""

    def __init__(self, norm=False):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(32, 8)
        self.norm = nn.LayerNorm(32) if norm else nn.Softmax(dim=-1)

    def forward(self, x):
        return self.down_proj(self.norm(self.up_proj(x)))


class _Leaky(nn.Module):
    """An MLP whose producer output is also read by another path."""

    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        hidden = self.up_proj(x)
        return self.down_proj(torch.relu(hidden)) + hidden.sum(-1, keepdim=True)


def test_a_pair_that_is_not_channel_wise_is_refused_naming_it():
    data = _data(d=8)
    with pytest.raises(UnsupportedLayerError, match="down_proj.*not a channel-wise"):
        compress_sequential(_Mixing(), data, ratio=0.5, pairs=[("up_proj", "down_proj")], progress=False)
    with pytest.raises(UnsupportedLayerError, match="fails with the hidden units of its pairs sliced.*width"):
        compress_sequential(_Mixing(norm=True), data, ratio=0.5, pairs=[("up_proj", "down_proj")], progress=False)
    with pytest.raises(UnsupportedLayerError, match="read by another layer"):
        compress_sequential(_Leaky(), data, ratio=0.5, pairs=[("up_proj", "down_proj")], progress=False)


def test_bad_pair_requests_say_what_to_pass():
    net, data = _Net(), _data()
    with pytest.raises(ValueError, match="pair_units='uniform'"):
        compress_sequential(net, data, ratio=0.5, pairs="auto", pair_units="uniform", progress=False)
    with pytest.raises(ValueError, match="pairs='mlp'"):
        compress_sequential(net, data, ratio=0.5, pairs="mlp", progress=False)
    with pytest.raises(ValueError, match="not a targeted layer"):
        compress_sequential(net, data, ratio=0.5, include=["*.down_proj"], pairs=[("layers.0.mlp.up_proj",
                                                                                    "layers.0.mlp.down_proj")])
    with pytest.raises(ValueError, match="has 12 outputs but the consumer reads 40"):
        compress_sequential(net, data, ratio=0.5, pairs=[("layers.0.attn", "layers.0.mlp.down_proj")])
    with pytest.raises(ValueError, match=r"an int in \[1, 40\]"):
        compress_sequential(net, data, ranks={"layers.0.mlp.down_proj": 41}, pairs="auto", progress=False)


# ----------------------------------------------------------------------------- conv chains

class _Cnn(nn.Module):
    """conv-BN-ReLU-conv-BN-ReLU-maxpool-conv-ReLU-conv; ``skip``: conv2's output is also read by the head."""

    def __init__(self, duplicated=False, skip=False):
        super().__init__()
        torch.manual_seed(0)
        self.skip = skip
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.conv4 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 4, 1)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 2)
            if duplicated:   # conv1's channels 4-7 repeat 0-3: half of them carry everything
                self.conv1.weight[4:], self.conv1.bias[4:] = self.conv1.weight[:4], self.conv1.bias[:4]
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(self.bn1, name)[4:] = getattr(self.bn1, name)[:4]

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        y = self.conv4(torch.relu(self.conv3(self.pool(h))))
        return y + h[:, :4, ::2, ::2] if self.skip else y


def test_auto_finds_the_conv_chain_and_duplicated_channels_are_dropped_exactly():
    net = _Cnn(duplicated=True).eval()
    pairs = find_pairs(net, select_targets(net))
    assert [(p.producers, p.consumer, p.between) for p in pairs] == [
        (("conv1",), "conv2", ("bn1",)), (("conv2",), "conv3", ("bn2",)), (("conv3",), "conv4", ())]
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before = snapshot(net)
    small, report = compress_sequential(net, data, ranks={"conv2": 4}, pairs=pairs[:1], batch_size=8, progress=False)
    assert_unchanged(net, before)
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (4, 4, 4)
    assert report.fits["conv2"].relative_error_bound < 1e-3     # exact but for the refit's ridge (PAIR_RIDGE)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert float(torch.linalg.norm(small(x) - net(x)) / torch.linalg.norm(net(x))) < 1e-3
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


def test_a_conv_chain_link_loses_input_and_output_channels_and_the_params_are_counted():
    net = _Cnn().eval()
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=8, progress=False)
    assert (small.conv2.in_channels, small.conv2.out_channels, small.conv3.in_channels, small.conv3.out_channels,
            small.conv4.in_channels) == (4, 4, 4, 3, 3)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(2, 3, 8, 8))).all()


def test_a_conv_whose_output_is_also_read_elsewhere_is_refused():
    net = _Cnn(skip=True).eval()
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert [p.consumer for p in find_pairs(net, select_targets(net))] == ["conv2", "conv4"]   # fx: conv2 has 2 users
    with pytest.raises(UnsupportedLayerError, match="read by another layer|fails with the hidden units"):
        compress_sequential(net, data, ratio=0.5, pairs=[("conv2", "conv3", ["bn2"])], batch_size=8, progress=False)


def test_the_report_counts_the_macs_of_the_pruned_chain():
    net = _Cnn().eval()
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=8, progress=False,
                                        example_input=torch.randn(1, 3, 8, 8))
    expected = (3 * 4 * 9 * 64) + (4 * 4 * 9 * 64) + (4 * 3 * 9 * 16) + (3 * 4 * 16)
    dense = (3 * 8 * 9 * 64) + (8 * 8 * 9 * 64) + (8 * 6 * 9 * 16) + (6 * 4 * 16)
    totals = report.totals()
    assert (totals["flops_before"], totals["flops_after"]) == (dense, expected)


def test_asking_for_more_units_than_the_data_span_keeps_them_at_no_extra_error():
    X, Y = _problem(30, 6, 3, 0)
    X[:, 4] = X[:, 0] + X[:, 1]       # column 4 is spanned by 0 and 1; column 2 dead
    X[:, 2] = 0
    G, C, energy = X.T @ X, X.T @ Y, float(Y.square().sum())
    fit = interpolative_fit(G, C, energy, 5)
    assert len(fit.indices) == 5 and fit.independent == 4
    full = float(torch.linalg.norm(Y - X @ torch.linalg.pinv(X) @ Y))
    assert math.isclose(fit.error, full, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(fit.error, float(torch.linalg.norm(Y - X[:, fit.indices] @ fit.weight.T)), rel_tol=1e-6)


class _Wide(nn.Module):
    """conv(3->24)-ReLU-conv(24->20)-ReLU-conv(20->4)-ReLU-conv(4->2): two chains of 24 and 20 hidden
    channels and one of 4 (fewer than a multiple of 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(24, 20, 3, padding=1)
        self.conv3, self.conv4 = nn.Conv2d(20, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv4(torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))))


@pytest.mark.parametrize("request_kind", ["ratio", "budget"])
def test_pair_multiple_rounds_the_kept_channels_and_the_params_are_counted(request_kind):
    net = _Wide().eval()
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ask = dict(ratio=0.3) if request_kind == "ratio" else dict(budget=dict(layer_params=0.3))
    small, report = compress_sequential(net, data, pairs="auto", batch_size=8, progress=False, pair_multiple=8,
                                        **ask)
    plain, _ = compress_sequential(net, data, pairs="auto", batch_size=8, progress=False, **ask)
    # 24 * 0.3 -> 7 -> 8 and 20 * 0.3 -> 6 -> 8; the 4-channel chain (below one multiple) keeps int(1.2) = 1
    assert (small.conv1.out_channels, small.conv2.out_channels, small.conv3.out_channels) == (8, 8, 1)
    assert (plain.conv1.out_channels, plain.conv2.out_channels, plain.conv3.out_channels) == (7, 6, 1)
    assert (small.conv2.in_channels, small.conv3.in_channels, small.conv4.in_channels) == (8, 8, 1)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(2, 3, 8, 8))).all()


def test_pair_multiple_with_exact_units_or_a_bad_value_says_what_to_pass():
    net, data = _Wide().eval(), torch.randn(16, 3, 8, 8)
    with pytest.raises(ValueError, match="pair_multiple=0: pass a positive int"):
        compress_sequential(net, data, ratio=0.5, pairs="auto", pair_multiple=0, progress=False)
    with pytest.raises(ValueError, match="with ranks= the units are given exactly"):
        compress_sequential(net, data, ranks={"conv2": 8}, pairs="auto", pair_multiple=8, progress=False)


@pytest.mark.parametrize("multiple", [8, 24])
def test_pair_multiple_with_loss_allocated_units_keeps_multiples_and_meets_the_budget(multiple):
    net = _Net(d=8, h=64).eval()
    small, report = compress_sequential(net, _data(d=8), budget=dict(layer_params=0.5), pairs="auto", batch_size=32,
                                        progress=False, pair_units="loss", pair_multiple=multiple)
    assert sum(r.params_after for r in report.layers) <= 0.5 * sum(r.params_before for r in report.layers)
    for i in range(2):
        kept = small.layers[i].mlp.down_proj.in_features
        assert kept % multiple == 0 and kept < 64
        assert report.units[f"layers.{i}.mlp.up_proj"] == (kept, 64)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    assert any("budget met" in note for note in report.notes)
