"""Product quantization: k-means properties, size accounting (Stock et al.), PQ layers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from decomp_toolkit.decomp import pq, pq_size_bits
from decomp_toolkit.decomp.formats.pq import code_dtype
from decomp_toolkit.decomp.pq import _chunk_argmin, _index_keys, assign_nearest, block_for_bits, kmeans
from decomp_toolkit.layers import PQConv, PQLinear, decompose
from _helpers import check_contract




# ----------------------------------------------------------------------------- size accounting
# (Stock et al.'s ResNet-18/50 sizes are reproduced in papers/stock2020 and tested in test_papers.py)

def test_size_bits_formula_matches_factors():
    W = torch.randn(16, 8, 3, 3)
    f = pq(W, block_size=9, n_centroids=32)
    assert f.size_bits == pq_size_bits(W.shape, 9, 32) == 16 * 8 * 5 + 32 * 9 * 16
    f2 = pq(W, block_size=9, n_centroids=8, shared_codebook=False, codebook_bits=32)
    assert f2.size_bits == pq_size_bits(W.shape, 9, 8, shared_codebook=False, codebook_bits=32)
    assert f2.codebooks.shape == (8, 8, 9)
    assert f.compression_ratio == pytest.approx(32 * W.numel() / f.size_bits)


# ----------------------------------------------------------------------------- k-means / PQ math

@given(st.integers(1, 6), st.integers(1, 4), st.integers(2, 5), st.integers(0, 2 ** 16))
def test_pq_exact_when_k_covers_distinct_subvectors(n_distinct, d, n_sub, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = 8
    book = torch.randn(n_distinct, d, generator=gen, dtype=torch.float64)
    codes = torch.randint(n_distinct, (rows, n_sub), generator=gen)
    W = book[codes].reshape(rows, n_sub * d)
    distinct = len({tuple(v) for v in W.reshape(-1, d).tolist()})
    for k in sorted({distinct, min(distinct + 2, rows * n_sub)}):
        f = pq(W, block_size=d, n_centroids=k, random_state=seed)
        assert f.error <= 1e-10 * max(1.0, f.norm)
        torch.testing.assert_close(f.to_tensor(), W, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 4), st.integers(1, 12), st.booleans(), st.integers(0, 2 ** 16))
def test_kmeans_objective_never_increases(d, k, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(1 if shared else 3, 40, d, generator=gen, dtype=torch.float64)
    X[..., :10, :] *= 4          # uneven clusters provoke empty-cluster repairs
    C, codes, history = kmeans(X, k, n_iter=30, convergence_tol=0.0, random_state=seed)
    assert all(b <= a * (1 + 1e-12) + 1e-12 for a, b in zip(history, history[1:]))
    assert C.shape == (X.shape[0], k, d) and codes.min() >= 0 and codes.max() < k
    objective = ((X - torch.gather(C, 1, codes[..., None].expand_as(X))) ** 2).sum()
    assert float(objective) == pytest.approx(history[-1], rel=1e-9, abs=1e-12)


def test_codes_range_and_smallest_dtype():
    W = torch.randn(32, 36)
    for k, dtype in ((2, torch.uint8), (256, torch.uint8), (257, torch.uint16)):
        f = pq(W, block_size=4, n_centroids=k, n_iter=3)
        assert f.codes.dtype == dtype and f.codes.shape == (32, 9)
        assert int(f.codes.long().min()) >= 0 and int(f.codes.long().max()) < k
    fn = pq(W.numpy(), block_size=4, n_centroids=16)
    assert fn.codes.dtype == np.uint8 and isinstance(fn.to_tensor(), np.ndarray)
    assert fn.to_tensor().dtype == np.float32
    assert code_dtype(70000) == torch.uint32 and code_dtype(300, numpy=True) == np.uint16


@given(rows=st.integers(1, 40), k=st.integers(2, 300), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2 ** 16))
def test_keyed_chunk_argmin_is_argmin(rows, k, dtype, seed):
    """The integer-key argmin of the assignment step equals argmin (first index on ties), near-ties,
    duplicates and values rounded below zero included."""
    gen = torch.Generator().manual_seed(seed)
    dist = torch.rand(2, rows, k, generator=gen, dtype=dtype)
    dist[..., ::3] = dist[..., :1]                               # exact duplicates of each row's first value
    dist[..., 1::5] = dist[..., :1] * (1 + 1e-6)                 # near-ties below the keys' resolution
    dist[0, :, -1] = -1e-7 * torch.rand(rows, generator=gen, dtype=dtype)  # rounding below zero
    keys = _index_keys(dtype, 2, rows, k, dist.device)
    assert keys is not None
    assert torch.equal(_chunk_argmin(dist.clone(), keys), dist.argmin(-1))


def test_assignment_matches_brute_force_nearest():
    gen = torch.Generator().manual_seed(0)
    X, C = torch.randn(2, 5000, 8, generator=gen), torch.randn(2, 300, 8, generator=gen)
    codes, dist = assign_nearest(X, C)
    exact = ((X.double()[:, :, None, :] - C.double()[:, None, :, :]) ** 2).sum(-1)
    best = exact.amin(-1)
    chosen = torch.gather(exact, -1, codes[..., None])[..., 0]
    assert bool((chosen <= best + 1e-5 * (1 + best)).all())      # nearest up to the float32 expansion's rounding
    torch.testing.assert_close(dist.double(), chosen, rtol=1e-5, atol=1e-6)


def test_deterministic_and_seeded():
    W = torch.randn(32, 48)
    a, b = pq(W, block_size=4, n_centroids=16, random_state=3), pq(W, block_size=4, n_centroids=16, random_state=3)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)


def test_error_is_the_measured_residual():
    W = torch.randn(24, 36, dtype=torch.float64)
    f = pq(W, block_size=3, n_centroids=16)
    assert f.error == pytest.approx(float((W - f.to_tensor()).norm()), rel=1e-10)
    assert f.error == pytest.approx(math.sqrt(f.history[-1]), rel=1e-8)


def test_scalar_weight_sharing_block_size_one():
    W = torch.randn(20, 30, dtype=torch.float64)
    f = pq(W, block_size=1, n_centroids=4)
    assert len(torch.unique(f.to_tensor())) <= 4 and f.code_bits == 2


def test_bits_spec():
    W = torch.randn(64, 72)
    assert block_for_bits(72, 64, 2) == (4, 256)
    assert block_for_bits(9, 32, 1) == (3, 8)          # MNIST conv1-like rows: 8 | 9 fails
    f = pq(W, bits=2, n_iter=5)
    assert (f.block_size, f.n_centroids) == (4, 256) and f.code_bits / f.block_size == 2
    g = pq(W, bits=1, block_size=6, n_iter=5)
    assert g.n_centroids == 64
    with pytest.raises(ValueError, match="not an integer number of code bits"):
        pq(W, bits=1.5, block_size=3)


def test_tol_spec():
    W = torch.randn(16, 16, dtype=torch.float64)
    for tol in (0.5, 0.2):
        f = pq(W, block_size=2, tol=tol)
        assert f.relative_error_to(W) <= tol
        assert f.n_centroids & (f.n_centroids - 1) == 0 or f.n_centroids == 128
    assert pq(W, block_size=2, tol=0.0).error <= 1e-12


def test_pad_option():
    W = torch.randn(10, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not divide the row length 7"):
        pq(W, block_size=3, n_centroids=4)
    f = pq(W, block_size=3, n_centroids=30, pad=True)
    assert f.codes.shape == (10, 3) and f.to_tensor().shape == (10, 7) and f.error < 1e-12


def test_pq_bad_inputs():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="n_centroids=0 must be >= 1"):
        pq(W, block_size=4, n_centroids=0)
    with pytest.raises(ValueError, match="exceeds the 32 sub-vectors"):
        pq(W, block_size=4, n_centroids=33)
    with pytest.raises(ValueError, match="exceeds the 8 sub-vectors of each sub-space"):
        pq(W, block_size=4, n_centroids=9, shared_codebook=False)
    with pytest.raises(ValueError, match="exactly one of n_centroids=, bits=, tol="):
        pq(W, block_size=4)
    with pytest.raises(ValueError, match="exactly one of"):
        pq(W, block_size=4, n_centroids=4, bits=1)
    with pytest.raises(TypeError, match="block_size= must be an int"):
        pq(W, block_size=2.0, n_centroids=4)


# ----------------------------------------------------------------------------- layers

def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _check_layer(build, x, dense_layer):
    """The shared contract, plus what is PQ's own: eval-mode (cached) forward, state dict, size in bits."""
    module = check_contract(dense_layer, build, x, "pq")
    dense = module.to_dense()
    assert type(dense) is type(dense_layer)
    for mode in (True, False):
        module.train(mode)
        assert _rel(module(x), dense(x)) <= 1e-5
    # the state dict holds only codebooks, codes and bias
    assert set(module.state_dict()) == {"codebooks", "codes"} | ({"bias"} if dense_layer.bias is not None else set())
    bias = dense_layer.bias.numel() if dense_layer.bias is not None else 0
    assert module.num_params == module.codebooks.numel() + module.codes.numel() + bias
    assert module.size_bits == module.codes.numel() * module.code_bits + module.codebooks.numel() * 16 + 32 * bias
    assert module.flops(tuple(x.shape)) == module.dense_flops(tuple(x.shape))
    assert module.fit.error_bound is None and module.fit.diagnostics["kmeans_history"]  # measured, not certified
    return module


