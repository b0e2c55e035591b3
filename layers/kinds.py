"""The layer kinds the toolkit can factorize: one table, and the way to add a kind.

Every method registers builders per *kind key*: ``"linear"`` (a weight ``(out, in)``
applied as ``x @ W^T + b``) or ``1``/``2``/``3`` (an ``nn.ConvNd`` weight
``(out, in/groups, *kernel)``). A module type belongs to a kind through this table:
``nn.Linear`` and ``nn.Conv1d/2d/3d`` (and their subclasses that keep their forward) are
built in; another type is added with :func:`register_layer_kind`, e.g. transformers'
``Conv1D`` (weight stored ``(in, out)``, forward ``x @ W + b``)::

    register_layer_kind(Conv1D, kind="linear", weight=lambda m: m.weight.T)

``weight(module)`` reads the weight as ``(out, in[, *kernel])``; ``dense(module)`` returns the
plain ``nn.Linear`` / ``nn.ConvNd`` computing the same function (its weight may be a view
of the module's, it is never modified; for a ``"linear"`` kind it defaults to an
``nn.Linear`` viewing ``weight(module)`` and ``module.bias``). Every
method, ``compress``, ``calibrate`` and the FLOP counters then treat the module as that
layer, and the factorized module replaces it with the same call signature.
Transposed convolutions are listed but are not a conv kind: :mod:`layers.transposed`
factorizes them through the conv they are the adjoint of (``decompose`` and ``compress``,
from their weights); the data-aware paths report them with :data:`TRANSPOSED_REASON`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from decomp_toolkit.decomp._backend import all_finite

STANDARD_TYPES = {"linear": nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL = {"linear": F.linear, 1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
KIND_KEYS = tuple(STANDARD_TYPES)


@dataclass(frozen=True)
class LayerKind:
    """One row of the table: a module type and how the methods read it.

    ``key``: the builder key (``"linear"`` or 1/2/3); ``name``: shown in messages;
    ``dense``: module -> equivalent ``nn.Linear``/``nn.ConvNd`` (None: the module is one);
    ``unsupported``: the reason no method can factorize it (None: supported).
    """

    module_type: type
    key: object
    name: str
    dense: Callable | None = None
    unsupported: str | None = None

    @property
    def standard_type(self) -> type:
        return STANDARD_TYPES[self.key]


_KINDS: dict[type, LayerKind] = {}


def register_layer_kind(module_type: type, *, kind=None, name: str | None = None, weight: Callable | None = None,
                        dense: Callable | None = None, unsupported: str | None = None) -> LayerKind:
    """Add ``module_type`` to the table (see the module docstring); returns its row.

    ``kind``: ``"linear"`` or 1/2/3, the builders that apply (default: that of the standard
    type ``module_type`` subclasses). ``weight(module)``: the weight as ``(out, in[, *k])``;
    ``dense(module)``: the equivalent plain layer. A type that does not subclass its standard
    type needs ``dense=`` (or, for ``kind="linear"``, ``weight=``).
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_layer_kind: module_type must be an nn.Module subclass, got {module_type!r}")
    if kind is None:
        kind = next((k for k, t in STANDARD_TYPES.items() if issubclass(module_type, t)), None)
    if kind not in STANDARD_TYPES:
        raise ValueError(f"register_layer_kind: kind={kind!r} is not one of {KIND_KEYS}")
    if dense is None and weight is not None:
        if kind != "linear":
            raise TypeError("register_layer_kind: a conv kind needs dense=fn(module) -> the equivalent nn.ConvNd "
                            "(its options cannot be read off a weight)")
        dense = _linear_from(weight)
    if dense is None and unsupported is None and not issubclass(module_type, STANDARD_TYPES[kind]):
        raise TypeError(f"register_layer_kind: {module_type.__name__} is not a {STANDARD_TYPES[kind].__name__}; "
                        f"pass dense=fn(module) -> the equivalent {STANDARD_TYPES[kind].__name__} (or weight=)")
    row = LayerKind(module_type, kind, name or module_type.__name__, dense, unsupported)
    _KINDS[module_type] = row
    return row


for _key, _type in STANDARD_TYPES.items():
    register_layer_kind(_type, kind=_key)
