"""Property tests of the SVD layers (method "svd" of layers.decompose).

For hypothesis-drawn shapes and every conv option (Conv1d/2d/3d, stride, padding
int/tuple/'same'/'valid', every padding_mode, dilation, groups, bias), in float64:

* factorized forward == to_dense() forward,
* to_dense() forward == F.convNd with the reconstructed weight and the original options
  (padding applied by hand with F.pad, so the reference does not reuse nn.Conv's logic),
* at full rank, factorized forward == the original layer's forward,
* ||W - to_dense().weight||_F == error_bound (Eckart–Young),
* flops() == the MACs of the stages counted from their actual outputs,
* the input layer is untouched.

Then module behaviour (to_dense options, num_params, flops by hand, extra_repr, state_dict
round trips, dtype/device) and error messages for bad input.
"""
import copy
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from decomp_toolkit.layers import LowRankConv, LowRankLinear, SpatialLowRankConv, count_params, decompose
from _helpers import (assert_same_options, assert_unchanged, check_contract, check_dtype_kept, conv_setups,
                      reference_conv, rel_close, snapshot, stage_macs)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")



def check_factorized_conv(conv, x, module, full):
    snap = snapshot(conv)
    # factorized == to_dense == F.convNd with the reconstructed weight and original options
    dense = module.to_dense()
    assert_same_options(dense, conv)
    y = module(x)
    y_dense = dense(x)
    rel_close(y, y_dense)
    rel_close(y_dense, reference_conv(x, module.dense_weight(), conv.bias, conv))
    torch.testing.assert_close(dense.weight, module.dense_weight(), rtol=0, atol=0)
    # Eckart–Young on the per-group matrix: the measured weight error is the bound
    err = float(torch.linalg.norm(conv.weight - dense.weight).detach())
    assert err == pytest.approx(module.fit.error_bound, rel=1e-6, abs=1e-10 * module.fit.weight_norm)
    # at full rank the original function is kept
    y_orig = conv(x)
    rel_close(full(x), y_orig)
    assert full.fit.error_bound <= 1e-10 * full.fit.weight_norm
    # accounting
    assert module.flops(x.shape) == stage_macs(module, x)
    assert module.flops(x.shape[1:]) * x.shape[0] == module.flops(x.shape)
    assert module.dense_flops(x.shape) == y_orig.numel() * (conv.in_channels // conv.groups) * math.prod(
        conv.kernel_size)
    assert module.num_params == sum(p.numel() for p in module.parameters())
    assert module.dense_params == count_params(conv)
    assert f"rank={module.rank}" in repr(module)
    assert_unchanged(conv, snap)


# --------------------------------------------------------------------------- channel scheme

@given(setup=conv_setups(), data=st.data())
@example(setup=(nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", dilation=2, dtype=torch.float64),
                torch.randn(2, 4, 6, 5, dtype=torch.float64)), data=None)
@example(setup=(nn.Conv1d(6, 9, 2, padding="same", padding_mode="circular", groups=3, bias=False,
                          dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)), data=None)