@pytest.mark.parametrize("bias", [True, False])
def test_pq_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20, bias=bias).double()
    m = _check_layer(lambda layer: decompose(layer, "pq", block_size=4, n_centroids=32),
                     torch.randn(5, 48, dtype=torch.float64), lin)
    assert isinstance(m, PQLinear) and m.codes.shape == (20, 12)


CONV_CASES = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv2d, dict(in_channels=4, out_channels=8, kernel_size=3, padding="same", padding_mode="reflect",
                     dilation=2, groups=2), (2, 4, 9, 9)),
    (nn.Conv2d, dict(in_channels=6, out_channels=6, kernel_size=(3, 1), padding="valid", bias=False), (1, 6, 7, 5)),
    (nn.Conv2d, dict(in_channels=8, out_channels=16, kernel_size=1, padding_mode="circular", padding=1), (2, 8, 5, 5)),
    (nn.Conv3d, dict(in_channels=2, out_channels=4, kernel_size=2, stride=(1, 2, 1), padding=(1, 0, 1),
                     padding_mode="replicate"), (1, 2, 5, 6, 4)),
]


@pytest.mark.parametrize("conv_type, kwargs, shape", CONV_CASES)
def test_pq_conv(conv_type, kwargs, shape):
    torch.manual_seed(1)
    conv = conv_type(**kwargs).double()
    m = _check_layer(lambda layer: decompose(layer, "pq", n_centroids=8, random_state=0),
                     torch.randn(*shape, dtype=torch.float64), conv)
    assert isinstance(m, PQConv)


