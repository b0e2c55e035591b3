"""Toeplitz / circulant projections, low displacement rank, and their FFT layers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from decomp_toolkit.decomp import circulant, ldr, toeplitz
from decomp_toolkit.decomp.formats.structured import (circulant_apply, circulant_index, ldr_apply, ldr_dense, toeplitz_apply,
                                                 toeplitz_index)
from decomp_toolkit.decomp.structured import displacement
from decomp_toolkit.layers import (CirculantLinear, LDRLinear, ToeplitzLinear, UnsupportedLayerError, available_methods,
                                   decompose)
from _helpers import check_contract

dims = st.integers(1, 12)
seeds = st.integers(0, 2 ** 16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def random_toeplitz(m, n, gen):
    t = torch.randn(m + n - 1, generator=gen, dtype=torch.float64)
    return t[toeplitz_index(m, n)]


def random_circulant(m, n, b, gen):
    c = torch.randn(-(-m // b) * -(-n // b) * b, generator=gen, dtype=torch.float64)
    return c[circulant_index(m, n, b)]




# ----------------------------------------------------------------------------- projections

@given(dims, dims, seeds)
def test_toeplitz_residual_orthogonal_to_toeplitz(m, n, seed):
    gen = _gen(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    f = toeplitz(W)
    residual = W - f.to_tensor()
    for _ in range(3):
        assert abs(float((residual * random_toeplitz(m, n, gen)).sum())) <= 1e-10 * (1 + float(W.norm()))
    assert f.error == pytest.approx(float(residual.norm()), abs=1e-12)
    assert f.num_params == m + n - 1


@given(dims, dims, seeds)
def test_toeplitz_projection_of_toeplitz_is_itself(m, n, seed):
    T = random_toeplitz(m, n, _gen(seed))
    f = toeplitz(T)
    torch.testing.assert_close(f.to_tensor(), T, rtol=0, atol=1e-12)
    assert f.error <= 1e-12


@given(dims, dims, st.integers(1, 13), seeds)
def test_circulant_projection_properties(m, n, b, seed):
    gen = _gen(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    for block in (None, b):
        f = circulant(W, block_size=block)
        size = max(m, n) if block is None else block
        residual = W - f.to_tensor()
        assert abs(float((residual * random_circulant(m, n, size, gen)).sum())) <= 1e-10 * (1 + float(W.norm()))
        C = random_circulant(m, n, size, gen)
        assert circulant(C, block_size=block).error <= 1e-12


def test_circulant_square_default_is_a_circulant():
    W = torch.randn(6, 6, dtype=torch.float64)
    C = circulant(W).to_tensor()
    torch.testing.assert_close(C, torch.roll(torch.roll(C, 1, 0), 1, 1))     # shift-invariant
    c = torch.stack([W.diagonal(-k) for k in range(1)])                       # sanity: main diagonal mean
    assert float(C[0, 0]) == pytest.approx(float(c.mean()))


# ----------------------------------------------------------------------------- FFT products

@given(dims, dims, st.integers(1, 13), seeds)
def test_circulant_fft_equals_dense(m, n, b, seed):
    gen = _gen(seed)
    x = torch.randn(3, n, generator=gen, dtype=torch.float64)
    for size in (max(m, n), b):
        blocks = torch.randn(-(-m // size), -(-n // size), size, generator=gen, dtype=torch.float64)
        dense = blocks.reshape(-1)[circulant_index(m, n, size)]
        torch.testing.assert_close(circulant_apply(blocks, x, m), x @ dense.T, rtol=1e-10, atol=1e-10)


@given(dims, dims, seeds)
def test_toeplitz_fft_equals_dense(m, n, seed):
    gen = _gen(seed)
    t = torch.randn(m + n - 1, generator=gen, dtype=torch.float64)
    x = torch.randn(4, n, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(toeplitz_apply(t, x, m, n), x @ t[toeplitz_index(m, n)].T, rtol=1e-10, atol=1e-10)


def _shift(N, f):
    Z = torch.diag(torch.ones(N - 1, dtype=torch.float64), -1)
    Z[0, N - 1] = f
    return Z


def _f_circulant(v, f):
    N = v.numel()
    Z = _shift(N, f)
    out, power = torch.zeros(N, N, dtype=v.dtype), torch.eye(N, dtype=v.dtype)
    for k in range(N):
        out += v[k] * power
        power = Z @ power
    return out


@given(st.integers(1, 9), st.integers(1, 4), seeds)
def test_ldr_formula_and_fft_product(N, r, seed):
    gen = _gen(seed)
    G = torch.randn(r, N, generator=gen, dtype=torch.float64)
    H = torch.randn(r, N, generator=gen, dtype=torch.float64)
    M = 0.5 * sum(_f_circulant(G[i], 1) @ _f_circulant(H[i].flip(0), -1) for i in range(r))
    torch.testing.assert_close(ldr_dense(G, H), M, rtol=1e-10, atol=1e-10)
    # M solves the displacement equation Z_1 M - M Z_-1 = G^T H
    torch.testing.assert_close(_shift(N, 1) @ M - M @ _shift(N, -1), G.T @ H, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(displacement(M), G.T @ H, rtol=1e-10, atol=1e-10)
    x = torch.randn(2, N, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(ldr_apply(G, H, x), x @ M.T, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- LDR

@given(dims, dims, seeds)
def test_ldr_rank2_reproduces_any_toeplitz(m, n, seed):
    T = random_toeplitz(m, n, _gen(seed))
    if max(m, n) < 2:
        return
    f = ldr(T, rank=2)
    assert f.rank == 2
    assert f.error <= 1e-10 * (1 + f.norm)
    torch.testing.assert_close(f.to_tensor(), T, rtol=1e-9, atol=1e-9)


@given(dims, dims, seeds)
def test_ldr_bounds(m, n, seed):
    W = torch.randn(m, n, generator=_gen(seed), dtype=torch.float64)
    N = max(m, n)
    full = ldr(W, rank=N)
    assert full.error <= 1e-9 * (1 + full.norm)                 # full displacement rank is exact
    r = max(1, N // 2)
    f = ldr(W, rank=r)
    assert f.error == pytest.approx(float((W - f.to_tensor()).norm()), abs=1e-10)
    assert f.error <= f.operator_bound + 1e-9                 # a-priori certificate holds
    s = f.displacement_singular_values
    assert f.displacement_error == pytest.approx(math.sqrt(float((s[r:] ** 2).sum())), abs=1e-10)


def test_ldr_rank_selection_on_displacement_spectrum():
    W = torch.randn(16, 16, dtype=torch.float64)
    s = ldr(W, rank=1).displacement_singular_values
    f = ldr(W, tol=0.3)
    assert f.displacement_error <= 0.3 * math.sqrt(float((s ** 2).sum())) + 1e-12
    e = ldr(W, energy=0.9)
    assert float((s[:e.rank] ** 2).sum()) >= 0.9 * float((s ** 2).sum())
    g = ldr(W, ratio=0.5)
    assert g.num_params <= 0.5 * W.numel() < ldr(W, rank=g.rank + 1).num_params
    fn = ldr(W.numpy().astype(np.float32), rank=2)
    assert isinstance(fn.G, np.ndarray) and fn.to_tensor().dtype == np.float32


def test_structured_bad_inputs():
    W = torch.randn(4, 6)
    with pytest.raises(ValueError, match="expected a 2-D array"):
        toeplitz(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="block_size=0 must be a positive int"):
        circulant(W, block_size=0)
    with pytest.raises(ValueError, match=r"rank=7 is outside \[1, 6\]"):
        ldr(W, rank=7)
    with pytest.raises(ValueError, match="pass exactly one of"):
        ldr(W)


# ----------------------------------------------------------------------------- layers

def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


CASES = [("toeplitz", {}, ToeplitzLinear), ("circulant", {}, CirculantLinear),
         ("circulant", dict(block_size=4), CirculantLinear), ("ldr", dict(rank=3), LDRLinear),
         ("ldr", dict(energy=0.9), LDRLinear)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(12, 12), (20, 7), (5, 16)])
@pytest.mark.parametrize("method, spec, cls", CASES)
def test_structured_layers(method, spec, cls, shape, bias):
    """The shared contract on square, tall and wide shapes, plus the measured error of each projection."""
    torch.manual_seed(0)
    out_f, in_f = shape
    lin = nn.Linear(in_f, out_f, bias=bias).double()
    x = torch.randn(2, 3, in_f, dtype=torch.float64)
    m = check_contract(lin, lambda layer: decompose(layer, method, **spec), x, method)
    assert isinstance(m, cls)
    m = decompose(lin, method, **spec)
    assert m(x).shape == (2, 3, out_f)
    measured = float((lin.weight - m.to_dense().weight).detach().norm())
    assert m.fit.error == pytest.approx(measured, rel=1e-6, abs=1e-9)
    if m.fit.error_bound is not None:  # LDR: the certified operator bound
        assert measured <= m.fit.error_bound * (1 + 1e-6) + 1e-9
    macs = m.flops((6, in_f))
    assert isinstance(macs, int) and macs > 0 and m.flops_and_shape((6, in_f))[1] == (6, out_f)


def test_layer_param_counts_and_gradients():
    lin = nn.Linear(64, 32)
    assert decompose(lin, "toeplitz").num_params == 95 + 32
    assert decompose(lin, "circulant").num_params == 64 + 32
    assert decompose(lin, "circulant", block_size=16).num_params == 2 * 4 * 16 + 32
    m = decompose(lin, "ldr", rank=2)
    assert m.num_params == 2 * 2 * 64 + 32
    m(torch.randn(3, 64)).sum().backward()
    assert m.G.grad is not None and m.H.grad is not None


def test_fft_flops_below_dense_for_large_layers():
    for method in ("toeplitz", "circulant"):
        m = decompose(nn.Linear(1024, 1024), method)
        assert m.flops((64, 1024)) < m.dense_flops((64, 1024)) / 20


def test_structured_methods_registered_and_refuse_convs():
    methods = available_methods()
    for name in ("toeplitz", "circulant", "ldr", "pq"):
        assert "linear" in methods[name].builders
    with pytest.raises(UnsupportedLayerError, match=r"\(Conv2d, weight \(4, 3, 3, 3\)\).*method='toeplitz' does not "
                                                    r"support Conv2d layers"):
        decompose(nn.Conv2d(3, 4, 3), "toeplitz")
    with pytest.raises(ValueError, match=r"\(Linear, weight \(4, 6\)\).*circulant.*rank= does not apply"):
        decompose(nn.Linear(6, 4), "circulant", rank=2)
    with pytest.raises(UnsupportedLayerError, match=r"\(Linear, weight \(4, 6\)\).*rank=9 is outside \[1, 6\]"):
        decompose(nn.Linear(6, 4), "ldr", rank=9)
    with pytest.raises(ValueError, match=r"tol= is not supported by method='ldr'.*certifies nothing"):
        decompose(nn.Linear(6, 4), "ldr", tol=0.5)


def test_a_fit_worse_than_a_zero_weight_warns_and_compress_keeps_the_layer_dense():
    from decomp_toolkit.layers import compress

    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 32)   # random weights: far from any low displacement rank matrix
    with pytest.warns(UserWarning, match="worse than a zero weight"):
        fitted = decompose(layer, method="ldr", rank=2)
    assert fitted.fit.relative_error >= 1
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(32, 8))
    small, report = compress(model, method="ldr", rank=2, progress=False)
    first = next(r for r in report.layers if r.name == "0")
    assert not first.replaced and first.status.startswith("skipped: the fit's relative weight error")
    assert small[0] is not layer and type(small[0]) is torch.nn.Linear and torch.equal(small[0].weight, layer.weight)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
