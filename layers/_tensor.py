"""Shared plumbing of the tensor-method layers (tucker, cp, tt, btd): conv probes, checks, reports."""
from __future__ import annotations

import math

from ._validate import conv_config
from .base import DENSE_TYPES


def conv_type(dim):
    return DENSE_TYPES[dim]


def probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, dim):
    """``conv_config`` of the dense conv these options describe (built on the meta device)."""
    probe = conv_type(dim)(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, padding_mode=padding_mode, device="meta")
    return conv_config(probe)


def refuse_depthwise(conv, context, method):
    """Depthwise convs (one input channel per group) have no channel mode to factorize."""
    if conv.groups > 1 and conv.in_channels // conv.groups == 1:
        raise ValueError(f"{context}: this depthwise conv (groups={conv.groups}) has one input channel per "
                         f"filter, so method={method!r} has nothing to factorize (its channel modes have size 1); "
                         f"leave it dense (or use method='svd', scheme='spatial' for its k x k kernel)")


def group_kernels(conv):
    """Per-group kernels ``(g, N/g, C/g, *k)`` as float64 (the decompositions' compute dtype)."""
    g = conv.groups
    w = conv.weight.detach()
    return w.reshape(g, conv.out_channels // g, *w.shape[1:])


def combine_bounds(bounds, norms):
    """Group results -> one (error_bound, weight_norm): root sums of squares (None if any bound is None)."""
    norm = math.sqrt(sum(float(n) ** 2 for n in norms))
    if any(b is None for b in bounds):
        return None, norm
    return math.sqrt(sum(float(b) ** 2 for b in bounds)), norm


def attach_report(module, bound, norm):
    module.error_bound = bound
    module.weight_norm = norm
    return module


class SelectableForward:
    """Mixin for layers with several equivalent forward implementations.

    ``implementation`` picks one (validated against the class's ``IMPLEMENTATION_CHOICES``);
    ``optimize="speed"`` (:mod:`layers.speed`) times those in ``implementations``.
    """

    IMPLEMENTATION_CHOICES: tuple = ()

    @property
    def implementation(self):
        return self._implementation

    @implementation.setter
    def implementation(self, value):
        if value not in self.IMPLEMENTATION_CHOICES:
            raise ValueError(f"implementation={value!r} is not one of {self.IMPLEMENTATION_CHOICES}")
        self._implementation = value
