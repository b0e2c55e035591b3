"""Checks every adapter runs before touching a layer, with messages that name it."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ._accounting import CONV_TYPES

TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def layer_label(layer, name=None) -> str:
    """``"name (Conv2d, weight (64, 32, 3, 3))"`` for error messages."""
    weight = getattr(layer, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and not _is_uninitialized(weight) else "?"
    prefix = f"{name} " if name else ""
    return f"{prefix}({type(layer).__name__}, weight {shape})"


def _is_uninitialized(tensor) -> bool:
    return isinstance(tensor, nn.parameter.UninitializedParameter)


def _base_type(layer):
    for base in (nn.Linear,) + CONV_TYPES:
        if isinstance(layer, base):
            return base
    return None


def layer_kind(layer, name=None):
    """``"linear"`` or the conv's number of spatial dims (1/2/3), after validating ``layer``.

    Raises TypeError for non-modules, unsupported module types, transposed convs,
    subclasses that override forward, parametrized layers; ValueError for
    uninitialized (lazy) layers and NaN/Inf weights.
    """
    label = layer_label(layer, name)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"expected an nn.Module layer, got {type(layer).__name__}")
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        raise ValueError(f"{label}: lazy layer is not initialized yet; run one forward pass first")
    if isinstance(layer, TRANSPOSED_TYPES):
        raise TypeError(f"{label}: transposed convolutions are not supported; "
                        f"only nn.Linear and nn.Conv1d/2d/3d can be decomposed")
    base = _base_type(layer)
    if base is None:
        raise TypeError(f"{label}: unsupported module type; only nn.Linear and nn.Conv1d/2d/3d "
                        f"(and subclasses that keep their forward) can be decomposed")
    for method in ("forward", "_conv_forward"):
        if hasattr(base, method) and getattr(type(layer), method) is not getattr(base, method):
            raise TypeError(f"{label}: {type(layer).__name__} overrides {method}() of {base.__name__}; "
                            f"a factorized layer could not reproduce it")
    if parametrize.is_parametrized(layer):
        raise TypeError(f"{label}: parametrized layers (e.g. weight_norm/spectral_norm) are not supported; "
                        f"remove the parametrization first")
    if not torch.isfinite(layer.weight).all():
        raise ValueError(f"{label}: weight contains NaN or Inf entries")
    if layer.bias is not None and not torch.isfinite(layer.bias).all():
        raise ValueError(f"{label}: bias contains NaN or Inf entries")
    return "linear" if base is nn.Linear else len(layer.kernel_size)


def conv_config(conv) -> dict:
    """Constructor keywords of a dense conv (without bias), plus ``dim``."""
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels,
                kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
                padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                dilation=tuple(conv.dilation), groups=conv.groups, padding_mode=conv.padding_mode,
                dim=len(conv.kernel_size))


def linear_config(linear) -> dict:
    """Constructor keywords of a dense Linear (without bias)."""
    return dict(in_features=linear.in_features, out_features=linear.out_features)
