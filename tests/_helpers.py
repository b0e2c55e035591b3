"""Helpers shared by the layer tests: comparisons, state snapshots, a reference conv, MAC counting by hooks,
and the hypothesis strategy of conv setups. Test modules import from here, never from each other."""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

PAD_MODES = ("zeros", "reflect", "replicate", "circular")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
REL = 1e-5

def rel_close(actual, expected, rel=REL):
    """||actual - expected|| <= rel * ||expected|| (with a tiny floor for all-zero outputs)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.detach(), expected.detach()
    diff = float(torch.linalg.norm((actual - expected).double().flatten()))
    scale = float(torch.linalg.norm(expected.double().flatten()))
    assert diff <= rel * scale + 1e-12, f"relative difference {diff / max(scale, 1e-300):.3g} > {rel}"


def snapshot(layer):
    """Bit-exact copy of the state_dict (NaN-safe) and the requires_grad flags."""
    state = {k: ("uninitialized", None, torch.empty(0)) if isinstance(v, nn.parameter.UninitializedParameter)
             else (v.dtype, tuple(v.shape), v.detach().clone().reshape(-1).view(torch.uint8))
             for k, v in layer.state_dict().items()}
    grads = {k: p.requires_grad for k, p in layer.named_parameters()}
    return state, grads


def assert_unchanged(layer, snap):
    state, grads = snapshot(layer)
    assert state.keys() == snap[0].keys()
    for key, (dtype, shape, raw) in state.items():
        assert (dtype, shape) == snap[0][key][:2], key
        assert torch.equal(raw, snap[0][key][2]), f"{key} was modified"
    assert grads == snap[1]


def reference_conv(x, weight, bias, conv):
    """F.convNd with ``conv``'s options, the padding (and its mode) applied by hand."""
    dim = len(conv.kernel_size)
    if conv.padding == "valid":
        pads = [(0, 0)] * dim
    elif conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(flat):
        x = F.pad(x, flat, mode=mode)
    return FUNCTIONAL[dim](x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)


def stage_macs(module, x):
    """MACs of one forward, counted from each leaf stage's actual output shape."""
    total = 0

    def hook(stage, inputs, output):
        nonlocal total
        if isinstance(stage, nn.Linear):
            total += output.numel() * stage.in_features
        else:
            total += output.numel() * (stage.in_channels // stage.groups) * math.prod(stage.kernel_size)

    leaves = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def assert_same_options(dense, conv):
    assert type(dense) is type(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(dense, attr) == getattr(conv, attr), attr
    assert (dense.bias is None) == (conv.bias is None)
    assert dense.weight.shape == conv.weight.shape
    assert dense.weight.dtype == conv.weight.dtype and dense.weight.device == conv.weight.device


@st.composite
def conv_setups(draw, dims=(1, 2, 3), min_in_per_group=2):
    """A float64 conv with drawn options, and an input it accepts."""
    dim = draw(st.sampled_from(dims), label="dim")
    groups = draw(st.integers(1, 3), label="groups")
    cin = groups * draw(st.integers(min_in_per_group, 3), label="in_per_group")
    cout = groups * draw(st.integers(1, 3), label="out_per_group")
    kmax = 2 if dim == 3 else 3
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]), label="pad_kind")
    stride = (1,) * dim if pad_kind == "same" else tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding = {"int": lambda: draw(st.integers(0, 2)), "tuple": lambda: tuple(draw(st.integers(0, 2))
                                                                           for _ in range(dim)),
               "same": lambda: "same", "valid": lambda: "valid"}[pad_kind]()
    padding_mode = draw(st.sampled_from(PAD_MODES), label="padding_mode")
    bias = draw(st.booleans(), label="bias")
    spatial = tuple(draw(st.integers(4, 5) if dim == 3 else st.integers(5, 7)) for _ in range(dim))
    seed = draw(st.integers(0, 2 ** 16), label="seed")
    torch.manual_seed(seed)
    conv = CONV[dim](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=bias, padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():  # a decaying spectrum, like trained weights
        conv.weight.mul_(torch.logspace(0, -2, conv.weight.shape[0], dtype=torch.float64).view(
            -1, *([1] * (dim + 1))))
    x = torch.randn(2, cin, *spatial, dtype=torch.float64)
    return conv, x


# --------------------------------------------------------------------------- the factorized-layer contract

def independent_size(module):
    """Numbers a module stores, counted from its tensors: parameters plus buffers (PQ codes are buffers)."""
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def _leaf_stages(module):
    return [m for m in module.modules() if m is not module and isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                                               nn.Conv3d))]


