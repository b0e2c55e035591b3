"""Transposed convolutions (``nn.ConvTranspose1d/2d/3d``) factorized by any method whose conv layer is a chain.

A transposed conv with weight ``W (C_in, C_out/g, *k)``, stride, padding, dilation and
groups computes the adjoint of the conv ``A = Conv(C_out -> C_in)`` that has the same weight
and options (torch defines it as that conv's gradient with respect to its input);
``output_padding`` only adds rows that conv ignores. So a factorization of ``A`` into a
chain of convs ``A ~= s_n ∘ ... ∘ s_1`` (method ``"svd"``, both schemes, ``"tucker"``,
``"btd"``) gives the transposed conv's factorization ``s_1^T ∘ ... ∘ s_n^T``:

* ``TransposedChain`` holds the factorized ``adjoint`` (the chain of ``A``, no bias) and the
  transposed conv's ``bias``; its forward runs the stages in reverse order as transposed
  convs (1x1 stride-1 stages as plain 1x1 convs with the transposed weight, which is the
  same map and faster), the stride, padding, dilation and output padding of each spatial
  axis on the one stage that carries that axis' kernel. ``forward(x, output_size=)`` works
  as for ``nn.ConvTranspose2d``.
* ``to_dense()`` is an ``nn.ConvTransposeNd`` whose weight is ``adjoint.dense_weight()``
  (the same ``(C_in, C_out/g, *k)`` layout), so every error, bound and rank of the method
  (``fit``) is that of the transposed conv's weight. MACs: each stage's adjoint costs what
  the stage costs, ``C_in * C_out/g * prod(k)`` per input pixel for the dense layer.

Weight-only: a calibration Gram of the transposed conv's inputs does not whiten ``A``'s
rows in this layout, so ``gram=`` / ``calibration=`` are refused by :func:`decompose_transposed`
(``compress(calibration=)`` decomposes transposed convs from their weights and says so).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from decomp_toolkit.decomp._backend import all_finite

from ._accounting import conv_transpose_macs
from .base import FactorizedChain, FactorizedLayer
from .errors import UnsupportedLayerError
from .kinds import STANDARD_TYPES, layer_label, legacy_reparametrization, transposed_config
from .speed import SPEED_OPTIONS, optimize_for_speed

TRANSPOSED_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
TRANSPOSED_FUNCTIONAL = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
CONV_FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
DATA_AWARE_KEYS = ("gram", "input_mean", "calibration", "center")


def is_transposed(module) -> bool:
    """True for an ``nn.ConvTranspose1d/2d/3d`` (or a subclass)."""
    return isinstance(module, nn.modules.conv._ConvTransposeNd)


def adjoint_conv(conv) -> nn.Module:
    """The ``nn.ConvNd`` (``C_out -> C_in``, no bias) whose adjoint is ``conv`` (a transposed conv): its weight is
    ``conv.weight`` itself (a view, never modified) with the same stride, padding, dilation and groups."""
    cfg = transposed_config(conv)
    adjoint = STANDARD_TYPES[cfg["dim"]](cfg["out_channels"], cfg["in_channels"], cfg["kernel_size"],
                                         stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
                                         groups=cfg["groups"], bias=False, device="meta")
    adjoint.weight = nn.Parameter(conv.weight.detach(), requires_grad=conv.weight.requires_grad)
    return adjoint


def check_transposed(conv, label) -> None:
    """Raise TypeError/ValueError unless ``conv`` is a plain, initialized transposed conv with finite weights."""
    base = next(t for t in TRANSPOSED_TYPES.values() if isinstance(conv, t))
    if type(conv).forward is not base.forward:
        raise TypeError(f"{label}: {type(conv).__name__} overrides forward() of {base.__name__}; a factorized "
                        f"layer could not reproduce it")
    if parametrize.is_parametrized(conv) or legacy_reparametrization(conv) is not None:
        raise TypeError(f"{label}: parametrized layers (e.g. weight_norm/spectral_norm) are not supported; "
                        f"remove the parametrization first")
    if conv.padding_mode != "zeros":
        raise ValueError(f"{label}: padding_mode={conv.padding_mode!r}; transposed convs support only 'zeros'")
    if conv.weight.is_meta:
        raise ValueError(f"{label}: weight is on the meta device (it holds no values); load the weights first")
    for name in ("weight", "bias"):
        tensor = getattr(conv, name)
        if tensor is not None and not all_finite(tensor):
            raise ValueError(f"{label}: {name} contains NaN or Inf entries")


def _stage_carriers(stages, cfg, where) -> list:
    """Per spatial axis, the index (in forward order of the adjoint) of the one stage that carries the axis'
    kernel, stride, padding and dilation; the other stages must act pointwise along it."""
    carriers = []
    for axis in range(cfg["dim"]):
        moving = [i for i, s in enumerate(stages) if (s.kernel_size[axis], s.stride[axis], s.padding[axis]) != (1, 1, 0)]
        if len(moving) > 1:
            raise UnsupportedLayerError(where, f"the factorized chain has {len(moving)} stages with a kernel, stride "
                                               f"or padding along spatial axis {axis}, so its transpose cannot be "
                                               f"formed stage by stage")
        carriers.append(moving[0] if moving else None)
    return carriers


class TransposedChain(FactorizedLayer):
    """A transposed conv as the reversed transposes of ``adjoint`` (a factorized conv chain, module docstring)."""

    CONFIG = ("adjoint_class", "adjoint_config")

    def __init__(self, in_channels, out_channels, kernel_size, adjoint_class, adjoint_config, stride=1, padding=0,
                 output_padding=0, groups=1, dilation=1, bias=True, padding_mode="zeros", dim=2, rank=None,
                 device=None, dtype=None):
        """``adjoint_class`` (name or class) and ``adjoint_config`` build the adjoint chain; ``rank`` (optional)
        replaces its rank (a random-weight twin at another rank, as ``optimize='speed'`` times)."""
        super().__init__()
        if rank is not None:
            adjoint_config = dict(adjoint_config, rank=rank)
        probe = TRANSPOSED_TYPES[dim](in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      output_padding=output_padding, groups=groups, dilation=dilation,
                                      padding_mode=padding_mode, device="meta")
        self.dense_config = dict(transposed_config(probe), padding_mode="zeros")
        self.adjoint_class, self.adjoint_config = adjoint_class, dict(adjoint_config)
        self.adjoint = _adjoint_class(adjoint_class)(**self.adjoint_config, device=device, dtype=dtype)
        self._check_adjoint()
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype))
                                if bias else None)

    def _check_adjoint(self):
        cfg, stages = self.dense_config, self.stages()
        if any(type(s) is not STANDARD_TYPES[cfg["dim"]] or s.padding_mode != "zeros" for s in stages):
            raise UnsupportedLayerError("", f"{type(self.adjoint).__name__} is not a chain of plain zero-padded "
                                            f"Conv{cfg['dim']}d stages, so it has no transposed form")
        if stages[0].in_channels != cfg["out_channels"] or stages[-1].out_channels != cfg["in_channels"]:
            raise ValueError(f"TransposedChain: the adjoint maps {stages[0].in_channels} -> "
                             f"{stages[-1].out_channels} channels, the transposed conv {cfg['in_channels']} -> "
                             f"{cfg['out_channels']}")
        if any(s.bias is not None for s in stages):
            raise ValueError("TransposedChain: the adjoint chain must have no bias (the transposed conv's bias "
                             "is added after its last stage)")
        self._carriers = _stage_carriers(stages, cfg, type(self.adjoint).__name__)

    @property
    def rank(self):
        return self.adjoint.rank

    def stages(self) -> list:
        """The adjoint chain's convs, in its forward order (this layer runs them reversed)."""
        return list(self.adjoint.children())

    @property
    def dense_type(self) -> type:
        return TRANSPOSED_TYPES[self.dense_config["dim"]]

    def _dense_kwargs(self) -> dict:
        return {k: v for k, v in self.dense_config.items() if k != "dim"}

    def dense_weight(self):
        """``(C_in, C_out/g, *k)``: the transposed conv's weight layout, that of the adjoint conv."""
        return self.adjoint.dense_weight()

    def _output_paddings(self, x, output_size):
        """Per stage (adjoint order), the output padding of its transpose; and per spatial axis the rows to append
        after the last stage along an axis no stage moves on (a pointwise axis: only the bias reaches them)."""
        cfg = self.dense_config
        total = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, list(cfg["stride"]), list(cfg["padding"]), list(cfg["kernel_size"]), cfg["dim"],
            list(cfg["dilation"]))
        paddings, tail = [[0] * cfg["dim"] for _ in self.stages()], [0] * cfg["dim"]
        for axis, carrier in enumerate(self._carriers):
            if carrier is None:
                tail[axis] = int(total[axis])
            else:
                paddings[carrier][axis] = int(total[axis])
        return paddings, tail

    def forward(self, input, output_size=None):
        x, stages = input, self.stages()
        paddings, tail = self._output_paddings(input, output_size)
        for position, (stage, padding) in enumerate(zip(reversed(stages), reversed(paddings))):
            last = position == len(stages) - 1 and not any(tail)
            x = _transposed_stage(stage, x, padding, self.bias if last else None)
        if any(tail):
            x = F.pad(x, [v for rows in reversed(tail) for v in (0, rows)])
            if self.bias is not None:
                x = x + self.bias.view(-1, *([1] * len(tail)))
        return x

    def flops_and_shape(self, input_shape):
        cfg, total, shape = self.dense_config, 0, tuple(input_shape)
        paddings = [[0] * cfg["dim"] for _ in self.stages()]
        for axis, carrier in enumerate(self._carriers):
            if carrier is not None:
                paddings[carrier][axis] = cfg["output_padding"][axis]
        for stage, padding in zip(reversed(self.stages()), reversed(paddings)):
            macs, shape = conv_transpose_macs(_TransposedView(stage, padding), shape)
            total += macs
        spatial = [n + (cfg["output_padding"][axis] if self._carriers[axis] is None else 0)
                   for axis, n in enumerate(shape[-cfg["dim"]:])]
        return total, (*shape[:-cfg["dim"]], *spatial)

    def reset_parameters(self):
        self.adjoint.reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self):
        return f"adjoint={self.adjoint_class}, rank={self.rank}"


