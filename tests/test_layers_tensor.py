"""Property tests of the tensor-method layers: tucker (TuckerConv), cp (CPConv), tt (TTLinear), btd
(BlockTermConv).

For hypothesis-drawn shapes and conv options (Conv1d/2d/3d, stride, padding int/tuple/'same'/
'valid', every padding_mode, dilation, groups, bias), in float64:

* factorized forward == to_dense() forward == F.convNd with the reconstructed weight (padding
  applied by hand), relative 1e-5;
* at full rank (Tucker, TT) the original layer's function is kept;
* error bounds: HOSVD / TT-SVD bounds hold, CP / BTD report the measured error;
* flops() == the MACs of the stages counted from their outputs; the input layer is untouched.

Then the module contract (num_params, hand-counted FLOPs (Kim et al.'s Tucker-2 formula, CP's
R(C + 2D + N) parameters), extra_repr, state_dict round trips, dtype/device), the
``optimize="speed"`` mechanism (timing replaced: no wall clock is asserted), compress with a
Tucker FLOP budget, and error messages.
"""
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import decomp_toolkit.layers.speed as speed
from decomp_toolkit.layers import (BlockTermConv, CPConv, LowRankLinear, SlowerThanDenseWarning, TTLinear, TuckerConv,
                                   UnsupportedLayerError, compress, count_params, decompose)
from _helpers import (assert_same_options, assert_unchanged, check_contract, check_dtype_kept, conv_setups,
                      reference_conv, rel_close, snapshot, stage_macs)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
FAST_BTD = dict(n_iter_max=3, n_init=1)
FAST_CP = dict(n_iter_max=15)


def check_conv(conv, x, module):
    """forward == to_dense == reference conv with the reconstructed weight; accounting; layer untouched."""
    snap = snapshot(conv)
    dense = module.to_dense()
    assert_same_options(dense, conv)
    y, y_dense = module(x), dense(x)
    rel_close(y, y_dense)
    rel_close(y_dense, reference_conv(x, module.dense_weight(), conv.bias, conv))
    err = float(torch.linalg.norm(conv.weight - dense.weight).detach())
    fit = module.fit
    assert fit.weight_norm == pytest.approx(float(conv.weight.detach().norm()), rel=1e-9)
    assert err == pytest.approx(fit.error, rel=1e-6, abs=1e-10 * fit.norm)  # measured
    assert fit.error_bound is None or err <= fit.error_bound * (1 + 1e-6) + 1e-12  # certified where there is one
    assert module.num_params == sum(p.numel() for p in module.parameters())
    assert module.dense_params == count_params(conv)
    assert module.dense_flops(x.shape) == stage_macs(conv, x)
    assert_unchanged(conv, snap)
    return err


# --------------------------------------------------------------------------- Tucker

@given(setup=conv_setups(), data=st.data())
def test_tucker_conv_matches_dense_reference_and_original(setup, data):
    conv, x = setup
    g = conv.groups
    n_out, n_in = conv.out_channels // g, conv.in_channels // g
    rank = (data.draw(st.integers(1, n_out), label="r_out"), data.draw(st.integers(1, n_in), label="r_in"))
    module = decompose(conv, method="tucker", rank=rank, algorithm=data.draw(st.sampled_from(["hooi", "sthosvd"])))
    assert type(module) is TuckerConv and module.rank == rank
    check_conv(conv, x, module)
    assert module.flops(x.shape) == stage_macs(module, x)
    full = decompose(conv, method="tucker", rank=(n_out, n_in))
    rel_close(full(x), conv(x))
    assert full.fit.error_bound <= 1e-10 * full.fit.weight_norm + 1e-12


@pytest.mark.parametrize("spec", [dict(energy=0.9), dict(tol=0.3), dict(ratio=0.5), dict(rank="vbmf"), dict(rank=3)])
def test_tucker_rank_specs(spec):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    module = decompose(conv, method="tucker", **spec)
    if "tol" in spec:
        assert module.fit.error_bound <= spec["tol"] * module.fit.weight_norm
    if "ratio" in spec:
        assert module.num_params - 12 <= 0.5 * 12 * 8 * 9
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    rel_close(module(x), module.to_dense()(x))


