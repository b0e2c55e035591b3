"""Parameter and FLOP accounting for dense and factorized layers.

FLOPs are counted as multiply–accumulates (MACs), the convention of the low-rank
papers (Kim et al. 2016, Zhang et al. 2016); bias additions are not counted.
Shapes: ``input_shape`` is ``(N, C, *spatial)`` or ``(C, *spatial)`` for convs and
``(..., in_features)`` for Linear (the product of the leading dims is the batch).
"""
from __future__ import annotations

import math

import torch.nn as nn

from .kinds import is_supported, standard_layer, standard_type

CONV_TYPES = tuple(standard_type(dim) for dim in (1, 2, 3))  # derived from the one table in layers.kinds


def conv_dims(conv) -> int:
    """Number of spatial dimensions of a conv module (1, 2 or 3)."""
    return len(conv.kernel_size)


def conv_output_spatial(spatial, kernel_size, stride, padding, dilation):
    """Output spatial size of a conv (torch's formula; 'same'/'valid' paddings included)."""
    if padding == "same":
        return tuple(spatial)
    if padding == "valid":
        padding = (0,) * len(spatial)
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(spatial, kernel_size, stride, padding, dilation))


def _split_batch(input_shape, channel_dims: int):
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == channel_dims:
        return 1, shape
    if len(shape) == channel_dims + 1:
        return shape[0], shape[1:]
    raise ValueError(f"input_shape {shape} should be (N, C, *spatial) or (C, *spatial) with "
                     f"{channel_dims - 1} spatial dims")


def conv_macs(conv, input_shape):
    """``(macs, output_shape)`` of one plain nn.ConvNd on ``input_shape``."""
    dims = conv_dims(conv)
    batch, (channels, *spatial) = _split_batch(input_shape, dims + 1)
    if channels != conv.in_channels:
        raise ValueError(f"input_shape {tuple(input_shape)} has {channels} channels, the conv expects "
                         f"{conv.in_channels}")
    out_spatial = conv_output_spatial(spatial, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    per_output = (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    macs = batch * conv.out_channels * math.prod(out_spatial) * per_output
    return macs, (batch, conv.out_channels, *out_spatial)


def conv_transpose_macs(conv, input_shape):
    """``(macs, output_shape)`` of one nn.ConvTransposeNd on ``input_shape`` (kept dense: every
    input entry is multiplied by the ``out_channels / groups`` x kernel weights it scatters to)."""
    dims = conv_dims(conv)
    batch, (channels, *spatial) = _split_batch(input_shape, dims + 1)
    if channels != conv.in_channels:
        raise ValueError(f"input_shape {tuple(input_shape)} has {channels} channels, the transposed conv "
                         f"expects {conv.in_channels}")
    out_spatial = tuple((size - 1) * s - 2 * p + d * (k - 1) + extra + 1 for size, k, s, p, d, extra in
                        zip(spatial, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.output_padding))
    per_input = (conv.out_channels // conv.groups) * math.prod(conv.kernel_size)
    macs = batch * conv.in_channels * math.prod(spatial) * per_input
    return macs, (batch, conv.out_channels, *out_spatial)


def linear_macs(linear, input_shape):
    """``(macs, output_shape)`` of one nn.Linear on ``input_shape`` (..., in_features)."""
    shape = tuple(int(d) for d in input_shape)
    if not shape or shape[-1] != linear.in_features:
        raise ValueError(f"input_shape {shape} should end with in_features={linear.in_features}")
    rows = math.prod(shape[:-1])
    return rows * linear.in_features * linear.out_features, shape[:-1] + (linear.out_features,)


def layer_macs(module, input_shape):
    """``(macs, output_shape)`` of a dense Linear/ConvNd/ConvTransposeNd or of any factorized layer."""
    if hasattr(module, "flops_and_shape"):
        return module.flops_and_shape(input_shape)
    if isinstance(module, nn.Linear):
        return linear_macs(module, input_shape)
    if isinstance(module, CONV_TYPES):
        return conv_macs(module, input_shape)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return conv_transpose_macs(module, input_shape)
    if is_supported(module):  # a registered layer kind: count its dense equivalent
        return layer_macs(standard_layer(module), input_shape)
    raise TypeError(f"no FLOP formula for {type(module).__name__}")


def count_params(module) -> int:
    """Number of parameters (weights and biases) of a module."""
    return sum(p.numel() for p in module.parameters())