TRANSPOSED_REASON = ("transposed convolutions have no data-aware fit (calibrate, compress_sequential); decompose() and "
                     "compress() factorize them from their weights (layers.transposed)")
for _dim, _type in ((1, nn.ConvTranspose1d), (2, nn.ConvTranspose2d), (3, nn.ConvTranspose3d)):
    register_layer_kind(_type, kind=_dim, unsupported=TRANSPOSED_REASON)


# (module, class, register_layer_kind keywords) of optional packages, added once their module is imported
OPTIONAL_KINDS = (
    ("transformers.pytorch_utils", "Conv1D", dict(kind="linear", weight=lambda m: m.weight.T)),   # GPT-2: x @ W + b
    # Falcon's Linear subclass: its forward is x @ W^T + b, that of nn.Linear
    ("transformers.models.falcon.modeling_falcon", "FalconLinear", dict(kind="linear", weight=lambda m: m.weight)),
)


def register_optional_kinds() -> None:
    """Add the kinds of :data:`OPTIONAL_KINDS` whose module is imported (transformers' ``Conv1D``, Falcon's
    ``FalconLinear``), each once; a type the user registered keeps its row."""
    import sys
    for module_name, class_name, options in OPTIONAL_KINDS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and cls not in _KINDS:
            register_layer_kind(cls, name=class_name, **options)


def kind_of(module) -> LayerKind | None:
    """The table row of ``module``'s type (the nearest registered base class), or None."""
    register_optional_kinds()
    for cls in type(module).__mro__:
        if cls in _KINDS:
            return _KINDS[cls]
    return None


def candidate_types() -> tuple:
    """Every module type in the table (unsupported ones included)."""
    return tuple(_KINDS)


def is_candidate(module) -> bool:
    """True for a module ``compress`` looks at (a factorizable kind, or a listed unsupported one)."""
    return kind_of(module) is not None


def _unfactorizable_reason(module) -> str:
    if isinstance(module, nn.RNNBase):
        return "recurrent weights: no factorized recurrent layer"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "an embedding table: a lookup, not a product to factorize"
    if isinstance(module, nn.MultiheadAttention):
        return "its packed in_proj_weight, read by its fused forward"
    return "raw parameters its own forward uses, not a Linear / ConvNd"


def unfactorizable_weights(model) -> list:
    """``(name, type name, parameter count, reason)`` for every module of ``model`` holding >= 2-D parameters
    outside any layer ``compress`` looks at (LSTMs, embeddings, nn.MultiheadAttention's in-projection,
    fused expert tensors, positional tables ...), largest first; a parameter shared with a candidate
    layer (a tied embedding) is not counted."""
    covered = {id(p) for m in model.modules() if is_candidate(m) for p in m.parameters()}
    rows, seen = [], set(covered)
    for name, module in model.named_modules():
        if is_candidate(module):
            continue
        own = [p for p in module.parameters(recurse=False) if p.dim() >= 2 and id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            rows.append((name or "(model)", type(module).__name__, sum(p.numel() for p in own),
                         _unfactorizable_reason(module)))
    return sorted(rows, key=lambda row: -row[2])


def unfactorizable_note(model, shown=8) -> str | None:
    """A report line naming the weights no method factorizes (:func:`unfactorizable_weights`), or None."""
    rows = unfactorizable_weights(model)
    if not rows:
        return None
    total = sum(p.numel() for p in model.parameters())
    held = sum(row[2] for row in rows)
    listed = "; ".join(f"{name} {kind} {count:,} ({why})" for name, kind, count, why in rows[:shown])
    more = f"; and {len(rows) - shown} more modules" if len(rows) > shown else ""
    return (f"not factorizable, kept as they are: {held:,} parameters ({held / max(total, 1):.1%} of the model) "
            f"in {listed}{more}")


def is_supported(module) -> bool:
    row = kind_of(module)
    return row is not None and row.unsupported is None


def registered_kind(module) -> LayerKind | None:
    """The row of a non-built-in kind added with :func:`register_layer_kind` (None for built-ins and others)."""
    row = kind_of(module)
    return row if row is not None and row.dense is not None else None


def registered_kinds() -> dict:
    """``{name: LayerKind}`` of the kinds added with :func:`register_layer_kind` beyond the built-ins."""
    return {row.name: row for row in _KINDS.values() if row.dense is not None}


def check_dense_equivalent(module, dense, label="") -> None:
    """Raise ValueError unless ``dense`` computes ``module``'s function on a small random input."""
    if isinstance(dense, nn.Linear):
        x = torch.randn(2, dense.in_features, dtype=dense.weight.dtype, device=dense.weight.device)
    else:
        spatial = [max(8, d * (k - 1) + 1) for k, d in zip(dense.kernel_size, dense.dilation)]
        x = torch.randn(1, dense.in_channels, *spatial, dtype=dense.weight.dtype, device=dense.weight.device)
    with torch.no_grad():
        expected, got = module(x), dense(x)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{label}: the dense equivalent registered for {type(module).__name__} does not compute "
                         f"the module's function; fix the dense=/weight= given to register_layer_kind")