def test_tucker_flops_kims_formula():
    S, T, D, R3, R4 = 64, 128, 3, 16, 24
    module = TuckerConv(S, T, D, rank=(R4, R3), stride=2, padding=1)  # rank = (R_out, R_in)
    H = W = 32
    Hp = Wp = 16
    assert module.flops((1, S, H, W)) == S * R3 * H * W + D * D * R3 * R4 * Hp * Wp + T * R4 * Hp * Wp
    assert module.flops((1, S, H, W)) == stage_macs(module, torch.randn(1, S, H, W))
    assert module.num_params == S * R3 + D * D * R3 * R4 + T * R4 + T


def test_tucker_linear_is_svd():
    torch.manual_seed(0)
    linear = nn.Linear(12, 9, dtype=torch.float64)
    module = decompose(linear, method="tucker", rank=(4, 4))
    assert type(module) is LowRankLinear and module.rank == 4
    svd = decompose(linear, method="svd", rank=4)
    x = torch.randn(3, 12, dtype=torch.float64)
    rel_close(module(x), svd(x))
    with pytest.raises(ValueError, match=r"\(Linear, weight \(9, 12\)\).*Tucker-2 is the truncated SVD"):
        decompose(linear, method="tucker", rank=(4, 3))


# --------------------------------------------------------------------------- CP