def test_channel_scheme_matches_dense_and_original(setup, data):
    conv, x = setup
    g = conv.groups
    max_rank = min(conv.out_channels // g, (conv.in_channels // g) * math.prod(conv.kernel_size))
    rank = data.draw(st.integers(1, max_rank), label="rank") if data is not None else 1
    snap = snapshot(conv)
    module = decompose(conv, rank=rank)
    full = decompose(conv, "svd", rank=max_rank)
    assert type(module) is LowRankConv and module.rank == rank
    assert module.reduce.out_channels == g * rank and module.expand.in_channels == g * rank
    check_factorized_conv(conv, x, module, full)
    assert_unchanged(conv, snap)


# --------------------------------------------------------------------------- spatial scheme

@given(setup=conv_setups(dims=(2,), min_in_per_group=1), data=st.data())
@example(setup=(nn.Conv2d(3, 3, (3, 2), padding="same", padding_mode="replicate", dilation=(1, 2), groups=3,
                          dtype=torch.float64), torch.randn(2, 3, 5, 6, dtype=torch.float64)), data=None)
def test_spatial_scheme_matches_dense_and_original(setup, data):
    conv, x = setup
    g = conv.groups
    (kh, kw) = conv.kernel_size
    max_rank = min((conv.in_channels // g) * kh, (conv.out_channels // g) * kw)
    rank = data.draw(st.integers(1, max_rank), label="rank") if data is not None else 1
    snap = snapshot(conv)
    module = decompose(conv, rank=rank, scheme="spatial")
    full = decompose(conv, rank=max_rank, scheme="spatial")
    assert type(module) is SpatialLowRankConv and module.rank == rank
    assert module.vertical.kernel_size == (kh, 1) and module.horizontal.kernel_size == (1, kw)
    check_factorized_conv(conv, x, module, full)
    assert_unchanged(conv, snap)


# --------------------------------------------------------------------------- linear

@given(out_f=st.integers(1, 12), in_f=st.integers(1, 12), lead=st.lists(st.integers(1, 3), max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16), data=st.data())
def test_linear_matches_dense_and_original(out_f, in_f, lead, bias, seed, data):
    torch.manual_seed(seed)
    linear = nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    max_rank = min(in_f, out_f)
    rank = data.draw(st.integers(1, max_rank), label="rank")
    snap = snapshot(linear)
    module = decompose(linear, rank=rank)
    assert type(module) is LowRankLinear and module.rank == rank
    dense = module.to_dense()
    assert type(dense) is nn.Linear and (dense.in_features, dense.out_features) == (in_f, out_f)
    assert (dense.bias is None) == (not bias) and dense.weight.dtype == torch.float64
    y = module(x)
    assert y.shape == (*lead, out_f)
    rel_close(y, dense(x))
    rel_close(dense(x), F.linear(x, module.dense_weight(), linear.bias))
    err = float(torch.linalg.norm(linear.weight - dense.weight).detach())
    assert err == pytest.approx(module.fit.error_bound, rel=1e-6, abs=1e-10 * module.fit.weight_norm)
    rel_close(decompose(linear, rank=max_rank)(x), linear(x))
    rows = math.prod(lead)
    assert module.flops(x.shape) == stage_macs(module, x) == rows * rank * (in_f + out_f)
    assert module.dense_flops(x.shape) == rows * in_f * out_f
    assert module.num_params == rank * (in_f + out_f) + (out_f if bias else 0)
    assert f"rank={rank}" in repr(module)
    assert_unchanged(linear, snap)


def test_linear_on_batch_time_features():
    torch.manual_seed(0)
    linear = nn.Linear(16, 10, dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    module = decompose(linear, rank=4)
    assert module(x).shape == (3, 5, 10)
    rel_close(module(x), module.to_dense()(x))
    assert module.flops((3, 5, 16)) == 15 * 4 * (16 + 10)
    rel_close(decompose(linear, rank=10)(x), linear(x))


# --------------------------------------------------------------------------- rank specs through layers

@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("spec", [dict(energy=0.9), dict(tol=0.3), dict(ratio=0.4), dict(rank="vbmf")])
def test_rank_specs_resolve_on_layers(scheme, spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    module = decompose(conv, **spec, scheme=scheme)
    if "tol" in spec:
        assert module.fit.error_bound <= spec["tol"] * module.fit.weight_norm
    if "ratio" in spec:
        weight_params = module.num_params - 12
        assert weight_params <= spec["ratio"] * 12 * 8 * 9
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    rel_close(module(x), module.to_dense()(x))


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_randomized_algorithm_on_layers(scheme):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, dtype=torch.float64)
    a = decompose(conv, rank=4, scheme=scheme, algorithm="randomized", random_state=3)
    b = decompose(conv, rank=4, scheme=scheme, algorithm="randomized", random_state=3)
    exact = decompose(conv, rank=4, scheme=scheme)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    err = float(torch.linalg.norm(conv.weight - a.dense_weight()).detach())
    assert err == pytest.approx(a.fit.error_bound, rel=1e-6)
    assert exact.fit.error_bound <= a.fit.error_bound * (1 + 1e-10)
    assert a.fit.error_bound <= 1.1 * exact.fit.error_bound


# --------------------------------------------------------------------------- module behaviour

def test_flops_by_hand():
    # FLOPs and parameters do not depend on the weights: build the modules directly (an SVD
    # of the 128 x 576 matrix is slow on a loaded 2-core machine)
    r = 8
    conv = nn.Conv2d(64, 128, 3, stride=2, padding=1)
    module = LowRankConv(64, 128, 3, rank=r, stride=2, padding=1)
    assert module.to_dense().weight.shape == conv.weight.shape
    shape = (1, 64, 32, 32)
    assert module.flops(shape) == r * 64 * 9 * 16 * 16 + 128 * r * 16 * 16
    assert module.dense_flops(shape) == 128 * 64 * 9 * 16 * 16
    assert module.flops(shape) == stage_macs(module, torch.randn(shape))
    assert module.dense_flops(shape) == stage_macs(conv, torch.randn(shape))
    assert module.num_params == r * 64 * 9 + 128 * r + 128 < count_params(conv)
    small = decompose(nn.Conv2d(8, 16, 3, stride=2, padding=1), rank=r)
    assert small.flops((1, 8, 32, 32)) == r * 8 * 9 * 16 * 16 + 16 * r * 16 * 16
    # spatial: 3x1 conv with stride (2, 1), then 1x3 conv with stride (1, 2)
    spatial = SpatialLowRankConv(64, 128, 3, rank=r, stride=2, padding=1)
    assert spatial.flops(shape) == r * 64 * 3 * 16 * 32 + 128 * r * 3 * 16 * 16
    assert spatial.flops(shape) == stage_macs(spatial, torch.randn(shape))
    linear = decompose(nn.Linear(64, 32), rank=r)
    assert linear.flops((7, 64)) == 7 * r * (64 + 32) and linear.dense_flops((7, 64)) == 7 * 64 * 32


LAYERS = {
    "linear": lambda dt: nn.Linear(20, 12, dtype=dt),
    "linear_nobias": lambda dt: nn.Linear(20, 12, bias=False, dtype=dt),
    "conv1d": lambda dt: nn.Conv1d(6, 10, 3, stride=2, padding=1, dtype=dt),
    "conv2d": lambda dt: nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect", dtype=dt),
    "conv2d_groups": lambda dt: nn.Conv2d(6, 9, (3, 2), dilation=2, groups=3, bias=False, dtype=dt),
    "conv3d": lambda dt: nn.Conv3d(4, 6, 2, padding=1, padding_mode="circular", dtype=dt),
    "spatial": lambda dt: nn.Conv2d(6, 10, 3, stride=(2, 1), padding=(1, 2), padding_mode="replicate", dtype=dt),
    "spatial_depthwise": lambda dt: nn.Conv2d(6, 6, 3, padding=1, groups=6, dtype=dt),
}
INPUTS = {"linear": (2, 3, 20), "linear_nobias": (4, 20), "conv1d": (2, 6, 9), "conv2d": (2, 6, 7, 6),
          "conv2d_groups": (2, 6, 7, 7), "conv3d": (1, 4, 4, 4, 3), "spatial": (2, 6, 7, 7),
          "spatial_depthwise": (2, 6, 5, 5)}


RANKS = {"spatial_depthwise": 1}  # per group (3, 3): rank 2 would store 12 > 9 numbers


def options_of(name):
    return {"scheme": "spatial"} if name.startswith("spatial") else {}


def build(name, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name](dtype)
    return layer, decompose(layer, rank=RANKS.get(name, 2), **options_of(name))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_module_contract(name):
    """The shared contract (tests/_helpers.check_contract) on the svd-specific layers and schemes."""
    torch.manual_seed(0)
    layer = LAYERS[name](torch.float64)
    rank = RANKS.get(name, 2)
    x = torch.randn(INPUTS[name], dtype=torch.float64)
    module = check_contract(layer, lambda lay: decompose(lay, rank=rank, **options_of(name)), x, "svd")
    assert module.num_params < count_params(layer)
    assert f"rank={rank}" in module.extra_repr() and f"rank={rank}" in repr(module)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_factorization_is_close_to_float64(name, dtype):
    layer, module = build(name, dtype)
    x = torch.randn(INPUTS[name], dtype=dtype)
    with torch.no_grad():
        y = module(x)
        assert y.dtype == dtype
        ref = decompose(copy.deepcopy(layer).double(), rank=RANKS.get(name, 2), **options_of(name))
        rel_close(y.double(), ref(x.double()), rel=0.05 if dtype == torch.bfloat16 else 1e-5)
    check_dtype_kept(LAYERS[name](torch.float64), lambda lay: decompose(lay, rank=RANKS.get(name, 2),
                                                                         **options_of(name)), x.double(), dtype)


# --------------------------------------------------------------------------- bad input

class ForwardOverride(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class ConvForwardOverride(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, bias) + 1


class KeepsForward(nn.Linear):
    pass


def conv(**kw):
    torch.manual_seed(0)
    return nn.Conv2d(4, 8, 3, **kw)


def nan_weight():
    layer = conv()
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    return layer


def inf_bias():
    layer = nn.Linear(5, 3)
    with torch.no_grad():
        layer.bias[1] = float("inf")
    return layer


def frozen():
    layer = conv()
    layer.weight.requires_grad_(False)
    return layer


LABEL_C = re.escape("(Conv2d, weight (8, 4, 3, 3))")
BAD = [
    # (id, layer factory, kwargs, exception, regex)
    ("rank0", conv, dict(rank=0), ValueError, LABEL_C + r" with method='svd', rank=0: rank=0 must be >= 1"),
    ("rank_above_max", conv, dict(rank=9), ValueError,
     LABEL_C + r" with method='svd', rank=9 \(shape \(1, 8, 36\)\): rank=9 is outside \[1, 8\]"),
    ("rank_above_max_spatial", conv, dict(rank=13, scheme="spatial"), ValueError,
     LABEL_C + r".*rank=13 is outside \[1, 12\]"),
    ("rank_float", conv, dict(rank=2.5), TypeError, LABEL_C + r".*rank= must be an int or 'vbmf'"),
    ("energy0", conv, dict(energy=0), ValueError, LABEL_C + r" with method='svd', energy=0: energy=0.0 is outside"),
    ("energy1.5", conv, dict(energy=1.5), ValueError, LABEL_C + r".*energy=1.5 is outside \(0, 1\]"),
    ("tol-0.1", conv, dict(tol=-0.1), ValueError, LABEL_C + r".*tol=-0.1 is outside \[0, 1\)"),
    ("tol1", conv, dict(tol=1.0), ValueError, LABEL_C + r".*tol=1.0 is outside \[0, 1\)"),
    ("ratio0", conv, dict(ratio=0), ValueError, LABEL_C + r".*ratio=0.0 is outside \(0, 1\]"),
    ("ratio2", conv, dict(ratio=2), ValueError, LABEL_C + r".*ratio=2.0 is outside \(0, 1\]"),
    ("two_specs", conv, dict(rank=2, energy=0.5), ValueError,
     LABEL_C + r" with method='svd', rank=2, energy=0.5: pass exactly one of .*got rank=2 and energy=0.5"),
    ("no_spec", conv, dict(), ValueError, LABEL_C + r" with method='svd', no rank spec: pass exactly one of"),
    ("nan_weight", nan_weight, dict(rank=2), ValueError, LABEL_C + r": weight contains NaN or Inf"),
    ("inf_bias", inf_bias, dict(rank=2), ValueError, re.escape("(Linear, weight (3, 5))") + r": bias contains NaN"),
    ("lstm", lambda: nn.LSTM(4, 6), dict(rank=2), TypeError, r"\(LSTM, weight \?\): unsupported module type"),
    ("conv_transpose", lambda: nn.ConvTranspose2d(4, 8, 3), dict(rank=5), ValueError,
     re.escape("(ConvTranspose2d, weight (4, 8, 3, 3))") + r", as its adjoint conv .* rank=5 is outside \[1, 4\]"),
    ("forward_override", lambda: ForwardOverride(4, 8, 3), dict(rank=2), TypeError,
     re.escape("(ForwardOverride, weight (8, 4, 3, 3))") + r": ForwardOverride overrides forward\(\)"),
    ("conv_forward_override", lambda: ConvForwardOverride(4, 8, 3), dict(rank=2), TypeError,
     re.escape("(ConvForwardOverride, weight (8, 4, 3, 3))") + r": .*overrides _conv_forward\(\)"),
    ("lazy", lambda: nn.LazyLinear(4), dict(rank=2), ValueError,
     r"\(LazyLinear, weight \?\): lazy layer is not initialized"),
    ("lazy_conv", lambda: nn.LazyConv2d(4, 3), dict(rank=2), ValueError, r"LazyConv2d.*lazy layer is not initialized"),
    ("unknown_method", conv, dict(method="qr", rank=2), ValueError,
     LABEL_C + r" with method='qr', rank=2: unknown method='qr'; available: \[.*'svd'.*\]"),
    ("unknown_option", conv, dict(rank=2, bogus=1), TypeError,
     LABEL_C + r".*unknown option\(s\) \['bogus'\]; method 'svd' accepts"),
    ("unknown_scheme", conv, dict(rank=2, scheme="diagonal"), ValueError, LABEL_C + r".*scheme='diagonal' is not one of"),
    ("unknown_algorithm", conv, dict(rank=2, algorithm="lanczos"), ValueError,
     LABEL_C + r".*algorithm='lanczos' is not one of"),
    ("old_solver_keyword", conv, dict(rank=2, solver="exact"), TypeError,
     LABEL_C + r".*unknown option\(s\) \['solver'\]"),
    ("spatial_conv1d", lambda: nn.Conv1d(4, 8, 3), dict(rank=2, scheme="spatial"), ValueError,
     re.escape("(Conv1d, weight (8, 4, 3))") + r".*scheme='spatial' applies to Conv2d only"),
    ("channel_depthwise", lambda: nn.Conv2d(4, 4, 3, groups=4), dict(rank=1), ValueError,
     re.escape("(Conv2d, weight (4, 1, 3, 3))") + r".*depthwise.*scheme='spatial'"),
    ("ratio_too_small", conv, dict(ratio=0.01), ValueError,
     LABEL_C + r" with method='svd', ratio=0.01.*even rank 1 needs 44 parameters, more than the budget of 3"),
    ("linear_rank_above", lambda: nn.Linear(5, 3), dict(rank=4), ValueError,
     re.escape("(Linear, weight (3, 5))") + r".*rank=4 is outside \[1, 3\]"),
    ("frozen_rank0", frozen, dict(rank=0), ValueError, LABEL_C + r".*rank=0 must be >= 1"),
    ("named", conv, dict(rank=0, name="features.3"), ValueError, r"^features\.3 " + LABEL_C),
]


@pytest.mark.parametrize("make, kwargs, exc, match", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_names_the_layer_and_the_request(make, kwargs, exc, match):
    layer = make()
    snap = snapshot(layer)
    with pytest.raises(exc, match=match):
        decompose(layer, **kwargs)
    assert_unchanged(layer, snap)


def test_non_module_inputs():
    with pytest.raises(TypeError, match=r"expected an nn.Module layer, got Tensor"):
        decompose(torch.ones(3, 3), rank=2)


def test_subclass_keeping_forward_is_accepted_and_requires_grad_is_kept():
    torch.manual_seed(0)
    layer = KeepsForward(6, 4)
    layer.bias.requires_grad_(False)
    snap = snapshot(layer)
    module = decompose(layer, rank=4)
    x = torch.randn(3, 6)
    rel_close(module(x), layer(x), rel=1e-5)
    assert_unchanged(layer, snap)
    assert type(module.to_dense()) is nn.Linear


def test_decompose_ignores_autograd_and_train_mode():
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 8, 3).train()
    snap = snapshot(layer)
    module = decompose(layer, energy=0.9)
    assert all(p.grad is None for p in layer.parameters())
    assert all(p.requires_grad for p in module.parameters())
    assert layer.training
    assert_unchanged(layer, snap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["linear", "conv2d_groups", "spatial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_device_kept(name, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name](dtype).cuda()
    snap = snapshot(layer)
    module = decompose(layer, rank=2, algorithm="exact", **options_of(name))
    for p in list(module.parameters()) + list(module.to_dense().parameters()):
        assert p.device == layer.weight.device and p.dtype == dtype
    x = torch.randn(INPUTS[name], dtype=dtype, device="cuda")
    with torch.no_grad():
        cpu = decompose(copy.deepcopy(layer).cpu().double(), rank=2, **options_of(name))
        # float32 convs/matmuls may use TF32 on the GPU
        rel = {torch.float32: 5e-3, torch.float64: 1e-5, torch.bfloat16: 0.05}[dtype]
        rel_close(module(x).double().cpu(), cpu(x.double().cpu()), rel=rel)
    assert_unchanged(layer, snap)
