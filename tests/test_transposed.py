"""Transposed convolutions (nn.ConvTranspose1d/2d/3d) factorized as the reversed transposes of a conv chain.

Every layer check is against something computed independently of the layer: ``F.conv_transposeNd``
with the reconstructed weight, an explicit ``nn.Sequential`` of ``nn.ConvTransposeNd`` stage modules
(its output and a hook count of its MACs), the Eckart–Young optimum of the weight's unfolding, the
parameter count of the model itself.
"""
import copy
import math
import re
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, strategies as st

from decomp_toolkit.layers import (UnsupportedLayerError, calibrate, compress, compress_sequential, decompose,
                                   load_compressed, save_compressed)
from decomp_toolkit.layers.transposed import TransposedChain
from _helpers import assert_unchanged, independent_size, rel_close, snapshot

TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FUNCTIONAL_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
OPTIONS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "dilation",
           "groups", "padding_mode")
pytestmark = pytest.mark.filterwarnings("ignore::decomp_toolkit.layers.speed.SlowerThanDenseWarning")
METHODS = [("svd", {}), ("svd", {"scheme": "spatial"}), ("tucker", {}), ("btd", {"n_blocks": 2})]


@st.composite
def transposed_setups(draw, dims=(1, 2, 3)):
    """A float64 transposed conv with drawn options (output padding included), and an input it accepts."""
    dim = draw(st.sampled_from(dims), label="dim")
    groups = draw(st.integers(1, 2), label="groups")
    cin, cout = groups * draw(st.integers(2, 3), label="in_per_group"), groups * draw(st.integers(2, 3))
    kmax = 2 if dim == 3 else 3
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dim))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = tuple(draw(st.integers(0, (d * (k - 1)) // 2)) for k, d in zip(kernel, dilation))
    output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    bias = draw(st.booleans(), label="bias")
    spatial = tuple(draw(st.integers(2, 3) if dim == 3 else st.integers(3, 5)) for _ in range(dim))
    torch.manual_seed(draw(st.integers(0, 2 ** 16), label="seed"))
    conv = TRANSPOSED[dim](cin, cout, kernel, stride=stride, padding=padding, output_padding=output_padding,
                           groups=groups, dilation=dilation, bias=bias, dtype=torch.float64)
    with torch.no_grad():  # a decaying spectrum, like trained weights
        conv.weight.mul_(torch.logspace(0, -2, cin, dtype=torch.float64).view(-1, *([1] * (dim + 1))))
    return conv, torch.randn(2, cin, *spatial, dtype=torch.float64)


def reference(conv, x, weight, output_size=None):
    """``F.conv_transposeNd`` with ``conv``'s options and ``weight`` (the output padding ``output_size`` implies)."""
    dim = len(conv.kernel_size)
    extra = conv._output_padding(x, output_size, list(conv.stride), list(conv.padding), list(conv.kernel_size),
                                 dim, list(conv.dilation))
    return FUNCTIONAL_T[dim](x, weight, conv.bias, conv.stride, conv.padding, tuple(extra), conv.groups,
                             conv.dilation)


def explicit_chain(module):
    """``module`` rebuilt as an ``nn.Sequential`` of ``nn.ConvTransposeNd`` modules (one per stage, reversed), the
    output padding of each axis on the stage with a kernel, stride or padding there (else appended as zeros)."""
    cfg, stages, layers = module.dense_config, list(module.adjoint.children()), []
    moving = {axis: [i for i, s in enumerate(stages) if (s.kernel_size[axis], s.stride[axis], s.padding[axis])
                     != (1, 1, 0)] for axis in range(cfg["dim"])}
    for i, stage in reversed(list(enumerate(stages))):
        extra = tuple(cfg["output_padding"][a] if moving[a] == [i] else 0 for a in range(cfg["dim"]))
        layer = TRANSPOSED[cfg["dim"]](stage.out_channels, stage.in_channels, stage.kernel_size, stage.stride,
                                       stage.padding, extra, stage.groups, bias=False, dilation=stage.dilation,
                                       dtype=stage.weight.dtype)
        layer.weight = nn.Parameter(stage.weight.detach().clone())
        layers.append(layer)
    tail = [cfg["output_padding"][a] if not moving[a] else 0 for a in range(cfg["dim"])]
    return nn.Sequential(*layers), tail


def explicit_forward(module, x):
    """The output of :func:`explicit_chain` (bias added at the end) and the MACs its stages' hooks count."""
    chain, tail = explicit_chain(module)
    macs = []
    for layer in chain:
        layer.register_forward_hook(lambda m, inp, out: macs.append(inp[0].numel() * (m.out_channels // m.groups)
                                                                    * math.prod(m.kernel_size)))
    with torch.no_grad():
        y = F.pad(chain(x), [v for rows in reversed(tail) for v in (0, rows)])
        if module.bias is not None:
            y = y + module.bias.view(-1, *([1] * len(tail)))
    return y, sum(macs)


def eckart_young_error(conv, rank):
    """The least ``||W - W_r||_F`` over per-group rank-``rank`` channel factorizations of the transposed weight
    ``W (C_in, C_out/g, *k)``, whose adjoint conv has ``C_in`` output channels: rows are its input channels."""
    weight = conv.weight.detach().reshape(conv.groups, conv.in_channels // conv.groups, -1)
    values = torch.linalg.svdvals(weight)
    return float(values[:, rank:].square().sum().sqrt())


def _check_layer(conv, module, x):
    dense = module.to_dense()
    assert type(dense) is type(conv)
    for option in OPTIONS:
        assert getattr(dense, option) == getattr(conv, option), option
    assert (dense.bias is None) == (conv.bias is None)
    y = module(x)
    rel_close(y, dense(x))
    rel_close(dense(x), reference(conv, x, module.dense_weight()))
    explicit, macs = explicit_forward(module, x)
    rel_close(y, explicit)
    assert module.flops(x.shape) == macs
    assert module.flops_and_shape(x.shape)[1] == tuple(y.shape) == tuple(conv(x).shape)
    assert module.num_params == independent_size(module)
    assert module.dense_params == sum(p.numel() for p in conv.parameters())
    assert module.dense_flops(x.shape) == x.numel() * (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)


def _check_fit(conv, module, method):
    fit = module.fit
    assert fit.method == method
    measured = float(torch.linalg.norm((conv.weight - module.dense_weight()).detach()))
    assert math.isclose(fit.weight_error, measured, rel_tol=1e-9, abs_tol=1e-12)
    if fit.error_bound is not None:
        assert measured <= fit.error_bound * (1 + 1e-6) + 1e-12


def _check_round_trip(module, x):
    rebuilt = TransposedChain(**module.config, dtype=torch.float64)
    rebuilt.load_state_dict(module.state_dict())
    assert rebuilt.config == module.config
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))


@pytest.mark.parametrize("method, options", METHODS, ids=lambda v: str(v))
@given(setup=transposed_setups())
@example(setup=(nn.ConvTranspose2d(4, 6, (1, 3), dilation=2, output_padding=(1, 1), dtype=torch.float64),
                torch.randn(2, 4, 5, 6, dtype=torch.float64)))
@example(setup=(nn.ConvTranspose3d(4, 6, (2, 1, 3), stride=(2, 1, 3), dtype=torch.float64),  # kernel == stride
                torch.randn(2, 4, 3, 2, 3, dtype=torch.float64)))
@example(setup=(nn.ConvTranspose2d(2, 2, (1, 2), stride=(1, 2), dilation=(1, 2), bias=False,  # dilated
                                   dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)))
def test_forward_equals_the_transposed_conv_of_the_reconstructed_weight(method, options, setup):
    conv, x = setup
    if options.get("scheme") == "spatial" and conv.weight.dim() != 4:
        options = {}
    snap = snapshot(conv)
    module = decompose(conv, method, rank=1 if method == "btd" else 2, **options)
    assert_unchanged(conv, snap)
    assert isinstance(module, TransposedChain)
    _check_layer(conv, module, x)
    _check_fit(conv, module, method)
    _check_round_trip(module, x)


@given(setup=transposed_setups())
def test_channel_svd_reaches_the_eckart_young_optimum(setup):
    conv, _ = setup
    rank = 1
    module = decompose(conv, "svd", rank=rank)
    optimum = eckart_young_error(conv, rank)
    assert math.isclose(module.fit.weight_error, optimum, rel_tol=1e-7, abs_tol=1e-10)


@given(setup=transposed_setups())
def test_output_size_selects_the_output_padding_as_in_torch(setup):
    conv, x = setup
    module = decompose(conv, "tucker", rank=2)
    wanted = [n + e for n, e in zip(conv(x).shape[2:], (s - 1 for s in conv.stride))]
    wanted = [min(w, (n - 1) * s - 2 * p + d * (k - 1) + max(s, d)) for w, n, s, p, d, k in
              zip(wanted, x.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size)]
    y = module(x, output_size=wanted)
    assert list(y.shape[2:]) == wanted
    rel_close(y, reference(conv, x, module.dense_weight(), output_size=wanted))


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_full_rank_is_exact_and_gradients_flow(method):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, dtype=torch.float64)
    full = 6 if method == "svd" else (6, 4)  # tucker ranks follow the weight modes (C_in, C_out)
    module = decompose(conv, method, rank=full)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    rel_close(module(x), conv(x), rel=1e-12)
    module(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_ratio_and_energy_requests_reach_the_transposed_layer():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
    small = decompose(conv, "svd", ratio=0.5)
    assert small.num_params <= 0.5 * sum(p.numel() for p in conv.parameters())
    kept = decompose(conv, "svd", energy=0.8)
    assert kept.fit.weight_error <= math.sqrt(1 - 0.8) * float(conv.weight.detach().norm()) * (1 + 1e-6)


LABEL = re.escape("(ConvTranspose2d, weight (6, 8, 3, 3))")


class ForwardOverride(nn.ConvTranspose2d):
    def forward(self, x, output_size=None):
        return super().forward(x, output_size) * 2


@pytest.mark.parametrize("make, kwargs, error, match", [
    (lambda: nn.ConvTranspose2d(6, 8, 3), dict(method="cp", rank=2), UnsupportedLayerError,
     LABEL + r" with method='cp'.*not chains of plain convs.*btd, svd, tucker"),
    (lambda: nn.ConvTranspose2d(6, 8, 3), dict(method="svd", rank=2, gram=torch.eye(8)), ValueError,
     LABEL + r": gram= is not supported for transposed convs"),
    (lambda: nn.ConvTranspose2d(6, 8, 3), dict(method="svd", rank=9), ValueError, r"rank=9 is outside \[1, 6\]"),
    (lambda: ForwardOverride(6, 8, 3), dict(method="svd", rank=2), TypeError,
     r"ForwardOverride overrides forward\(\) of ConvTranspose2d"),
    (lambda: _nan(nn.ConvTranspose2d(6, 8, 3)), dict(method="tucker", rank=2), ValueError,
     LABEL + r": weight contains NaN or Inf"),
])
def test_bad_requests_name_the_layer(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        decompose(make(), **kwargs)


def test_factors_are_refused_for_transposed_convs():
    with pytest.raises(TypeError, match="factors="):
        decompose(nn.ConvTranspose2d(6, 8, 3), "svd", factors=(torch.ones(8, 2), torch.ones(2, 54)))


def _nan(conv):
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    return conv


def test_optimize_speed_times_the_transposed_layer():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(32, 16, 2, stride=2)
    module = decompose(conv, "svd", rank=8, optimize="speed", input_shape=(1, 32, 8, 8))
    assert isinstance(module, TransposedChain) and module.fit.speedup is not None and module.fit.speedup > 0
    x = torch.randn(1, 32, 8, 8)
    rel_close(module(x), module.to_dense()(x))


# --------------------------------------------------------------------------- whole models

class TinyUNet(nn.Module):
    """Encoder convs, a skip connection and two transposed-conv upsamplers (one with padding)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec = nn.Conv2d(64, 32, 3, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.head = nn.Conv2d(16, 1, 1)

    def forward(self, x):
        skip = self.enc(x)
        u = torch.relu(self.dec(torch.cat([self.up(self.down(skip)), skip], 1)))
        return self.head(self.up2(u))


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs", [dict(method="svd", ratio=0.5), dict(method="tucker", budget=dict(params=0.5)),
                                    dict(method="svd", budget=dict(flops=0.5))], ids=str)
def test_compress_replaces_transposed_convs_and_reloads(kwargs):
    torch.manual_seed(0)
    model, x = TinyUNet().eval(), torch.randn(2, 3, 16, 16)
    snap = snapshot(model)
    small, report = compress(model, example_input=x, **kwargs)
    assert_unchanged(model, snap)
    status = {r.name: r.status for r in report.layers}
    for name in ("up", "up2"):  # a budget may keep a layer dense, and says so
        replaced = isinstance(getattr(small, name), TransposedChain)
        assert status[name] == "replaced" if replaced else status[name] == "skipped: kept dense by the budget allocation"
    assert isinstance(small.up, TransposedChain) or isinstance(small.up2, TransposedChain)
    assert report.model_params_after == _params(small) and report.model_params_before == _params(model)
    totals = report.totals()
    if "budget" in kwargs:
        kind, fraction = next(iter(kwargs["budget"].items()))
        assert totals[f"{kind}_after"] <= fraction * totals[f"{kind}_before"] * (1 + 1e-9)
        assert report.budget_met
    with tempfile.TemporaryDirectory() as folder:
        save_compressed(small, folder)
        back = load_compressed(folder, model=TinyUNet())
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_a_method_without_conv_chains_keeps_transposed_convs_dense_with_the_reason():
    torch.manual_seed(0)
    small, report = compress(TinyUNet().eval(), method="cp", rank=4, random_state=0)
    status = {r.name: r.status for r in report.layers}
    assert type(small.up) is nn.ConvTranspose2d and status["dec"] == "replaced"
    assert "not chains of plain convs: no transposed form" in status["up"] and "svd, tucker" in status["up"]


def test_calibration_decomposes_transposed_convs_from_their_weights_and_says_so():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    calibration = calibrate(model, [torch.randn(2, 3, 16, 16) for _ in range(3)])
    assert "up" not in calibration.grams
    small, report = compress(model, ratio=0.5, calibration=calibration)
    assert isinstance(small.up, TransposedChain)
    assert any("up" in note and "no data-aware" in note for note in report.notes), report.notes


def test_sequential_compression_keeps_transposed_convs_dense_with_the_reason():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    small, report = compress_sequential(model, batches, ratio=0.5)
    status = {r.name: r.status for r in report.layers}
    assert type(small.up) is nn.ConvTranspose2d
    assert "transposed convolutions have no data-aware fit" in status["up"]
    assert copy.deepcopy(small)(batches[0]).shape == model(batches[0]).shape


REPARAMETRIZED = {
    "weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "spectral_norm": lambda m: nn.utils.parametrizations.spectral_norm(m),
    "legacy weight_norm": lambda m: nn.utils.weight_norm(m),
    "legacy spectral_norm": lambda m: nn.utils.spectral_norm(m),
}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("how", sorted(REPARAMETRIZED))
@pytest.mark.parametrize("layer", ["transposed", "conv", "linear"])
def test_compress_and_decompose_factorize_reparametrized_layers_from_their_effective_weight(how, layer):
    torch.manual_seed(0)
    make = {"transposed": lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1),
            "conv": lambda: nn.Conv2d(16, 8, 3), "linear": lambda: nn.Linear(16, 8)}[layer]
    model = nn.Sequential(REPARAMETRIZED[how](make()), nn.ReLU()).eval()
    x = torch.randn(2, 16) if layer == "linear" else torch.randn(2, 16, 7, 7)
    with torch.no_grad():   # the eval-mode weight (spectral norm: no power iteration), as the model computes it
        plain, expected = make(), model[0](x)   # the forward sets a legacy hook's .weight
        plain.weight.copy_(model[0].weight)
        plain.bias.copy_(model[0].bias)
        torch.testing.assert_close(plain(x), expected)
    saved = snapshot(model)
    small, report = compress(model, method="svd", rank=3, progress=False)
    assert_unchanged(model, saved)
    assert report.layers[0].status == "replaced" and report.layers[0].rank == 3
    with torch.no_grad():
        torch.testing.assert_close(small[0](x), decompose(plain, "svd", rank=3)(x), rtol=1e-5, atol=1e-5)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    alone = decompose(model[0], "svd", rank=3)   # one layer: the same factorization, no parametrization left
    assert_unchanged(model, saved)
    assert not nn.utils.parametrize.is_parametrized(alone) and not alone._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(alone(x), small[0](x), rtol=1e-5, atol=1e-5)
