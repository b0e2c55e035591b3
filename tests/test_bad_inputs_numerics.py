"""Bad or unusual inputs to the decomposition functions, decompose() and the analysis functions.

Honest numbers (scaled weights anywhere in float64's range, reduced precision, options out of range,
non-PSD Grams), NaN/Inf/meta/sparse inputs, and the crash list of degenerate shapes. Every case checks
a clear error or the correct result, and that its inputs are bit-for-bit unchanged. The last section
runs the hypothesis properties on degenerate shapes and scaled weights.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from conftest import decaying_matrix
from decomp_toolkit.analysis import energy_table
from decomp_toolkit.analysis.spectra import spectrum
from decomp_toolkit.decomp import cp, svd, tt, tucker
from decomp_toolkit.decomp.whitened import whitened_svd
from decomp_toolkit.layers import decompose
from decomp_toolkit.layers.errors import UnsupportedLayerError
from _unchanged import assert_unchanged, checked, raises, snapshot


W = decaying_matrix(40, 30, decay=0.3, seed=1)


# --------------------------------------------------------------------------- 6. honest numbers: scale

@pytest.mark.parametrize("scale", [1e-300, 1e-160, 1e160, 1e300])
def test_svd_energy_rank_and_bound_do_not_depend_on_scale(scale):
    ref = svd(W, energy=0.99)
    f = checked(svd, W * scale, energy=0.99)
    assert f.rank == ref.rank and math.isfinite(f.error_bound) and f.error_bound > 0
    assert f.error_bound / scale == pytest.approx(ref.error_bound, rel=1e-9)


def test_svd_tol_on_subnormal_weights_is_true():
    A = W * 1e-310  # subnormal: the stored values are what is decomposed
    f = checked(svd, A, tol=0.01)
    from decomp_toolkit.decomp._backend import times_power_of_two
    up = 1030  # exact: back to magnitudes ~1, where squares neither underflow nor lose digits
    true = float(torch.linalg.norm(times_power_of_two(A - f.to_tensor(), up))
                 / torch.linalg.norm(times_power_of_two(A, up)))
    assert f.rank > 1 and true <= 0.01 and f.error_bound > 0


@pytest.mark.parametrize("scale", [1e-250, 1e250])
def test_randomized_svd_tol_at_extreme_scale(scale):
    f = checked(svd, W * scale, tol=0.05, algorithm="randomized", random_state=0)
    ref = svd(W, tol=0.05)
    assert f.rank >= ref.rank and f.error_bound / scale <= 0.05 * float(W.norm()) * (1 + 1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reduced_precision_bound_is_the_error_of_the_returned_factors(dtype):
    A = W.to(dtype)
    f = checked(svd, A, rank=30)  # full rank: the float64 bound would be 0
    U, S, Vh = (x.double() for x in (f.U, f.S, f.Vh))
    returned = float(torch.linalg.norm(A.double() - (U * S) @ Vh))
    assert f.error_bound == pytest.approx(returned, rel=1e-9) and f.error_bound > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(oversample=-5), "oversample=-5"), (dict(n_iter=-1), "n_iter=-1"), (dict(oversample=1.5), "oversample=1.5"),
    (dict(algorithm="fast"), "algorithm='fast'"), (dict(random_state="seed"), "random_state"),
], ids=["oversample_negative", "n_iter_negative", "oversample_float", "unknown_algorithm", "bad_seed"])
def test_svd_options_out_of_range_raise(kwargs, match):
    raises((ValueError, TypeError), match, svd, W, rank=3, **{"algorithm": "randomized", **kwargs})


BAD_ARRAYS = [
    ("nan", lambda: W.clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"), dtype=torch.float64)),
     ValueError, "NaN or Inf"),
    ("inf", lambda: W.clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("inf"), dtype=torch.float64)),
     ValueError, "NaN or Inf"),
    ("integer", lambda: torch.ones(4, 4, dtype=torch.int64), TypeError, "floating-point"),
    ("complex", lambda: torch.ones(4, 4, dtype=torch.complex64), TypeError, "floating-point"),
    ("one_dimensional", lambda: torch.ones(5), ValueError, "2-D or 3-D"),
    ("empty", lambda: torch.ones(0, 4), ValueError, "empty"),
    ("list", lambda: [[1.0, 2.0], [3.0, 4.0]], TypeError, "torch.Tensor or numpy.ndarray"),
    ("meta", lambda: torch.ones(4, 4, device="meta"), ValueError, "meta-device"),
    ("sparse", lambda: torch.eye(4).to_sparse(), TypeError, "sparse"),
    ("numpy_int", lambda: np.ones((3, 3), dtype=np.int32), TypeError, "floating-point"),
]


@pytest.mark.parametrize("make, error, match", [c[1:] for c in BAD_ARRAYS], ids=[c[0] for c in BAD_ARRAYS])
def test_svd_bad_arrays_raise_clearly(make, error, match):
    raises(error, match, svd, make(), rank=1)


def test_svd_rank_above_the_shape_raises():
    raises(ValueError, "rank=31 is outside \\[1, 30\\]", svd, W, rank=31)


# --------------------------------------------------------------------------- 6. honest numbers: Grams

X = torch.randn(200, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
GRAM = X.T @ X


def test_indefinite_gram_raises():
    fake = torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    raises(ValueError, "not positive semi-definite", whitened_svd, W, fake + fake.T, rank=4)


def test_gram_of_the_wrong_shape_raises():
    raises(ValueError, "gram of shape \\(20, 20\\) does not match the weight of shape \\(40, 30\\)", whitened_svd, W,
           torch.eye(20, dtype=torch.float64), rank=4)


def test_gram_with_nan_raises():
    bad = GRAM.clone()
    bad[0, 0] = float("nan")
    raises(ValueError, "gram.*NaN or Inf", whitened_svd, W, bad, rank=4)


def test_zero_gram_says_the_inputs_carry_no_signal():
    raises(ValueError, "carry no signal", whitened_svd, W, torch.zeros(30, 30, dtype=torch.float64), rank=4)


@pytest.mark.parametrize("w_scale, g_scale", [(1e150, 1e-200), (1e-200, 1e200), (1e250, 1.0)])
def test_whitened_svd_at_extreme_scales(w_scale, g_scale):
    ref = whitened_svd(W, GRAM, rank=5)
    f = checked(whitened_svd, W * w_scale, GRAM * g_scale, rank=5)
    scale = w_scale * math.sqrt(g_scale)
    assert f.error_bound / scale == pytest.approx(ref.error_bound, rel=1e-8)
    assert f.output_error / scale == pytest.approx(ref.output_error, rel=1e-6)


def test_float32_accumulated_singular_gram_is_accepted_as_psd():
    few = X[:10].float()
    G32 = (few.T @ few).double()  # rank 10 < 30, with float32 rounding: slightly indefinite
    f = checked(whitened_svd, W, G32, rank=5)
    assert torch.isfinite(f.to_tensor()).all()


# --------------------------------------------------------------------------- crash list: tensor methods

T4 = torch.randn(6, 5, 4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("scale", [1e160, 1e300, 1e-300])
def test_tucker_at_extreme_scale(scale):
    ref = tucker(T4, rank=(3, 3, 2, 2), algorithm="hosvd")
    f = checked(tucker, T4 * scale, rank=(3, 3, 2, 2), algorithm="hosvd")
    assert f.error_bound / scale == pytest.approx(ref.error_bound, rel=1e-8)


@pytest.mark.parametrize("scale", [1e160, 1e300, 1e-300])
def test_tt_at_extreme_scale(scale):
    ref = tt(T4, energy=0.9)
    f = checked(tt, T4 * scale, energy=0.9)
    assert f.rank == ref.rank and f.error_bound / scale == pytest.approx(ref.error_bound, rel=1e-8)


def test_cp_on_a_tensor_whose_dims_are_all_one():
    A = torch.full((1, 1, 1, 1), 3.0, dtype=torch.float64)
    f = checked(cp, A, rank=1)
    torch.testing.assert_close(f.to_tensor(), A)


def test_decompose_cp_on_a_1x1_conv():
    torch.manual_seed(0)
    layer = nn.Conv2d(1, 1, 1, bias=False)
    try:
        small = checked(decompose, layer, "cp", rank=1)
    except UnsupportedLayerError as err:  # a refusal is fine, if it says why
        assert "Conv2d" in str(err)
        return
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(small(x), layer(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- decompose()

def test_decompose_meta_layer_raises():
    with torch.device("meta"):
        layer = nn.Linear(8, 8)
    raises(ValueError, "meta device", decompose, layer, "svd", rank=2)


def test_decompose_nan_weight_names_the_layer():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    raises(ValueError, "fc \\(Linear, weight \\(8, 8\\)\\).*NaN", decompose, layer, "svd", rank=2, name="fc")


def test_decompose_rank_above_the_layer_is_unsupported_for_this_layer():
    raises(UnsupportedLayerError, "rank=9", decompose, nn.Linear(8, 8), "svd", rank=9)


def test_decompose_not_a_layer_raises():
    raises(TypeError, "ReLU", decompose, nn.ReLU(), "svd", rank=2)


def test_tol_is_refused_or_kept_by_every_method_that_takes_it():
    from decomp_toolkit.layers import available_methods
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    for name, entry in available_methods().items():
        if "linear" not in entry.builders:
            continue
        try:
            small = decompose(layer, name, tol=0.5)
        except (ValueError, TypeError) as err:
            assert "tol" in str(err), (name, str(err))
            continue
        weight = layer.weight.detach().double()
        error = float(torch.linalg.norm(weight - small.dense_weight().detach().double()) / torch.linalg.norm(weight))
        assert error <= 0.5 + 1e-6, f"{name}: tol=0.5 accepted but the relative error is {error:.3f}"


# --------------------------------------------------------------------------- analysis

def test_spectrum_of_a_nan_weight_raises():
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight[2, 2] = float("nan")
    raises(ValueError, "Linear weight \\(8, 8\\): contains NaN", spectrum, layer)


def test_energy_table_of_a_nan_weight_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    raises(ValueError, "layer 1: .*NaN or Inf", energy_table, model)


def test_spectrum_of_a_meta_weight_raises():
    with torch.device("meta"):
        layer = nn.Linear(8, 8)
    raises(ValueError, "meta device", spectrum, layer)


# --------------------------------------------------------------------------- properties on degenerate inputs

DEGENERATE_SHAPES = st.sampled_from([(1, 1), (1, 17), (23, 1), (2, 300), (300, 3), (1, 2), (64, 2)])
SCALES = st.sampled_from([1e-300, 1e-150, 1e-20, 1.0, 1e20, 1e150, 1e300])


def _matrix(shape, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


@given(DEGENERATE_SHAPES, st.integers(0, 5), SCALES, st.data())
def test_eckart_young_on_degenerate_and_scaled_matrices(shape, seed, scale, data):
    A = _matrix(shape, seed, scale)
    k = data.draw(st.integers(1, min(shape)))
    f = svd(A, rank=k)
    A_n, R_n = A / scale, f.to_tensor() / scale
    s = torch.linalg.svdvals(A_n)
    optimum = float(s[k:].square().sum().sqrt())
    assert float(torch.linalg.norm(A_n - R_n)) <= optimum * (1 + 1e-7) + 1e-12 * float(s[0])
    assert f.error_bound / scale == pytest.approx(optimum, rel=1e-7, abs=1e-12 * float(s[0]))


@given(st.sampled_from([(1, 1, 1), (1, 5, 1), (2, 40, 3), (30, 2, 2), (1, 1, 9)]), st.integers(0, 3), SCALES)
def test_hosvd_bound_on_degenerate_and_scaled_tensors(shape, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    ranks = tuple(max(1, d // 2) for d in shape)
    f = tucker(A, rank=ranks, algorithm="hosvd")
    true = float(torch.linalg.norm((A - f.to_tensor()) / scale))
    assert true <= f.error_bound / scale * (1 + 1e-7) + 1e-12 * float(torch.linalg.norm(A / scale))


@given(st.sampled_from([(1, 1, 1), (1, 7, 1), (2, 30, 2), (9, 1, 4)]), st.integers(0, 3), SCALES,
       st.sampled_from([0.5, 0.9, 0.99]))
def test_tt_bound_on_degenerate_and_scaled_tensors(shape, seed, scale, energy):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    f = tt(A, energy=energy)
    true = float(torch.linalg.norm((A - f.to_tensor()) / scale))
    assert true <= f.error_bound / scale * (1 + 1e-7) + 1e-12 * float(torch.linalg.norm(A / scale))


@given(DEGENERATE_SHAPES, st.integers(0, 5), SCALES, st.integers(1, 40))
def test_whitened_output_bound_on_degenerate_and_scaled_inputs(shape, seed, scale, rows):
    m, n = shape
    gen = torch.Generator().manual_seed(seed)
    Wm = torch.randn(m, n, generator=gen, dtype=torch.float64) * scale
    Xc = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    f = whitened_svd(Wm, Xc.T @ Xc, rank=max(1, min(m, n) // 2))
    true = float(torch.linalg.norm(((Wm - f.to_tensor()) / scale) @ Xc.T))
    reference = float(torch.linalg.norm((Wm / scale) @ Xc.T))
    assert true <= f.error_bound / scale * (1 + 1e-6) + 1e-9 * reference


@given(st.sampled_from([(1, 1), (1, 12), (12, 1), (2, 200), (150, 2)]), st.integers(0, 3),
       st.sampled_from([1e-30, 1.0, 1e30]))
def test_forward_equals_to_dense_and_state_dict_rebuilds_on_degenerate_layers(shape, seed, scale):
    out_features, in_features = shape
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features).double()
    with torch.no_grad():
        layer.weight.mul_(scale)
    small = decompose(layer, "svd", rank=1)
    x = torch.randn(3, in_features, dtype=torch.float64)
    dense = small.to_dense()
    torch.testing.assert_close(small(x), dense(x), rtol=1e-9, atol=1e-12 * (scale + 1))
    twin = type(small)(**small.config, dtype=torch.float64)
    twin.load_state_dict(small.state_dict(), strict=True)
    torch.testing.assert_close(twin(x), small(x), rtol=0, atol=0)