def check_forward_and_dense(layer, module, x):
    """forward == to_dense() forward == the reference op with the reconstructed weight; options kept."""
    dense = module.to_dense()
    if isinstance(layer, nn.Linear):
        assert type(dense) is nn.Linear
        assert (dense.in_features, dense.out_features) == (layer.in_features, layer.out_features)
        assert (dense.bias is None) == (layer.bias is None)
        reference = F.linear(x, module.dense_weight(), layer.bias)
    else:
        assert_same_options(dense, layer)
        reference = reference_conv(x, module.dense_weight(), layer.bias, layer)
    y = module(x)
    assert y.shape == reference.shape
    rel_close(y, dense(x))
    rel_close(dense(x), reference)
    torch.testing.assert_close(dense.weight, module.dense_weight(), rtol=0, atol=0)


def check_accounting(layer, module, x):
    """num_params / flops against independent counts (tensor sizes, hooks on the stages)."""
    assert module.num_params == independent_size(module)
    assert module.dense_params == sum(p.numel() for p in layer.parameters())
    assert module.dense_flops(x.shape) == stage_macs(layer, x)
    macs = module.flops(x.shape)
    assert isinstance(macs, int) and macs > 0
    assert module.flops_and_shape(x.shape)[1] == tuple(module(x).shape)
    stages = _leaf_stages(module)
    if stages and getattr(module, "implementation", None) != "fused":  # a chain of plain stages
        assert macs == stage_macs(module, x)
    if not isinstance(layer, nn.Linear):  # the batch dimension is optional and linear
        assert module.flops(x.shape[1:]) * x.shape[0] == macs


def check_round_trip(module, x, dtype):
    """``type(module)(**config)`` + ``load_state_dict`` rebuilds the same function."""
    rebuilt = type(module)(**module.config, dtype=dtype)
    rebuilt.load_state_dict(module.state_dict())
    assert rebuilt.config == module.config
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
        assert torch.equal(rebuilt.to_dense().weight, module.to_dense().weight)


def check_fit(layer, module, method):
    """``module.fit``: the method, the measured weight error, and a certified bound that holds."""
    fit = module.fit
    assert fit is not None and fit.method == method and fit.error_kind in ("weight", "output")
    measured = float(torch.linalg.norm((layer.weight - module.dense_weight()).detach().double()))
    assert math.isclose(fit.weight_error, measured, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(fit.weight_norm, float(layer.weight.detach().double().norm()), rel_tol=1e-9)
    if fit.error_kind == "weight":
        assert fit.error is not None and fit.norm == fit.weight_norm
        assert fit.error <= measured * (1 + 1e-6) + 1e-9 * fit.norm and measured <= fit.error * (1 + 1e-6) + 1e-9
        if fit.error_bound is not None:
            assert measured <= fit.error_bound * (1 + 1e-6) + 1e-12


def check_contract(layer, build, x, method):
    """The whole contract of a factorized layer built by ``build(layer)`` (float64 ``layer`` and ``x``)."""
    snap = snapshot(layer)
    module = build(layer)
    assert_unchanged(layer, snap)
    check_forward_and_dense(layer, module, x)
    check_accounting(layer, module, x)
    check_fit(layer, module, method)
    assert module.extra_repr() and module.extra_repr() in repr(module)
    for dtype in (torch.float32, torch.float64):
        check_round_trip(module.to(dtype), x.to(dtype), dtype)
    module.double()
    saved = copy.deepcopy(module.state_dict())
    with torch.no_grad():  # the module does not share storage with the layer
        for p in module.parameters():
            p.zero_()
    assert_unchanged(layer, snap)
    module.load_state_dict(saved)
    return module


def check_dtype_kept(layer, build, x, dtype):
    """A module built from a ``dtype`` layer keeps dtype and device, and computes what its float64 copy does."""
    low = copy.deepcopy(layer).to(dtype)
    module = build(low)
    floats = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    for t in floats + list(module.to_dense().parameters()):
        assert t.dtype == dtype and t.device == layer.weight.device
    with torch.no_grad():
        y = module(x.to(dtype))
        assert y.dtype == dtype
        rel_close(y.double(), copy.deepcopy(module).double()(x.to(dtype).double()),
                  rel=0.05 if dtype == torch.bfloat16 else 1e-4)


def small_request(entry):
    """A rank spec every method of this kind of capability accepts on small layers (a registry ``MethodEntry``)."""
    for kind, value in (("rank", 2), ("ratio", 0.5), ("tol", 0.3), ("energy", 0.9)):
        if kind in entry.spec_kinds:
            return {kind: value}
    return {}


def registered_requests():
    """``[(method, kind, request)]`` for every registered method and every kind it builds (not refuses),
    with ``random_state=0`` where the method takes one."""
    from decomp_toolkit.layers import available_methods

    out = []
    for name, entry in sorted(available_methods().items()):
        seeded = {"random_state": 0} if "random_state" in entry.all_options() else {}
        out += [(name, kind, {**small_request(entry), **seeded}) for kind in entry.builders
                if kind not in entry.unsupported]
    return out