def legacy_reparametrization(module):
    """The legacy ``weight_norm``/``spectral_norm`` forward pre-hook of ``module`` (None when it has none)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))), None)


def effective_weight(module) -> torch.Tensor:
    """``module``'s weight with its parametrizations or legacy ``weight_norm``/``spectral_norm`` hook applied, as its
    eval-mode forward uses it (spectral norm without a power iteration)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    legacy = legacy_reparametrization(module)
    if isinstance(legacy, SpectralNorm):
        return legacy.compute_weight(module, do_power_iteration=False)
    return legacy.compute_weight(module) if legacy is not None else module.weight


PLAIN_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def without_reparametrization(module):
    """``module`` itself, or, for a Linear / ConvNd / ConvTransposeNd with a ``torch.nn.utils.parametrize``
    parametrization or a legacy ``weight_norm`` / ``spectral_norm`` hook, a plain layer of its base type holding its
    effective weight (:func:`plain_copy`; what its eval-mode forward computes). ``module`` is not modified."""
    if not isinstance(module, PLAIN_TYPES):
        return module
    if not (parametrize.is_parametrized(module) or legacy_reparametrization(module) is not None):
        return module
    return plain_copy(module, next(t for t in PLAIN_TYPES if isinstance(module, t)))


def plain_copy(module, base_type):
    """A plain ``base_type`` layer (a Linear, ConvNd or ConvTransposeNd) holding ``module``'s effective weight and bias
    (:func:`effective_weight`)."""
    with torch.no_grad():
        weight = effective_weight(module).detach().clone()
        bias = module.bias.detach().clone() if module.bias is not None else None
    if base_type is nn.Linear:
        return linear_view(weight, bias)
    cfg = transposed_config(module) if isinstance(module, nn.modules.conv._ConvTransposeNd) else conv_config(module)
    cfg.pop("dim")
    conv = base_type(**cfg, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def standard_layer(module):
    """The plain ``nn.Linear``/``nn.ConvNd`` that computes what ``module`` computes (``module`` itself if it is one)."""
    row = kind_of(module)
    if row is None or row.dense is None:
        return module
    return row.dense(module)


def standard_type(key) -> type:
    """``nn.Linear`` / ``nn.Conv1d/2d/3d`` for a kind key."""
    return STANDARD_TYPES[key]


def functional(key) -> Callable:
    """``F.linear`` / ``F.conv1d/2d/3d`` for a kind key."""
    return FUNCTIONAL[key]


def kind_name(key) -> str:
    return STANDARD_TYPES[key].__name__


def _linear_from(weight):
    def dense(module):
        return linear_view(weight(module), getattr(module, "bias", None))
    return dense


def linear_view(weight, bias=None) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are ``weight (out, in)`` and ``bias`` (views, not copies)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
    return layer


# --------------------------------------------------------------------------- validation

def layer_label(layer, name=None) -> str:
    """``"name (Conv2d, weight (64, 32, 3, 3))"`` for error messages."""
    weight = getattr(layer, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and not _is_uninitialized(weight) else "?"
    prefix = f"{name} " if name else ""
    return f"{prefix}({type(layer).__name__}, weight {shape})"


def _is_uninitialized(tensor) -> bool:
    return isinstance(tensor, nn.parameter.UninitializedParameter)


def _check_module(layer, row, label):
    if not isinstance(layer, nn.Module):
        raise TypeError(f"expected an nn.Module layer, got {type(layer).__name__}")
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(f"{label}: lazy layer is not initialized yet; run one forward pass first")
    if row is None:
        raise TypeError(f"{label}: unsupported module type; only nn.Linear and nn.Conv1d/2d/3d "
                        f"(and subclasses that keep their forward, or kinds added with register_layer_kind) "
                        f"can be decomposed")
    if row.unsupported is not None:
        raise TypeError(f"{label}: {row.unsupported}; only nn.Linear and nn.Conv1d/2d/3d can be decomposed")
    base = row.module_type
    for method in ("forward", "_conv_forward"):
        if hasattr(base, method) and getattr(type(layer), method) is not getattr(base, method):
            raise TypeError(f"{label}: {type(layer).__name__} overrides {method}() of {base.__name__}; "
                            f"a factorized layer could not reproduce it")
    if parametrize.is_parametrized(layer):
        raise TypeError(f"{label}: parametrized layers (e.g. weight_norm/spectral_norm) are not supported; "
                        f"remove the parametrization first")


def layer_kind(layer, name=None):
    """The kind key (``"linear"`` or 1/2/3) of ``layer``, after validating it.

    Raises TypeError for non-modules, module types not in the table, transposed convs,
    subclasses that override forward, parametrized layers; ValueError for uninitialized
    (lazy) layers and NaN/Inf weights.
    """
    label = layer_label(layer, name)
    row = kind_of(layer) if isinstance(layer, nn.Module) else None
    _check_module(layer, row, label)
    standard = standard_layer(layer)
    if standard.weight.is_meta:
        raise ValueError(f"{label}: weight is on the meta device (it holds no values); load the weights first")
    if not all_finite(standard.weight):
        raise ValueError(f"{label}: weight contains NaN or Inf entries")
    if standard.bias is not None and not all_finite(standard.bias):
        raise ValueError(f"{label}: bias contains NaN or Inf entries")
    return row.key


# --------------------------------------------------------------------------- dense configs

def conv_config(conv) -> dict:
    """Constructor keywords of a dense conv (without bias), plus ``dim``."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
                padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                dilation=tuple(conv.dilation), groups=conv.groups, padding_mode=conv.padding_mode,
                dim=len(conv.kernel_size))


def transposed_config(conv) -> dict:
    """Constructor keywords of a dense transposed conv (without bias), plus ``dim``."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=tuple(conv.kernel_size),
                stride=tuple(conv.stride), padding=tuple(conv.padding), output_padding=tuple(conv.output_padding),
                groups=conv.groups, dilation=tuple(conv.dilation), dim=len(conv.kernel_size))


def linear_config(linear) -> dict:
    """Constructor keywords of a dense Linear (without bias)."""
    return dict(in_features=linear.in_features, out_features=linear.out_features)


def dense_config(layer) -> dict:
    """``linear_config`` or ``conv_config`` of a standard layer."""
    return linear_config(layer) if isinstance(layer, nn.Linear) else conv_config(layer)


def conv_padding(padding, kernel_size, dilation) -> list:
    """``[(left, right)]`` per spatial dim of a conv's ``padding`` (int/tuple, 'valid', 'same')."""
    dims = len(kernel_size)
    if padding == "valid":
        return [(0, 0)] * dims
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    return [(p, p) for p in padding]


def pad_input(x, padding, kernel_size, dilation, padding_mode="zeros"):
    """``x`` padded as a conv with these options pads it, so a padding-free conv follows."""
    flat = [v for pair in reversed(conv_padding(padding, kernel_size, dilation)) for v in pair]
    if not any(flat):
        return x
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, flat, mode=mode)


def pad_like(conv, x):
    """``x`` padded as ``conv`` pads it (its padding_mode), so a padding-free conv follows."""
    return pad_input(x, conv.padding, conv.kernel_size, conv.dilation, conv.padding_mode)


__all__ = ["LayerKind", "register_layer_kind", "kind_of", "candidate_types", "is_candidate", "is_supported",
           "standard_layer", "standard_type", "functional", "kind_name", "linear_view", "layer_label", "layer_kind",
           "conv_config", "linear_config", "dense_config", "conv_padding", "pad_input", "pad_like", "registered_kind",
           "registered_kinds", "check_dense_equivalent", "legacy_reparametrization", "plain_copy",
           "unfactorizable_weights", "unfactorizable_note", "transposed_config", "effective_weight"]