class _TransposedView:
    """The options of a stage's transpose, as :func:`layers._accounting.conv_transpose_macs` reads them."""

    def __init__(self, stage, output_padding):
        self.in_channels, self.out_channels = stage.out_channels, stage.in_channels
        self.kernel_size, self.stride, self.padding = stage.kernel_size, stage.stride, stage.padding
        self.dilation, self.groups, self.output_padding = stage.dilation, stage.groups, tuple(output_padding)


def _transposed_stage(stage, x, output_padding, bias):
    """``stage^T x``: a 1x1 stride-1 stage as the 1x1 conv with the transposed weight; a stage whose kernel equals
    its stride (no padding, dilation or groups: a U-Net's 2x2 stride-2 upsampler) as one matmul and a
    depth-to-space reshape (:func:`_patch_transpose`, the same sums; oneDNN's transposed conv runs it at a few
    GMAC/s when it has few input channels); any other as a transposed conv with the stage's options."""
    dims, kernel = len(stage.kernel_size), tuple(stage.kernel_size)
    if any(output_padding) or stage.padding != (0,) * dims:
        return TRANSPOSED_FUNCTIONAL[dims](x, stage.weight, bias, stage.stride, stage.padding, tuple(output_padding),
                                           stage.groups, stage.dilation)
    if kernel == (1,) * dims and stage.stride == kernel:
        g, weight = stage.groups, stage.weight
        out_g, in_g = weight.shape[0] // g, weight.shape[1]
        flipped = weight.reshape(g, out_g, in_g, *kernel).transpose(1, 2).reshape(g * in_g, out_g, *kernel)
        return CONV_FUNCTIONAL[dims](x, flipped, bias, 1, 0, 1, g)
    if stage.stride == kernel and stage.dilation == (1,) * dims and stage.groups == 1 and x.dim() == dims + 2:
        return _patch_transpose(x, stage.weight, bias)
    return TRANSPOSED_FUNCTIONAL[dims](x, stage.weight, bias, stage.stride, stage.padding, tuple(output_padding),
                                       stage.groups, stage.dilation)