def test_lut_forward_equals_decode():
    torch.manual_seed(2)
    lin = nn.Linear(32, 40).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    for shared in (True, False):
        m = decompose(lin, "pq", block_size=4, n_centroids=8, shared_codebook=shared, forward="lut")
        ref = m.to_dense()(x)
        assert _rel(m(x), ref) <= 1e-12
        assert m.flops((21, 32)) == 21 * (8 * 8 * 4 + 40 * 8)
    padded = decompose(lin, "pq", block_size=5, n_centroids=8, pad=True, forward="lut")
    assert _rel(padded(x), padded.to_dense()(x)) <= 1e-12


def test_decode_cache_and_invalidation():
    torch.manual_seed(3)
    m = decompose(nn.Linear(16, 8).double(), "pq", block_size=2, n_centroids=4).eval()
    x = torch.randn(2, 16, dtype=torch.float64)
    y = m(x)
    assert m._cache is not None
    cached = m._cache[1]
    m(x)
    assert m._cache[1] is cached                        # reused
    with torch.no_grad():
        m.codebooks.mul_(2)                             # in-place change: version bump
    torch.testing.assert_close(m(x) - m.bias, 2 * (y - m.bias))
    m.train()
    assert m._cache is None
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    m(x)
    state["codebooks"] *= 0.5
    m.load_state_dict(state)
    torch.testing.assert_close(m(x), y)
    assert m.float().codebooks.dtype == torch.float32 and m._cache is None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_new_storage_for_the_codebooks_rebuilds_the_cached_weight(kind):
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.manual_seed(4)
    layer, x = ((nn.Linear(16, 8), torch.randn(3, 16)) if kind == "linear"
                else (nn.Conv2d(4, 6, 3), torch.randn(2, 4, 5, 5)))
    m = decompose(layer, "pq", bits=2).eval()
    with torch.no_grad():
        m(x)                                           # fills the cache
        vector_to_parameters(2 * parameters_to_vector(m.parameters()), m.parameters())   # param.data = new storage
        torch.testing.assert_close(m(x), m.to_dense()(x))


def test_train_mode_gradients_reach_codebooks():
    m = decompose(nn.Linear(8, 4), "pq", block_size=2, n_centroids=4).train()
    m(torch.randn(3, 8)).sum().backward()
    assert m.codebooks.grad is not None and m.codebooks.grad.abs().sum() > 0


def test_builder_refuses_rank_specs_and_bad_options():
    lin = nn.Linear(16, 8)
    conv = nn.Conv2d(3, 4, 3)
    for spec in (dict(rank=4), dict(energy=0.9), dict(ratio=0.5)):
        name = next(iter(spec))
        with pytest.raises(ValueError, match=rf"\(Linear, weight \(8, 16\)\).*{name}= is not a product-quant"):
            decompose(lin, "pq", **spec)
    with pytest.raises(ValueError, match=r"\(Conv2d, weight \(4, 3, 3, 3\)\).*n_centroids=0 must be >= 1"):
        decompose(conv, "pq", n_centroids=0)
    with pytest.raises(ValueError, match=r"fc \(Linear.*block_size=3 does not divide the row length 16"):
        decompose(lin, "pq", block_size=3, n_centroids=4, name="fc")
    with pytest.raises(ValueError, match=r"\(Linear.*n_centroids=100 exceeds the 32 sub-vectors"):
        decompose(lin, "pq", block_size=4, n_centroids=100)
    with pytest.raises(ValueError, match=r"Conv2d.*forward='lut'.*only support forward='decode'"):
        decompose(conv, "pq", n_centroids=4, forward="lut")
    with pytest.raises(TypeError, match="unknown option"):
        decompose(lin, "pq", n_centroids=4, centroids=3)
    m = decompose(lin, "pq", tol=0.3, block_size=2)
    assert m.fit.error / m.fit.weight_norm <= 0.3 and m.fit.error_bound is None
