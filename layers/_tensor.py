"""Shared plumbing of the tensor-method layers (tucker, cp, btd, tt): conv probes, checks, implementations."""
from __future__ import annotations

from .errors import UnsupportedLayerError
from .kinds import conv_config, standard_type


def probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, dim):
    """``conv_config`` of the dense conv these options describe (built on the meta device)."""
    probe = standard_type(dim)(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                               dilation=dilation, groups=groups, padding_mode=padding_mode, device="meta")
    return conv_config(probe)


def refuse_depthwise(conv, context, method):
    """Depthwise convs (one input channel per group) have no channel mode to factorize."""
    if conv.groups > 1 and conv.in_channels // conv.groups == 1:
        raise UnsupportedLayerError(context, f"this depthwise conv (groups={conv.groups}) has one input channel "
                                             f"per filter, so method={method!r} has nothing to factorize (its "
                                             f"channel modes have size 1); leave it dense (or use method='svd', "
                                             f"scheme='spatial' for its k x k kernel)")


def group_kernels(conv):
    """Per-group kernels ``(g, N/g, C/g, *k)``: a detached view of the weight, in the weight's own dtype."""
    g = conv.groups
    w = conv.weight.detach()
    return w.reshape(g, conv.out_channels // g, *w.shape[1:])


def pair_rank(rank):
    """``R`` -> ``(R, R)``; a pair stays a pair of ints."""
    return (int(rank), int(rank)) if isinstance(rank, int) else tuple(int(r) for r in rank)


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