def _patch_transpose(x, weight, bias):
    """``conv_transpose(x, weight, bias, stride=kernel)`` for ``x (B, C, *S)`` and ``weight (C, C_out, *k)``: each
    input pixel writes its own ``k`` patch, so it is ``weight.reshape(C, C_out * prod(k))^T @ x.reshape(B, C, -1)``
    (one batched matmul, the bias added in it) put in place."""
    batch, channels, *spatial = x.shape
    out_channels, kernel, dims = weight.shape[1], tuple(weight.shape[2:]), len(spatial)
    columns = x.reshape(batch, channels, -1)
    rows = weight.reshape(channels, -1).t().expand(batch, -1, -1)
    if bias is None:
        y = torch.bmm(rows, columns)
    else:
        repeated = bias.repeat_interleave(math.prod(kernel)).view(1, -1, 1).expand(batch, -1, columns.shape[-1])
        y = torch.baddbmm(repeated, rows, columns)
    y = y.view(batch, out_channels, *kernel, *spatial)
    order = [0, 1] + [axis for i in range(dims) for axis in (2 + dims + i, 2 + i)]
    return y.permute(order).reshape(batch, out_channels, *(n * k for n, k in zip(spatial, kernel)))


def _adjoint_class(name) -> type:
    from .serialize import _class_named
    if isinstance(name, type):
        return name
    return _class_named(name, None, "TransposedChain")


