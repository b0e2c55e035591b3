"""Structured-matrix Linear layers with FFT forwards: methods ``"toeplitz"``, ``"circulant"``, ``"ldr"``.

* ``ToeplitzLinear``   ``W ~= T``, ``T[i, j] = diagonals[i - j + in - 1]`` (out + in - 1 numbers);
                       forward: T embedded in a circulant of size ``L >= out + in - 1``,
                       one rfft/irfft pair, O(L log L) per row.
* ``CirculantLinear``  ``W ~=`` top-left ``(out, in)`` corner of a grid of ``b x b``
                       circulant blocks (default one block, ``b = max(in, out)``: Cheng et
                       al. 2015); forward per block row by FFT, O((out/b)(in/b) b log b).
* ``LDRLinear``        Toeplitz-like displacement rank r (Sindhwani et al. 2015):
                       ``M = 1/2 sum_i Z_1(g_i) Z_{-1}(J h_i)`` of size ``N = max(in, out)``,
                       ``W ~= M[:out, :in]``; forward as r products of a skew-circulant and
                       a circulant by FFT, O(r N log N) per row.

The projections and their error reports are in :mod:`decomp.structured` (exact
residuals for Toeplitz/circulant; for LDR a ``tol=`` bounds the displacement, not the
weight, see there). Convolutions are not supported: these methods are registered for
Linear only, and ``decompose(conv, method="toeplitz")`` says so (use ``"svd"``, ``"pq"`` ...).

FLOPs (``flops(shape)``) are estimates in real multiply–accumulates: a length-L complex
FFT counts ``2 L log2 L``, a real FFT ``L log2 L``, a complex product 4 real MACs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from decomp_toolkit.decomp import circulant, ldr, toeplitz
from decomp_toolkit.decomp.formats.structured import (circulant_apply, circulant_index, fft_size, ldr_apply,
                                                      ldr_dense, toeplitz_apply, toeplitz_index)

from .base import FactorizedLayer
from .fit import spec_kwargs, weight_fit
from .kinds import linear_config
from .registry import register


LOW_PRECISION = (torch.float16, torch.bfloat16)


def _rows_of(input_shape, in_features):
    shape = tuple(int(d) for d in input_shape)
    if not shape or shape[-1] != in_features:
        raise ValueError(f"input_shape {shape} should end with in_features={in_features}")
    return math.prod(shape[:-1]), shape[:-1]


def _rfft_macs(L):
    return int(L * math.log2(max(L, 2)))


def _fft_macs(L):
    return int(2 * L * math.log2(max(L, 2)))


class _StructuredLinear(FactorizedLayer):
    def _init_common(self, in_features, out_features, bias, device, dtype):
        self.dense_config = dict(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _finish(self, x, y, lead):
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def _fft_ready(*tensors):
        """The tensors in a dtype torch.fft accepts: half/bfloat16 are computed in float32."""
        return [t.float() if t.dtype in LOW_PRECISION else t for t in tensors]

    def _attach(self, factors, linear, **diagnostics):
        if linear.bias is not None:
            self.bias.copy_(linear.bias)
        self.fit = weight_fit([factors], **diagnostics)
        return self.train(linear.training)


class ToeplitzLinear(_StructuredLinear):
    """``y = T x + b`` with a Toeplitz ``T`` (``diagonals`` parameter), FFT forward."""

    rank = None
    CONFIG = ()

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self._init_common(in_features, out_features, bias, device, dtype)
        self.diagonals = nn.Parameter(torch.zeros(in_features + out_features - 1, device=device, dtype=dtype))

    @classmethod
    def from_dense(cls, linear, *, context=""):
        factors = toeplitz(linear.weight, context=context)
        module = cls(**linear_config(linear), bias=linear.bias is not None, device=linear.weight.device,
                     dtype=linear.weight.dtype)
        module.diagonals.copy_(torch.as_tensor(factors.diagonals))
        return module._attach(factors, linear)

    def forward(self, x):
        lead = x.shape[:-1]
        diagonals, rows = self._fft_ready(self.diagonals, x.reshape(-1, self.in_features))
        y = toeplitz_apply(diagonals, rows, self.out_features, self.in_features)
        return self._finish(x, y, lead)

    def dense_weight(self):
        return self.diagonals[toeplitz_index(self.out_features, self.in_features, device=self.diagonals.device)]

    def flops_and_shape(self, input_shape):
        rows, lead = _rows_of(input_shape, self.in_features)
        L = fft_size(self.in_features + self.out_features - 1)
        per_row = 2 * _rfft_macs(L) + 4 * (L // 2 + 1)      # rfft(x), irfft(y), spectrum product
        return rows * per_row, lead + (self.out_features,)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CirculantLinear(_StructuredLinear):
    """``y = C x + b`` with a (block-)circulant ``C`` (``blocks`` parameter (n_out, n_in, b)), FFT forward."""

    rank = None
    CONFIG = ("block_size",)

    def __init__(self, in_features, out_features, block_size=None, bias=True, device=None, dtype=None):
        super().__init__()
        self._init_common(in_features, out_features, bias, device, dtype)
        b = max(in_features, out_features) if block_size is None else int(block_size)
        self.block_size = b
        self.blocks = nn.Parameter(torch.zeros(-(-out_features // b), -(-in_features // b), b, device=device,
                                               dtype=dtype))

    @classmethod
    def from_dense(cls, linear, *, block_size=None, context=""):
        factors = circulant(linear.weight, block_size=block_size, context=context)
        module = cls(**linear_config(linear), block_size=factors.block_size, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.blocks.copy_(torch.as_tensor(factors.blocks))
        return module._attach(factors, linear)

    def forward(self, x):
        lead = x.shape[:-1]
        blocks, rows = self._fft_ready(self.blocks, x.reshape(-1, self.in_features))
        y = circulant_apply(blocks, rows, self.out_features)
        return self._finish(x, y, lead)

    def dense_weight(self):
        index = circulant_index(self.out_features, self.in_features, self.block_size, device=self.blocks.device)
        return self.blocks.reshape(-1)[index]

    def flops_and_shape(self, input_shape):
        rows, lead = _rows_of(input_shape, self.in_features)
        n_out, n_in, b = self.blocks.shape
        per_row = (n_in + n_out) * _rfft_macs(b) + 4 * n_out * n_in * (b // 2 + 1)
        return rows * per_row, lead + (self.out_features,)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"bias={self.bias is not None}")


class LDRLinear(_StructuredLinear):
    """``y = M[:out, :in] x + b``, M of displacement rank ``rank`` (generators ``G, H (rank, N)``)."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self._init_common(in_features, out_features, bias, device, dtype)
        self.rank = int(rank)
        self.size = max(in_features, out_features)
        self.G = nn.Parameter(torch.zeros(self.rank, self.size, device=device, dtype=dtype))
        self.H = nn.Parameter(torch.zeros(self.rank, self.size, device=device, dtype=dtype))

    @classmethod
    def from_dense(cls, linear, spec, *, context=""):
        factors = ldr(linear.weight, **spec_kwargs(spec), context=context)
        module = cls(**linear_config(linear), rank=factors.rank, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.G.copy_(torch.as_tensor(factors.G))
        module.H.copy_(torch.as_tensor(factors.H))
        return module._attach(factors, linear, displacement_error=factors.displacement_error,
                              operator_bound=factors.operator_bound)

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.size != self.in_features:
            x = nn.functional.pad(x, (0, self.size - self.in_features))
        G, H, rows = self._fft_ready(self.G, self.H, x)
        y = ldr_apply(G, H, rows)[:, :self.out_features]
        return self._finish(x, y, lead)

    def dense_weight(self):
        G, H = self._fft_ready(self.G, self.H)
        return ldr_dense(G, H, n_cols=self.in_features)[:self.out_features].to(self.G.dtype)

    def flops_and_shape(self, input_shape):
        rows, lead = _rows_of(input_shape, self.in_features)
        N, r = self.size, self.rank
        per_row = (r + 1) * _fft_macs(N) + r * _rfft_macs(N) + _rfft_macs(N) + 4 * r * N + 4 * r * (N // 2 + 1)
        return rows * per_row, lead + (self.out_features,)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


PROJECTION = dict(spec_kinds=(), spec_required=False,
                  spec_refusal="method={method!r} is a projection with no rank to choose, so {given} does not apply; "
                               "call it without a rank specification{extra}, or use method='ldr' with rank=")


@register("toeplitz", ["linear"], "nearest Toeplitz matrix, FFT forward (Sindhwani et al. 2015)",
          **dict(PROJECTION, spec_refusal=PROJECTION["spec_refusal"].format(method="toeplitz", given="{given}",
                                                                            extra="")))
def _toeplitz_linear(layer, spec, *, context):
    return ToeplitzLinear.from_dense(layer, context=context)


@register("circulant", ["linear"], "nearest (block-)circulant matrix, FFT forward (Cheng et al. 2015)",
          **dict(PROJECTION, spec_refusal=PROJECTION["spec_refusal"].format(
              method="circulant", given="{given}", extra="; pass block_size= for block-circulant")))
def _circulant_linear(layer, spec, *, context, block_size=None):
    """Options:
        block_size: size b of the circulant blocks (default: one block of max(in, out))
    """
    return CirculantLinear.from_dense(layer, block_size=block_size, context=context)


@register("ldr", ["linear"], "Toeplitz-like low displacement rank, FFT forward (Sindhwani et al. 2015)",
          spec_kinds=("rank", "energy", "ratio"),
          spec_refusal="{kind} is not supported by method='ldr': its tol= would bound the displacement, not the "
                       "weight error, so it certifies nothing about the layer; pass rank=, energy= or ratio=, or use "
                       "a method whose tol= is certified ('svd', 'tucker', 'tt')")
def _ldr_linear(layer, spec, *, context):
    return LDRLinear.from_dense(layer, spec, context=context)


__all__ = ["ToeplitzLinear", "CirculantLinear", "LDRLinear"]
