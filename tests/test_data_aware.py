"""Data-aware decomposition (issue 7): whitened SVD, calibration Grams, compress(calibration=), finetune.

* whitened_svd: the output error ||(W - W')X^T||_F equals sqrt(sum_{i>k} s_i(W L)^2) and is
  never above plain SVD's at any rank, for X of full and deficient rank (SVD-LLM bound);
* the im2col Gram equals the Gram of patches extracted by an identity convolution run by
  torch itself (Conv1d/2d/3d, stride, padding int/'same'/'valid' and every padding_mode,
  dilation, groups), with small chunks;
* singular Grams (fewer samples than features, duplicated columns) give finite factors and
  report the jitter; calibrate leaves the model untouched, even when the data raises;
* decompose/compress with a Gram certify the OUTPUT error of the factorized module;
* finetune lowers the distillation loss of a compressed tiny model.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp_toolkit.decomp import svd, whitened_svd
from decomp_toolkit.decomp.rank import tail_errors
from decomp_toolkit.decomp.whitened import output_error
from decomp_toolkit.layers import Calibration, calibrate, compress, decompose, finetune
from decomp_toolkit.layers.calibrate import input_gram

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PAD_MODES = ("zeros", "reflect", "replicate", "circular")

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")


def random_data(samples, n, rank, seed):
    """X (samples, n) of the given rank, with a decaying spectrum like real activations."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(samples, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(rank, n, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.7 ** i for i in range(rank)], dtype=torch.float64)
    return (left * scale) @ right + 0.0


def snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    return state, flags


def assert_unchanged(model, snap):
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert {n: m.training for n, m in model.named_modules()} == flags
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


# --------------------------------------------------------------------------- whitened SVD