def chain_methods() -> list:
    """The registered methods whose conv layers are chains of convs (``conv_chain=True``): those that factorize
    transposed convs."""
    from .registry import available_methods
    return sorted(name for name, entry in available_methods().items() if entry.conv_chain)


def _not_a_chain(why) -> str:
    return f"{why}: no transposed form; methods that factorize transposed convs: {', '.join(chain_methods())}"


def wrap_adjoint(conv, chain) -> TransposedChain:
    """The :class:`TransposedChain` of the transposed ``conv`` from ``chain``, a factorized layer of
    :func:`adjoint_conv`\\ ``(conv)`` (its weights are copied, ``conv``'s bias is taken, ``chain.fit`` kept)."""
    if not isinstance(chain, FactorizedChain):
        raise UnsupportedLayerError("", _not_a_chain(f"the method builds a {type(chain).__name__}, which is not a chain of convs"))
    weight = conv.weight
    module = TransposedChain(**transposed_config(conv), adjoint_class=type(chain).__name__,
                             adjoint_config=chain.config, bias=conv.bias is not None, device=weight.device,
                             dtype=weight.dtype)
    with torch.no_grad():
        module.adjoint.load_state_dict(chain.state_dict())
        if conv.bias is not None:
            module.bias.copy_(conv.bias)
    module.fit = chain.fit
    return module


def decompose_transposed(conv, decompose_conv, method, spec, name=None, **options):
    """``decompose`` of a transposed conv: ``decompose_conv(adjoint_conv(conv), method, **spec, **options)`` wrapped
    by :func:`wrap_adjoint`; ``optimize='speed'`` times the wrapped layer against ``conv`` (ranks the kernels like,
    :mod:`layers.speed`). Refuses the data-aware options (module docstring)."""
    from .registry import available_methods
    label = layer_label(conv, name)
    check_transposed(conv, label)
    entry = available_methods().get(method)
    if entry is not None and not entry.conv_chain:
        reason = _not_a_chain("its conv layers are not chains of plain convs")
        raise UnsupportedLayerError(label, f"method={method!r}: {reason}", f"{label} with method={method!r}: {reason}")
    given = [k for k in DATA_AWARE_KEYS if options.get(k) is not None]
    if given:
        raise ValueError(f"{label}: {', '.join(k + '=' for k in given)} is not supported for transposed convs (a "
                         f"Gram of their inputs does not whiten the adjoint's rows); decompose them from their "
                         f"weights (drop {', '.join(k + '=' for k in given)})")
    speed = {k: options.pop(k) for k in SPEED_OPTIONS if k in options}
    options = {k: v for k, v in options.items() if k not in DATA_AWARE_KEYS}
    adjoint = adjoint_conv(conv)

    def build(rank_spec):
        chain = decompose_conv(adjoint, method, name=f"{label}, as its adjoint conv", **rank_spec, **options)
        try:
            return wrap_adjoint(conv, chain)
        except UnsupportedLayerError as err:
            raise UnsupportedLayerError(label, f"method={method!r}: {err.reason}",
                                        f"{label} with method={method!r}: {err.reason}") from None
    return optimize_for_speed(build(spec), conv, **speed, context=label, rebuild=lambda rank: build(dict(rank=rank)))


def transposed_budget_profile(profile_of, conv, **options):
    """The budget profile of a transposed ``conv``: ``profile_of`` (a method's profile function) of its adjoint conv,
    whose meta-device builder is wrapped so costs (parameters with the bias, MACs on the transposed conv's input
    shape) are those of the :class:`TransposedChain`."""
    profile = profile_of(adjoint_conv(conv), **{k: v for k, v in options.items() if k not in DATA_AWARE_KEYS})
    build, config, bias = profile.build, transposed_config(conv), conv.bias is not None

    def wrapped(ranks):
        chain = build(ranks)
        return TransposedChain(**config, adjoint_class=type(chain), adjoint_config=chain.config, bias=bias,
                               device="meta")
    profile.build = wrapped
    return profile


def budget_profile_of(entry, layer, **options):
    """``entry.budget_profile(layer, **options)``, through :func:`transposed_budget_profile` for a transposed conv."""
    if is_transposed(layer):
        return transposed_budget_profile(entry.budget_profile, layer, **options)
    return entry.budget_profile(layer, **options)


__all__ = ["TransposedChain", "is_transposed", "adjoint_conv", "transposed_config", "wrap_adjoint",
           "decompose_transposed", "transposed_budget_profile", "budget_profile_of", "check_transposed", "chain_methods"]