@given(setup=conv_setups(), data=st.data())
def test_cp_conv_matches_dense_reference(setup, data):
    conv, x = setup
    shape = (conv.out_channels // conv.groups,) + tuple(conv.weight.shape[1:])
    rank = data.draw(st.integers(1, min(3, math.prod(shape) // max(shape))), label="rank")
    module = decompose(conv, method="cp", rank=rank, random_state=0, **FAST_CP)
    assert type(module) is CPConv and module.rank == rank
    err = check_conv(conv, x, module)
    assert err == pytest.approx(module.fit.error, rel=1e-6, abs=1e-10 * module.fit.weight_norm)  # a-posteriori
    assert module.fit.error_bound is None and len(module.fit.diagnostics["cp"]) == conv.groups  # nothing certified
    assert module.flops(x.shape) == stage_macs(module, x)
    dim = len(conv.kernel_size)
    if dim > 1:  # the fused depthwise stage computes the same function
        module.implementation = "fused"
        rel_close(module(x), module.to_dense()(x))
        c = module.first.out_channels
        out = module(x)
        fused = out.shape[0] * c * math.prod(out.shape[2:]) * math.prod(conv.kernel_size)
        assert module.flops(x.shape) == stage_macs(module.first, x) + fused + stage_macs(
            module.last, torch.zeros(out.shape[0], c, *out.shape[2:], dtype=x.dtype))


def test_cp_exact_low_rank_kernel_is_recovered():
    torch.manual_seed(1)
    R, N, C, k = 3, 6, 5, 3
    A, B, U, V = (torch.randn(n, R, dtype=torch.float64) for n in (N, C, k, k))
    kernel = torch.einsum("nr,cr,hr,wr->nchw", A, B, U, V)
    conv = nn.Conv2d(C, N, k, padding=1, padding_mode="reflect", dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    module = decompose(conv, method="cp", rank=R, random_state=0)
    x = torch.randn(2, C, 7, 7, dtype=torch.float64)
    rel_close(module(x), conv(x), rel=1e-5)


def test_cp_params_and_flops_by_hand():
    C, N, D, R = 32, 48, 3, 10
    module = CPConv(C, N, D, rank=R, stride=2, padding=1)
    assert module.num_params == R * (C + 2 * D + N) + N
    H = 16
    x = torch.randn(1, C, H, H)
    # 1x1 on H x H, 3x1 stride (2,1) -> 8 x 16, 1x3 stride (1,2) -> 8 x 8, 1x1 on 8 x 8
    assert module.flops(x.shape) == R * C * H * H + R * D * 8 * 16 + R * D * 8 * 8 + N * R * 8 * 8
    assert module.flops(x.shape) == stage_macs(module, x)
    module.implementation = "fused"
    assert module.flops(x.shape) == R * C * H * H + R * D * D * 8 * 8 + N * R * 8 * 8


# --------------------------------------------------------------------------- TT

@st.composite
def tt_setups(draw):
    d = draw(st.integers(2, 3), label="d")
    in_shape = tuple(draw(st.integers(1, 4)) for _ in range(d))
    out_shape = tuple(draw(st.integers(1, 4)) for _ in range(d))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    linear = nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=bias, dtype=torch.float64)
    return linear, in_shape, out_shape, torch.randn(*lead, linear.in_features, dtype=torch.float64)


@given(setup=tt_setups(), rank=st.integers(1, 4), order=st.sampled_from(["rtl", "ltr"]))
def test_tt_linear_matches_dense_and_original(setup, rank, order):
    linear, in_shape, out_shape, x = setup
    snap = snapshot(linear)
    module = decompose(linear, method="tt", rank=rank, in_shape=in_shape, out_shape=out_shape)
    module.implementation = order
    assert type(module) is TTLinear and module.in_shape == in_shape and module.out_shape == out_shape
    dense = module.to_dense()
    assert type(dense) is nn.Linear and (dense.bias is None) == (linear.bias is None)
    y = module(x)
    assert y.shape == (*x.shape[:-1], linear.out_features)
    rel_close(y, dense(x))
    rel_close(dense(x), torch.nn.functional.linear(x, module.dense_weight(), linear.bias))
    err = float(torch.linalg.norm(linear.weight - dense.weight).detach())
    assert err <= module.fit.error_bound * (1 + 1e-6) + 1e-12
    full = decompose(linear, method="tt", rank=10 ** 6, in_shape=in_shape, out_shape=out_shape)
    rel_close(full(x), linear(x))
    rows = math.prod(x.shape[:-1])
    ranks = module.ranks if order == "rtl" else module.ranks[::-1]
    n, m = (in_shape, out_shape) if order == "rtl" else (in_shape[::-1], out_shape[::-1])
    hand = sum(rows * math.prod(n[:k]) * math.prod(m[k + 1:]) * ranks[k] * m[k] * n[k] * ranks[k + 1]
               for k in range(len(n)))
    assert module.flops(x.shape) == hand
    assert module.num_params == sum(ranks[k] * m[k] * n[k] * ranks[k + 1] for k in range(len(n))) + (
        linear.out_features if linear.bias is not None else 0)
    assert_unchanged(linear, snap)


def test_tt_auto_shapes_and_tol():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, dtype=torch.float64)
    module = decompose(linear, method="tt", tol=0.5)
    assert math.prod(module.in_shape) == 64 and math.prod(module.out_shape) == 48
    assert module.fit.error_bound <= 0.5 * module.fit.weight_norm
    macs = {order: module._order_macs(order, 64) for order in ("rtl", "ltr", "rtl-pairs")}
    best = min(("rtl", "ltr"), key=macs.get)
    pairs = len(module.in_shape) >= 3 and macs["rtl-pairs"] <= 1.25 * macs[best]
    assert module.implementation == ("rtl-pairs" if pairs else best)


# --------------------------------------------------------------------------- BTD

BTD_CASES = [
    nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect", dtype=torch.float64),
    nn.Conv2d(6, 6, (3, 2), stride=2, padding=(1, 2), dilation=(2, 1), groups=2, padding_mode="circular",
              bias=False, dtype=torch.float64),
    nn.Conv1d(4, 6, 3, dilation=2, padding="valid", dtype=torch.float64),
    nn.Conv3d(4, 6, 2, stride=(1, 2, 1), padding=1, padding_mode="replicate", dtype=torch.float64),
]


@pytest.mark.parametrize("index", range(len(BTD_CASES)))
def test_btd_conv_matches_dense_reference(index):
    torch.manual_seed(index)
    conv = BTD_CASES[index]
    x = torch.randn(2, conv.in_channels, *([6] * (conv.weight.ndim - 2)), dtype=torch.float64)
    module = decompose(conv, method="btd", rank=2, n_blocks=2, **FAST_BTD)
    assert type(module) is BlockTermConv and module.rank == (2, 2) and module.n_blocks == 2
    err = check_conv(conv, x, module)
    assert err == pytest.approx(module.fit.error, rel=1e-6, abs=1e-10 * module.fit.weight_norm)
    assert module.fit.error_bound is None and len(module.fit.diagnostics["btd"]) == conv.groups
    assert module.flops(x.shape) == stage_macs(module, x)
    assert module.core.groups == 2 * conv.groups


def test_btd_flops_by_hand():
    C, N, D, B, r_in, r_out = 32, 48, 3, 4, 5, 6
    module = BlockTermConv(C, N, D, rank=(r_out, r_in), n_blocks=B, padding=1)
    H = 10
    assert module.flops((1, C, H, H)) == (C * B * r_in + D * D * B * r_in * r_out + N * B * r_out) * H * H
    assert module.num_params == C * B * r_in + D * D * B * r_in * r_out + N * B * r_out + N


# --------------------------------------------------------------------------- module contract

def _conv(dt=torch.float64):
    return nn.Conv2d(6, 8, 3, stride=(2, 1), padding=(1, 2), padding_mode="replicate", dtype=dt)


BUILDS = {
    "tucker": (_conv, dict(method="tucker", rank=(3, 2)), (2, 6, 7, 7)),
    "tucker3d": (lambda dt: nn.Conv3d(4, 6, 2, padding=1, padding_mode="circular", groups=2, dtype=dt),
                 dict(method="tucker", rank=2), (1, 4, 4, 4, 3)),
    "cp": (_conv, dict(method="cp", rank=3, random_state=0, **FAST_CP), (2, 6, 7, 7)),
    "cp_fused": (_conv, dict(method="cp", rank=3, random_state=0, implementation="fused", **FAST_CP), (2, 6, 7, 7)),
    "tt": (lambda dt: nn.Linear(24, 12, dtype=dt), dict(method="tt", rank=3), (2, 3, 24)),
    "tt_nobias": (lambda dt: nn.Linear(24, 12, bias=False, dtype=dt), dict(method="tt", rank=2, d=3), (4, 24)),
    "btd": (_conv, dict(method="btd", rank=2, n_blocks=2, **FAST_BTD), (2, 6, 7, 7)),
}


def build(name, dtype):
    torch.manual_seed(0)
    make, spec, shape = BUILDS[name]
    layer = make(dtype)
    return layer, decompose(layer, **spec), shape


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_module_contract(name):
    """The shared contract (tests/_helpers.check_contract) on method-specific variants (fused CP, 3-core TT, ...)."""
    torch.manual_seed(0)
    make, spec, shape = BUILDS[name]
    layer = make(torch.float64)
    module = check_contract(layer, lambda lay: decompose(lay, **spec), torch.randn(shape, dtype=torch.float64),
                            spec["method"])
    assert module.num_params < count_params(layer)
    assert f"rank={module.rank}" in module.extra_repr() and f"rank={module.rank}" in repr(module)
    assert module.fit.speedup is None and "speed" not in module.fit.diagnostics
    assert module.fit.weight_norm > 0 and (module.fit.error_bound is not None or module.fit.error is not None)


@pytest.mark.parametrize("name", ["tucker", "cp", "tt", "btd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_device_kept(name, dtype):
    make, spec, shape = BUILDS[name]
    torch.manual_seed(0)
    check_dtype_kept(make(torch.float64), lambda lay: decompose(lay, **spec), torch.randn(shape, dtype=torch.float64),
                     dtype)


# --------------------------------------------------------------------------- optimize="speed"

@pytest.fixture
def fake_timing(monkeypatch):
    """Replace the one timing function: 'dense' takes ``times['dense']``, the factorized layer and the
    implementations 'rtl'/'separable' 1, the alternatives 'ltr'/'fused' 1.5."""
    times = {"dense": 2.0}

    def fake(modules, x, repeats=7, warmup=2):
        for module in modules.values():  # still run each once: the mechanism must execute them
            with torch.no_grad():
                module(x)
        return {k: times.get(k, 1.5 if k in ("ltr", "fused") else 1.0) for k in modules}
    monkeypatch.setattr(speed, "time_modules", fake)
    return times


def test_optimize_speed_rounds_ranks_and_marks_faster(fake_timing):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 40, 3, padding=1)
    module = decompose(conv, method="tucker", rank=(13, 11), optimize="speed", input_shape=(1, 32, 8, 8))
    assert module.rank == (16, 8)
    speed_info = module.fit.diagnostics["speed"]
    assert module.fit.speedup == pytest.approx(2.0) and speed_info["slower_than_dense"] is False
    assert speed_info["input_shape"] == (1, 32, 8, 8)


def test_optimize_speed_warns_and_marks_slower(fake_timing):
    fake_timing["dense"] = 0.5
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with pytest.warns(SlowerThanDenseWarning, match=r"\(Linear, weight \(32, 64\)\).*speedup 0.50x < 1"):
        module = decompose(linear, method="tt", rank=3, optimize="speed")
    assert module.fit.diagnostics["speed"]["slower_than_dense"] is True and module.fit.speedup == pytest.approx(0.5)
    assert module.rank == (8,)  # 3 rounded up to a multiple of 8
    assert module.implementation == "rtl"  # the first candidate is the fastest under fake timing
    with pytest.raises(UnsupportedLayerError, match=r"speedup 0.50x < 1\); on_slower='raise'"):
        decompose(linear, method="tt", rank=3, optimize="speed", on_slower="raise")


def test_optimize_speed_needs_conv_input_shape():
    with pytest.raises(ValueError, match=r"\(Conv2d, weight \(8, 6, 3, 3\)\).*needs input_shape="):
        decompose(_conv(), method="tucker", rank=2, optimize="speed")
    with pytest.raises(ValueError, match=r"optimize='fast' is not understood"):
        decompose(_conv(), method="tucker", rank=2, optimize="fast")


def test_optimize_speed_real_timing_runs():
    """The real timer runs and marks (its verdict is not asserted: wall clock is noisy)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowerThanDenseWarning)
        module = decompose(conv, method="cp", rank=4, optimize="speed", input_shape=(1, 8, 6, 6), **FAST_CP)
    assert module.fit.speedup > 0 and module.fit.diagnostics["speed"]["slower_than_dense"] in (True, False)
    assert module.implementation in ("separable", "fused")


# --------------------------------------------------------------------------- compress with a Tucker budget

def test_compress_tucker_flop_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    x = torch.randn(1, 3, 8, 8)
    small, report = compress(model, method="tucker", budget=dict(flops=0.5), example_input=x, progress=False)
    totals = report.totals()
    assert report.budget.met and totals["flops_after"] <= 0.5 * totals["flops_before"]
    assert any(isinstance(m, TuckerConv) for m in small.modules())
    assert small(x).shape == (1, 10)
    assert all(r.rel_error_bound is not None for r in report.replaced)


# --------------------------------------------------------------------------- bad input

LABEL = re.escape("(Conv2d, weight (8, 6, 3, 3))")
DEPTHWISE = re.escape("(Conv2d, weight (6, 1, 3, 3))")
BAD = [
    ("cp_energy", _conv, dict(method="cp", energy=0.9), ValueError, LABEL + r".*energy= is not supported by CP"),
    ("cp_linear", lambda: nn.Linear(6, 4), dict(method="cp", rank=2), ValueError,
     re.escape("(Linear, weight (4, 6))") + r".*method='cp'.*use method='svd'.*'tt'"),
    ("tt_conv", _conv, dict(method="tt", rank=2), ValueError, LABEL + r".*method='tt'.*use method='tucker'"),
    ("btd_linear", lambda: nn.Linear(6, 4), dict(method="btd", rank=2), ValueError,
     re.escape("(Linear, weight (4, 6))") + r".*method='btd' does not support Linear layers"),
    ("btd_energy", _conv, dict(method="btd", energy=0.9), ValueError, LABEL + r".*energy= is not supported"),
    ("tucker_depthwise", lambda: nn.Conv2d(6, 6, 3, groups=6), dict(method="tucker", rank=1), ValueError,
     DEPTHWISE + r".*depthwise.*nothing to factorize"),
    ("cp_depthwise", lambda: nn.Conv2d(6, 6, 3, groups=6), dict(method="cp", rank=1), ValueError,
     DEPTHWISE + r".*depthwise.*nothing to factorize"),
    ("btd_depthwise", lambda: nn.Conv2d(6, 6, 3, groups=6), dict(method="btd", rank=1), ValueError,
     DEPTHWISE + r".*depthwise.*nothing to factorize"),
    ("tucker_transposed", lambda: nn.ConvTranspose2d(6, 8, 3), dict(method="tucker", rank=(7, 2)), ValueError,
     re.escape("(ConvTranspose2d, weight (6, 8, 3, 3))") + r".*rank for mode 0=7 is outside \[1, 6\]"),
    ("cp_transposed", lambda: nn.ConvTranspose1d(6, 8, 3), dict(method="cp", rank=2), UnsupportedLayerError,
     r"ConvTranspose1d.*method='cp'.*not chains of plain convs"),
    ("tucker_rank_too_large", _conv, dict(method="tucker", rank=(9, 2)), ValueError,
     LABEL + r".*rank for mode 0=9 is outside \[1, 8\]"),
    ("cp_rank_too_large", _conv, dict(method="cp", rank=1000), ValueError, LABEL + r".*rank=1000 is outside"),
    ("tt_rank_too_large", lambda: nn.Linear(16, 16), dict(method="tt", rank=(17,), in_shape=(4, 4),
                                                          out_shape=(4, 4)), ValueError,
     re.escape("(Linear, weight (16, 16))") + r".*bond rank r_1=17 exceeds"),
    ("btd_rank_too_large", _conv, dict(method="btd", rank=(2, 7)), ValueError, LABEL + r".*exceeds the mode sizes"),
    ("tucker_unknown_option", _conv, dict(method="tucker", rank=2, n_blocks=2), TypeError,
     LABEL + r".*unknown option\(s\) \['n_blocks'\]"),
    ("cp_bad_implementation", _conv, dict(method="cp", rank=2, implementation="fft"), ValueError,
     LABEL + r".*implementation='fft' is not one of"),
]


@pytest.mark.parametrize("make, kwargs, exc, match", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_names_the_layer_and_the_request(make, kwargs, exc, match):
    torch.manual_seed(0)
    layer = make()
    snap = snapshot(layer)
    with pytest.raises(exc, match=match):
        decompose(layer, **kwargs)
    assert_unchanged(layer, snap)


@pytest.mark.parametrize("method, options", [("cp", dict(random_state=0, n_iter_max=5)), ("tt", dict(max_rank=4)),
                                             ("tucker", dict(algorithm="sthosvd"))])
def test_compress_passes_method_options_to_every_layer_kind(method, options):
    """Refusing builders take the same options, so compress reports the refusal instead of a TypeError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    small, report = compress(model, method=method, ratio=0.5, progress=False, **options)
    statuses = {r.name: r.status for r in report.layers}
    refused = {"cp": "2", "tt": "0"}.get(method)
    if refused is not None:
        assert statuses[refused].startswith("skipped:") and f"method='{method}'" in statuses[refused]
    assert small(torch.randn(1, 3, 6, 6)).shape == (1, 16)


def test_tt_pairs_implementation_by_hand():
    torch.manual_seed(0)
    in_shape, out_shape = (2, 3, 2, 2), (3, 2, 2, 2)
    linear = nn.Linear(24, 24, dtype=torch.float64)
    module = decompose(linear, method="tt", rank=(2, 3, 2), in_shape=in_shape, out_shape=out_shape)
    module.implementation = "rtl-pairs"
    x = torch.randn(5, 24, dtype=torch.float64)
    rel_close(module(x), module.to_dense()(x))
    r = module.ranks  # (1, 2, 3, 2, 1); merged train: in (6, 4), out (6, 4), ranks (1, 3, 1)
    merge = r[0] * 3 * 2 * r[1] * 2 * 3 * r[2] + r[2] * 2 * 2 * r[3] * 2 * 2 * r[4]
    contract = 5 * 6 * (4 * 1 * 3 * 4) + 5 * 4 * (6 * 3 * 1 * 6)
    assert module.flops(x.shape) == merge + contract


# --------------------------------------------------------------------------- factors computed elsewhere

def test_layers_from_given_factors_ours_and_tensorly():
    """decompose(layer, method, factors=...) builds the same layer as the rank spec would, from our factor
    objects or tensorly's (converted), and refuses factors that do not fit the layer."""
    import tensorly as tl
    from tensorly.decomposition import parafac
    from tensorly.decomposition import tucker as tl_tucker

    from decomp_toolkit.decomp import cp, svd, tt_matrix, tucker
    tl.set_backend("pytorch")
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect", dtype=torch.float64)
    lin = nn.Linear(24, 12, dtype=torch.float64)
    K, W = conv.weight.detach(), lin.weight.detach()
    x, z = torch.randn(2, 6, 7, 7, dtype=torch.float64), torch.randn(3, 24, dtype=torch.float64)
    cases = [(conv, "tucker", tucker(K, rank=(3, 2), modes=(0, 1)), dict(rank=(3, 2)), x),
             (conv, "cp", cp(K, rank=4, random_state=0), dict(rank=4, random_state=0), x),
             (lin, "svd", svd(W, rank=3), dict(rank=3), z),
             (lin, "tt", tt_matrix(W, rank=3), dict(rank=3), z)]
    for layer, method, factors, spec, inp in cases:
        snap = snapshot(layer)
        given, asked = decompose(layer, method, factors=factors), decompose(layer, method, **spec)
        assert type(given) is type(asked) and given.rank == asked.rank
        rel_close(given(inp), asked(inp), rel=1e-9)
        assert given.fit.method == method and given.fit.weight_error == pytest.approx(asked.fit.weight_error)
        assert_unchanged(layer, snap)
    theirs_cases = (("cp", parafac(K, 4, init="random", random_state=0)), ("tucker", tl_tucker(K, [3, 2, 3, 3])))
    for method, theirs in theirs_cases:
        module = decompose(conv, method, factors=theirs)
        rel_close(module(x), module.to_dense()(x))
        rel_close(module.dense_weight(), tl.cp_to_tensor(theirs) if method == "cp" else tl.tucker_to_tensor(theirs),
                  rel=1e-9)
    with pytest.raises(ValueError, match=r"factors= of shape \(5, 5\) do not fit this layer"):
        decompose(lin, "svd", factors=svd(torch.randn(5, 5, dtype=torch.float64), rank=2))
    with pytest.raises(TypeError, match="factors= fixes the factorization; drop rank="):
        decompose(lin, "svd", factors=svd(W, rank=2), rank=2)
    with pytest.raises(TypeError, match="cannot be built from given factors"):
        decompose(conv, "btd", factors=cp(K, rank=2))