@given(m=st.integers(2, 12), n=st.integers(2, 12), samples=st.integers(3, 40), deficient=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_whitened_svd_output_error_is_the_certified_optimum(m, n, samples, deficient, seed):
    x_rank = max(1, min(n, samples) // 2) if deficient else min(n, samples)
    X = random_data(samples, n, x_rank, seed)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    G = X.T @ X
    scale = float((W @ X.T).norm())
    # a rank-deficient G whose Cholesky succeeds on a rounding-level pivot p ~ eps ||G|| has
    # L L^T = G + O(eps ||G||) but a last column ~ sqrt(p): the bound is then exact only up to
    # ~ sqrt(eps) ||W|| ||X|| in absolute terms (it stays an upper bound); hence abs 1e-7 * scale
    atol = 1e-7 * scale
    for k in range(1, min(m, n) + 1):
        f = whitened_svd(W, G, rank=k)
        W_hat = f.to_tensor()
        assert torch.isfinite(W_hat).all() and f.rank == k
        actual = float(((W - W_hat) @ X.T).norm())
        # with jitter d, L L^T = G + d I and bound^2 = actual^2 + d ||W - W'||_F^2 (exactly, in exact arithmetic)
        assert math.isclose(f.error_bound ** 2, actual ** 2 + f.jitter * f.weight_error ** 2,
                            rel_tol=1e-6, abs_tol=atol ** 2)
        if f.jitter == 0:
            assert math.isclose(f.error_bound, actual, rel_tol=1e-6, abs_tol=atol)
        assert f.error_bound >= actual * (1 - 1e-6) - 1e-9 * scale  # always an upper bound
        assert math.isclose(f.output_error, actual, rel_tol=1e-6, abs_tol=atol)  # tr(E G E^T): same floor
        plain = float(((W - svd(W, rank=k).to_tensor()) @ X.T).norm())
        assert actual <= plain * (1 + 1e-9) + 1e-9 * scale
        assert math.isclose(f.weight_error, float((W - W_hat).norm()), rel_tol=1e-9, abs_tol=1e-12)


def test_whitened_svd_full_rank_x_matches_the_svd_llm_formula():
    X = random_data(50, 8, 8, 3)
    W = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    G = X.T @ X
    f = whitened_svd(W, G, rank=3)
    assert f.jitter == 0.0 and f.whitening == "cholesky"
    L = torch.linalg.cholesky(G)
    U, S, Vh = torch.linalg.svd(W @ L)
    svd_llm = (U[:, :3] * S[:3]) @ Vh[:3] @ torch.linalg.inv(L)
    assert torch.allclose(f.to_tensor(), svd_llm, atol=1e-9)
    assert math.isclose(f.error_bound, float(S[3:].square().sum().sqrt()), rel_tol=1e-9)
    assert np.allclose(f.singular_values, S.numpy())


@given(groups=st.integers(1, 3), m=st.integers(2, 6), n=st.integers(2, 6), seed=st.integers(0, 999))
def test_whitened_svd_batched_over_groups_with_per_group_grams(groups, m, n, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(groups, m, n, generator=gen, dtype=torch.float64)
    Xs = [torch.randn(20, n, generator=gen, dtype=torch.float64) * (g + 1) for g in range(groups)]
    G = torch.stack([X.T @ X for X in Xs])
    k = min(m, n) - 1 or 1
    f = whitened_svd(W, G, rank=k)
    W_hat = f.to_tensor()
    errors = [float(((W[g] - W_hat[g]) @ Xs[g].T).norm()) for g in range(groups)]
    assert math.isclose(f.error_bound, math.sqrt(sum(e * e for e in errors)), rel_tol=1e-6, abs_tol=1e-10)
    # per group it is the per-group optimum at the shared rank
    for g in range(groups):
        single = whitened_svd(W[g], G[g], rank=k)
        assert math.isclose(errors[g], single.error_bound, rel_tol=1e-6, abs_tol=1e-10)
    assert f.num_params == groups * k * (m + n)


def test_rank_selection_is_measured_on_the_output_spectrum():
    X = random_data(60, 10, 10, 7)
    W = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    G = X.T @ X
    s = torch.linalg.svdvals(W @ torch.linalg.cholesky(G)).numpy()
    for tol in (0.05, 0.2, 0.5):
        f = whitened_svd(W, G, tol=tol)
        assert f.relative_error_bound <= tol
        assert f.rank == 1 or tail_errors(s)[f.rank - 1] > tol * tail_errors(s)[0]
    f = whitened_svd(W, G, energy=0.9)
    kept = (s[:f.rank] ** 2).sum() / (s ** 2).sum()
    assert kept >= 0.9 and (f.rank == 1 or (s[:f.rank - 1] ** 2).sum() / (s ** 2).sum() < 0.9)
    f = whitened_svd(W, G, ratio=0.5)
    assert f.num_params <= 0.5 * W.numel() < (f.rank + 1) * 18


@pytest.mark.parametrize("case", ["fewer_samples", "duplicated_columns", "dead_feature"])
def test_singular_gram_gives_finite_factors_and_reports_the_jitter(case):
    gen = torch.Generator().manual_seed(0)
    if case == "fewer_samples":
        X = torch.randn(5, 30, generator=gen, dtype=torch.float64)
    elif case == "duplicated_columns":
        X = torch.randn(40, 10, generator=gen, dtype=torch.float64)
        X = torch.cat([X, X[:, :4], 2 * X[:, :2]], dim=1)
    else:
        X = torch.randn(40, 12, generator=gen, dtype=torch.float64)
        X[:, 3] = 0
    W = torch.randn(7, X.shape[1], generator=gen, dtype=torch.float64)
    G = X.T @ X
    for whitening in ("cholesky", "eigh"):
        f = whitened_svd(W, G, rank=3, whitening=whitening)
        assert torch.isfinite(f.to_tensor()).all()
        assert f.whitening in ("cholesky", "eigh") and f.jitter >= 0.0 and math.isfinite(f.jitter)
        assert "jitter=" in repr(f)
        if whitening == "eigh":
            assert f.whitening == "eigh" and f.jitter == 0.0
        actual = float(((W - f.to_tensor()) @ X.T).norm())
        assert actual <= f.error_bound * (1 + 1e-6) + 1e-9 * float((W @ X.T).norm())
        # the weight stays bounded: W' = U_k U_k^T W is a projection of W
        assert float(f.to_tensor().norm()) <= float(W.norm()) * (1 + 1e-9)
    # the jitter shows up when Cholesky needs it (rank-deficient in float32-rounded form)
    G32 = (X.float().T @ X.float()).double()
    f = whitened_svd(W, G32, rank=3)
    assert torch.isfinite(f.to_tensor()).all() and f.jitter >= 0.0


def test_whitened_svd_rejects_bad_grams():
    W = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not match"):
        whitened_svd(W, torch.eye(4, dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        whitened_svd(W, -torch.eye(5, dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="zero"):
        whitened_svd(W, torch.zeros(5, 5, dtype=torch.float64), rank=2)
    with pytest.raises(ValueError, match="whitening"):
        whitened_svd(W, torch.eye(5, dtype=torch.float64), rank=2, whitening="qr")
    with pytest.raises(ValueError):
        whitened_svd(W, torch.eye(5, dtype=torch.float64), rank=2, energy=0.5)


def test_output_error_helper():
    W, X = torch.randn(3, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    V = torch.randn(3, 4, dtype=torch.float64)
    assert math.isclose(output_error(W, V, X.T @ X), float(((W - V) @ X.T).norm()), rel_tol=1e-9)


# --------------------------------------------------------------------------- im2col Grams

def reference_gram(conv, x):
    """Gram of the patches produced by torch's own conv with identity filters (g, P, P)."""
    g, P = conv.groups, conv.weight[0].numel()
    ident = type(conv)(conv.in_channels, g * P, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, groups=g, bias=False, padding_mode=conv.padding_mode,
                       dtype=torch.float64)
    with torch.no_grad():
        ident.weight.copy_(torch.eye(P, dtype=torch.float64).repeat(g, 1).reshape(ident.weight.shape))
        out = ident(x.double())
    patches = out.reshape(out.shape[0], g, P, -1).permute(1, 0, 3, 2).reshape(g, -1, P)
    return patches.transpose(1, 2) @ patches, patches.shape[1]


@given(dim=st.sampled_from([1, 2, 3]), mode=st.sampled_from(PAD_MODES), padding=st.sampled_from([0, 1, 2, "same", "valid"]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]),
       kernel=st.integers(1, 3), chunk=st.sampled_from([64, 1000, 1 << 22]), seed=st.integers(0, 99))
def test_im2col_gram_equals_the_gram_of_explicit_patches(dim, mode, padding, stride, dilation, groups, kernel, chunk,
                                                         seed):
    if padding == "same":
        stride = 1
    size = 7 if dim < 3 else 5
    kernel_size = (kernel,) * (dim - 1) + (max(1, kernel - 1),) if dim > 1 else kernel
    conv = CONV[dim](2 * groups, 2 * groups, kernel_size, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=mode)
    x = torch.randn(2, 2 * groups, *([size] * dim), generator=torch.Generator().manual_seed(seed))
    G, rows = input_gram(conv, x, chunk_elements=chunk)
    R, ref_rows = reference_gram(conv, x)
    assert rows == ref_rows and G.dtype == torch.float64 and G.shape == R.shape
    assert torch.allclose(G, R, rtol=1e-10, atol=1e-10 * float(R.abs().max()))


def test_linear_gram_flattens_leading_dims_and_tracks_sums():
    lin = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    G, rows, S = input_gram(lin, x, chunk_elements=7, with_sum=True)
    flat = x.reshape(-1, 5).double()
    assert rows == 8 and torch.allclose(G[0], flat.T @ flat) and torch.allclose(S[0], flat.sum(0))


# --------------------------------------------------------------------------- calibrate

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.head = nn.Linear(8 * 4 * 4, 10)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.grouped(x))
        return self.head(x.flatten(1))


def tiny_data(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=gen)


def test_calibrate_collects_every_layer_and_does_not_mutate_the_model():
    torch.manual_seed(0)
    model = Tiny().train()
    snap = snapshot(model)
    x = tiny_data()
    cal = calibrate(model, x, batch_size=16, progress=False)
    assert_unchanged(model, snap)
    assert isinstance(cal, Calibration) and cal.batches == 4
    assert set(cal.names()) == {"conv", "grouped", "head"}  # "unused" never ran
    assert cal["grouped"].shape == (2, 36, 36) and cal["head"].shape == (1, 128, 128)
    assert cal.samples["head"] == 64 and cal.samples["conv"] == 64 * 16
    # the Gram of a layer equals input_gram of the inputs it saw (eval-mode forward)
    model.eval()
    with torch.no_grad():
        h = torch.relu(model.bn(model.conv(x)))
    model.train()
    assert torch.allclose(cal["grouped"], input_gram(model.grouped, h)[0], rtol=1e-9, atol=1e-9)
    cov = cal.covariance("head")
    assert torch.linalg.eigvalsh(cov[0]).min() > -1e-8 * float(cov.diagonal(dim1=1, dim2=2).sum())


def test_calibrate_batches_tuples_patterns_and_max_batches():
    model = Tiny().eval()
    x = tiny_data()
    batches = [(x[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 64, 8)]
    cal = calibrate(model, batches, max_batches=3, layers=["head", "conv*"], progress=False)
    assert cal.batches == 3 and set(cal.names()) == {"head", "conv"} and cal.samples["head"] == 24
    full = calibrate(model, iter(x[i:i + 8] for i in range(0, 24, 8)), progress=True)
    assert torch.allclose(full["head"], cal["head"], rtol=1e-12)
    with pytest.raises(ValueError, match="matches no"):
        calibrate(model, x, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        calibrate(model, x, max_batches=0, progress=False)


def test_calibrate_removes_hooks_and_restores_modes_on_error():
    model = Tiny().train()
    snap = snapshot(model)

    def data():
        yield tiny_data(8)
        raise RuntimeError("broken loader")

    with pytest.raises(RuntimeError, match="broken loader"):
        calibrate(model, data(), progress=False)
    assert_unchanged(model, snap)


# --------------------------------------------------------------------------- layers with a Gram

def module_output_error(original, factorized, x):
    with torch.no_grad():
        return float((original(x).double() - factorized(x).double()).norm())


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d_grouped", "conv3d"])
@pytest.mark.parametrize("center", [False, True])
def test_decompose_with_gram_certifies_the_output_error(kind, center):
    torch.manual_seed(1)
    if kind == "linear":
        layer, x = nn.Linear(12, 9).double(), torch.randn(30, 12, dtype=torch.float64) + 0.5
    elif kind == "conv1d":
        layer = nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", stride=2).double()
        x = torch.randn(5, 4, 11, dtype=torch.float64) + 1.0
    elif kind == "conv2d_grouped":
        layer = nn.Conv2d(6, 8, 3, padding="same", dilation=2, groups=2, padding_mode="replicate").double()
        x = torch.randn(3, 6, 7, 7, dtype=torch.float64) + 1.0
    else:
        layer = nn.Conv3d(2, 4, 2, padding=1).double()
        x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64)
    snap = snapshot(layer)
    G, rows, S = input_gram(layer, x, with_sum=True)
    gram, mean = (G - S[:, :, None] * S[:, None, :] / rows, S / rows) if center else (G, None)
    if center:
        gram = 0.5 * (gram + gram.transpose(1, 2))
    plain_rank = 2
    small = decompose(layer, rank=plain_rank, gram=gram, input_mean=mean)
    assert_unchanged(layer, snap)
    assert small.fit.error_kind == "output" and small.rank == plain_rank
    err = module_output_error(layer, small, x)
    with torch.no_grad():
        scale = float(layer(x).norm())
    assert math.isclose(err, small.fit.error_bound, rel_tol=1e-6, abs_tol=1e-9 * scale)
    plain = decompose(layer, rank=plain_rank)
    assert err <= module_output_error(layer, plain, x) * (1 + 1e-9)
    # to_dense() reproduces the factorized module (the bias correction included)
    with torch.no_grad():
        assert torch.allclose(small.to_dense()(x), small(x), atol=1e-10)


def test_decompose_with_calibration_object_and_spatial_refusal():
    torch.manual_seed(2)
    model = Tiny().eval()
    cal = calibrate(model, tiny_data(), progress=False)
    small = decompose(model.head, ratio=0.3, calibration=cal)
    assert small.fit.error_kind == "output"
    small_nc = decompose(model.grouped, rank=2, calibration=cal)  # no bias: uncentered Gram
    assert torch.allclose(cal.gram_for(model.grouped), cal["grouped"])
    assert small_nc.bias is None
    with pytest.raises(ValueError, match="channel scheme only"):
        decompose(model.conv, rank=2, scheme="spatial", calibration=cal)
    with pytest.raises(ValueError, match="not one of the calibrated"):
        decompose(nn.Linear(128, 10), rank=2, calibration=cal)
    with pytest.raises(ValueError, match="no bias"):
        decompose(model.grouped, rank=2, gram=cal["grouped"], input_mean=cal.mean("grouped"))
    with pytest.raises(ValueError, match="exact algorithm"):
        decompose(model.head, rank=2, gram=cal["head"], algorithm="randomized")
    with pytest.raises(ValueError, match="does not match"):
        decompose(model.head, rank=2, gram=cal["conv"])


def test_compress_with_calibration_reports_output_bounds():
    torch.manual_seed(3)
    model = Tiny().eval()
    x = tiny_data()
    cal = calibrate(model, x, layers=["conv", "head"], progress=False)
    snap = snapshot(model)
    # shrinkage=None: the raw calibration Gram, so the bound is the error on the calibration data itself
    small, report = compress(model, ratio=0.5, calibration=cal, shrinkage=None, progress=False)
    assert_unchanged(model, snap)
    records = {r.name: r for r in report.layers}
    assert records["grouped"].status.startswith("skipped: no calibration Gram")
    assert any("OUTPUT error" in note for note in report.notes)
    # head: the certified relative output error equals the measured one on the calibration data
    with torch.no_grad():
        feats = torch.relu(model.grouped(torch.relu(model.bn(model.conv(x))))).flatten(1)
        ref, approx = model.head(feats).double(), small.head(feats).double()
    centered = ref - ref.mean(0)
    measured = float((ref - approx).norm()) / float(centered.norm())
    assert records["head"].replaced
    assert math.isclose(records["head"].rel_error_bound, measured, rel_tol=1e-4)
    plain, plain_report = compress(model, ratio=0.5, progress=False)
    assert [r.rank for r in plain_report.layers if r.name == "head"] == [records["head"].rank]


# --------------------------------------------------------------------------- finetune

def test_finetune_reduces_the_distillation_loss():
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student, _ = compress(teacher, rank=2, progress=False)
    t_snap = snapshot(teacher)
    x = torch.randn(128, 20)
    history = finetune(student, teacher, x, epochs=6, lr=1e-2, batch_size=32, progress=False)
    assert_unchanged(teacher, t_snap)
    assert [h["epoch"] for h in history] == list(range(1, 7)) and history[0]["steps"] == 4
    assert history[-1]["kd"] < 0.7 * history[0]["kd"]
    for module in student.modules():
        assert not module._forward_hooks


def test_finetune_with_labels_and_layer_matching():
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    student, _ = compress(teacher, rank=1, include=["0"], progress=False)
    x = torch.randn(64, 10)
    y = teacher(x).argmax(1).detach()
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    history = finetune(student, teacher, batches, epochs=4, lr=5e-3, layer_match=["0"], progress=False)
    assert {"loss", "kd", "ce", "match", "accuracy"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))
    with pytest.raises(ValueError, match="not a module"):
        finetune(student, teacher, batches, layer_match={"0": "nope"}, progress=False)
    with pytest.raises(ValueError, match="one-shot"):
        finetune(student, teacher, iter(batches), epochs=2, progress=False)
    with pytest.raises(ValueError, match="same module"):
        finetune(teacher, teacher, batches, progress=False)


def test_finetune_restores_modes_and_removes_hooks_on_error():
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)).train()
    student = copy.deepcopy(teacher).eval()

    def data():
        yield torch.randn(4, 4)
        raise RuntimeError("broken loader")

    with pytest.raises(RuntimeError, match="broken loader"):
        finetune(student, teacher, data(), layer_match=["0"], progress=False)
    assert teacher.training and not student.training
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


# --------------------------------------------------------------------------- the Gram route of the whitened SVD

def _geometric_spectrum(r, decades):
    """``r`` singular values falling geometrically from 1 to ``10**-decades``."""
    return [10.0 ** (-decades * i / max(r - 1, 1)) for i in range(r)]


def _with_spectrum(m, n, spectrum, seed):
    """A float64 (m, n) matrix with the given singular values (random orthonormal vectors)."""
    gen = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))[0]
    return (U * torch.tensor(spectrum, dtype=torch.float64)) @ V.T


@settings(max_examples=30)
@given(m=st.integers(2, 40), n=st.integers(2, 40), decades=st.floats(0, 12), k=st.integers(1, 40),
       seed=st.integers(0, 2 ** 16))
def test_output_subspace_matches_the_svd_route_or_falls_back_to_it(m, n, decades, k, seed):
    from decomp_toolkit.decomp.whitened import GRAM_ROUTE_FLOOR, left_singular_vectors, output_subspace
    r = min(m, n)
    k = min(k, r)
    spectrum = _geometric_spectrum(r, decades)
    M = _with_spectrum(m, n, spectrum, seed)[None]
    got, Uk = output_subspace(M, lambda s: k)
    U, S = left_singular_vectors(M)
    assert Uk.shape == (1, m, k)
    assert torch.allclose(Uk.transpose(-2, -1) @ Uk, torch.eye(k, dtype=torch.float64), atol=1e-10)
    if spectrum[k - 1] ** 2 < GRAM_ROUTE_FLOOR * spectrum[0] ** 2:   # not resolved: the exact route decided
        assert np.array_equal(got, S.numpy())
    else:   # singular values to ~ n eps s_1^2 / s_i, the kept subspace to ~ eps s_1^2 / gap
        assert np.allclose(got[0, :k], S[0, :k].numpy(), rtol=1e-6, atol=1e-12)
        projector, exact = Uk @ Uk.transpose(-2, -1), U[..., :k] @ U[..., :k].transpose(-2, -1)
        gap = (spectrum[k - 1] ** 2 - (spectrum[k] ** 2 if k < r else 0.0)) / spectrum[0] ** 2
        if gap > 1e-6:   # equal singular values at k: no unique subspace to compare
            assert float((projector - exact).norm()) <= 1e-12 / gap + 1e-9


@settings(max_examples=30)
@given(k=st.integers(1, 12), extra=st.integers(0, 20), decades=st.floats(0, 12), seed=st.integers(0, 2 ** 16))
def test_leading_svd_of_a_short_matrix_reconstructs_it_and_is_orthonormal(k, extra, decades, seed):
    from decomp_toolkit.decomp.whitened import leading_svd
    B = _with_spectrum(k, k + extra, _geometric_spectrum(k, decades), seed)[None]
    P, S, Vh = leading_svd(B, k)
    assert torch.allclose((P * S[..., None, :]) @ Vh, B, atol=1e-12)
    assert torch.allclose(P.transpose(-2, -1) @ P, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.transpose(-2, -1), torch.eye(k, dtype=torch.float64), atol=1e-6)
    assert np.allclose(S[0].numpy(), torch.linalg.svdvals(B[0]).numpy(), rtol=1e-6, atol=1e-14)


@settings(max_examples=30)
@given(m=st.integers(1, 30), n=st.integers(1, 30), decades=st.floats(0, 12), k=st.integers(1, 30),
       seed=st.integers(0, 2 ** 16))
def test_leading_svd_is_the_best_rank_k_approximation(m, n, decades, k, seed):
    from decomp_toolkit.decomp.whitened import leading_svd
    r = min(m, n)
    k = min(k, r)
    spectrum = _geometric_spectrum(r, decades)
    M = _with_spectrum(m, n, spectrum, seed)
    U, S, Vh = leading_svd(M, k)
    assert U.shape == (m, k) and S.shape == (r,) and Vh.shape == (k, n)
    assert np.allclose(S.numpy(), spectrum, rtol=1e-6, atol=1e-7)
    error = float((M - (U * S[:k]) @ Vh).norm())
    optimum = math.sqrt(sum(s * s for s in spectrum[k:]))
    assert error <= optimum * (1 + 1e-6) + 1e-9   # Eckart-Young: nothing of rank k does better
