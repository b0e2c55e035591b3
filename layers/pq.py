"""Product-quantized layers: method ``"pq"`` (Gong et al. 2014, Wu et al. 2016, Stock et al. 2020).

* ``PQLinear``  Linear whose weight (out, in) is stored as codebooks + integer codes.
* ``PQConv``    Conv1d/2d/3d (all options: stride, padding incl. 'same'/'valid',
                padding_mode, dilation, groups, bias) stored the same way; sub-vectors are
                cut from ``weight.reshape(N, -1)`` (order channel, kernel: Stock et al.).

Storage: ``codebooks`` is an ``nn.Parameter (n_books, k, d)`` (so it can be fine-tuned),
``codes`` a buffer ``(rows, n_sub)`` of the smallest unsigned dtype; the state_dict holds
only these and the bias. ``size_bits`` counts codes at ``ceil(log2 k)`` bits, codebook
entries at ``codebook_bits`` (fp16 by default) and the bias at 32 bits. ``num_params``
counts stored numbers (codebook entries + codes + bias).

Forward. ``forward="decode"`` (default) rebuilds the dense weight from the codebooks
and runs the ordinary matmul/conv: in training mode the weight is decoded on every call
(gradients reach the codebooks); in eval mode it is decoded once and **cached** (a dense
copy of the weight, detached, so eval-mode forwards do not back-propagate into the
codebooks). The cache is dropped on ``train()``/``eval()``, ``load_state_dict``,
``.to()``/``.half()`` etc., whenever the codebooks or codes are modified in place (their
version counters are checked) or given new storage (``param.data = ...``, as
``torch.nn.utils.vector_to_parameters`` does), or by ``release_cache()``; an in-place edit
through ``param.data`` bypasses the version counter: call ``release_cache()`` after one.
Under ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` nothing is cached. ``forward="lut"`` (Linear
only, Q-CNN style) never builds the weight: per call it forms the table
``LUT[b, s, c] = <x_b[s-th block], codebook_c>`` and sums ``LUT[b, s, codes[o, s]]`` over
sub-spaces with one ``embedding_bag``; it is faster than a dense matmul only when the
output dimension is large compared with ``k`` (see benchmarks/bench_pq_structured.py).

The conv forward is the functional conv (:mod:`layers.kinds`) with the decoded weight and
the dense conv's options (non-zero padding modes padded explicitly, as ``nn.ConvNd`` does).

``fit.error`` is the measured weight error (no bound is certified: ``fit.error_bound`` is
None); ``fit.diagnostics["kmeans_history"]`` the k-means objective per step.

Data-aware (``gram=`` the input Gram, per group ``(g, P, P)`` on the im2col layout for convs,
or ``calibration=``, which ``compress(calibration=)`` passes; ``center=``/``input_mean=`` as
for ``svd``): Stock et al. 2020's objective. The plain PQ (same block size, k, codebook
layout; k chosen as without gram, also for ``tol=``) is refined by weighted k-means where
sub-space ``J`` is measured by ``G_JJ`` (:func:`decomp.data_aware.weighted_pq`); the plain
codebook is kept when the refinement does not lower the full output error on the
calibration statistics (``fit.diagnostics``: ``data_aware_fit`` ``"data-aware"``/``"plain"``,
``plain_output_error``, ``weighted_history``). Then ``fit.error_kind = "output"``,
``fit.error`` = the output error ``||(W - W')X^T||_F`` MEASURED on the given Gram,
``fit.norm = ||W X^T||_F``, ``fit.weight_error`` the weight error; with ``input_mean=`` the
bias is corrected by ``(W - W') mean``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from decomp_toolkit.decomp.data_aware import weighted_pq
from decomp_toolkit.decomp.formats.pq import CodeAccounting, pq_decode
from decomp_toolkit.decomp.pq import code_dtype, pq

from ._accounting import layer_macs
from .base import FactorizedLayer
from .data_aware import copy_bias, output_fit
from .errors import UnsupportedLayerError
from .fit import weight_fit
from .kinds import conv_config, functional, linear_config, pad_input, standard_type
from .registry import register

FORWARD_MODES = ("decode", "lut")


def _tracing() -> bool:
    """Whether ``torch.compile``, ``torch.export`` or ``torch.jit.trace`` is tracing this call."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class _PQLayer(CodeAccounting, FactorizedLayer):
    """Shared storage, decoding and cache of PQLinear / PQConv."""

    CONFIG = ("block_size", "n_centroids", "shared_codebook", "codebook_bits")

    def _init_storage(self, rows, row_length, block_size, n_centroids, shared_codebook, codebook_bits, bias,
                      device, dtype):
        self.rows, self.row_length = rows, row_length
        self.block_size, self.n_centroids = int(block_size), int(n_centroids)
        self.shared_codebook, self.codebook_bits = bool(shared_codebook), int(codebook_bits)
        n_sub = -(-row_length // block_size)
        n_books = 1 if shared_codebook else n_sub
        self.codebooks = nn.Parameter(torch.zeros(n_books, n_centroids, block_size, device=device, dtype=dtype))
        self.register_buffer("codes", torch.zeros(rows, n_sub, dtype=code_dtype(n_centroids), device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(rows, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._cache = None

    @property
    def num_params(self) -> int:
        """Stored numbers: codebook entries + codes + bias."""
        bias = self.bias.numel() if self.bias is not None else 0
        return self.codebooks.numel() + self.codes.numel() + bias

    @property
    def size_bits(self) -> int:
        bias = self.bias.numel() * 32 if self.bias is not None else 0
        return self.codes.numel() * self.code_bits + self.codebooks.numel() * self.codebook_bits + bias

    @property
    def compression_ratio(self) -> float:
        """fp32 size of the dense layer (weight + bias) / ``size_bits``."""
        return 32 * self.dense_params / self.size_bits

    def _load_factors(self, factors, bias):
        self.codebooks.copy_(torch.as_tensor(factors.codebooks))
        self.codes.copy_(torch.as_tensor(factors.codes).to(self.codes.dtype))
        if bias is not None:
            self.bias.copy_(bias)
        self.fit = weight_fit([factors], kmeans_history=list(factors.history))
        self.release_cache()

    def _data_aware(self, weight, groups, gram, input_mean, bias, n_iter, context):
        """Refine the loaded plain PQ for the output error on ``gram`` (decomp.data_aware.weighted_pq)."""
        if gram is None:
            return
        W = weight.detach().double().reshape(self.rows, self.row_length)
        padded = self.n_sub * self.block_size
        M = F.pad(W, (0, padded - self.row_length)) if padded > self.row_length else W
        refined = weighted_pq(M, gram, self.codebooks.detach(), self.codes.long(), self.block_size, groups=groups,
                              n_iter=n_iter, context=context)
        self.codebooks.copy_(torch.as_tensor(refined.codebooks).to(self.codebooks.dtype))
        self.codes.copy_(torch.as_tensor(refined.codes).to(self.codes.dtype))
        self.release_cache()
        approx = self.dense_weight().detach().double().reshape(W.shape)
        if bias is not None and input_mean is not None:
            g = groups
            copy_bias(self.bias, bias, W.reshape(g, self.rows // g, -1), approx.reshape(g, self.rows // g, -1),
                      input_mean, context)
        self.fit = output_fit(error=refined.error, norm=refined.norm, weight_error=float(torch.linalg.norm(W - approx)),
                              weight_norm=float(torch.linalg.norm(W)), data_aware_fit=refined.fit,
                              plain_output_error=refined.plain_error, weighted_history=list(refined.history),
                              kmeans_history=self.fit.diagnostics["kmeans_history"])

    def dense_weight(self) -> torch.Tensor:
        """The decoded weight (differentiable w.r.t. the codebooks), original shape."""
        return pq_decode(self.codebooks, self.codes, self.row_length).reshape(self.weight_shape)

    # -- cache -------------------------------------------------------------------------------
    def _cache_key(self):
        # identity, version counter and storage address of each tensor: an in-place update bumps the version, a
        # ``param.data = ...`` assignment (``vector_to_parameters``, optimizers' swaps) moves the storage
        return tuple((id(t), t._version, t.data_ptr()) for t in (self.codebooks, self.codes)) + (
            self.codebooks.dtype, self.codebooks.device)

    def release_cache(self):
        """Drop the cached decoded weight (it is rebuilt on the next eval-mode forward)."""
        self._cache = None

    def weight_for_forward(self) -> torch.Tensor:
        if self.training or _tracing():   # traced tensors have no storage; the decode is part of the graph
            return self.dense_weight()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.dense_weight())
        return self._cache[1]

    def train(self, mode: bool = True):
        self.release_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.release_cache()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.release_cache()
        return super()._load_from_state_dict(*args, **kwargs)

    def _storage_repr(self):
        books = "shared" if self.shared_codebook else "per sub-space"
        return (f"block_size={self.block_size}, n_centroids={self.n_centroids}, codebooks={books}, "
                f"code_bits={self.code_bits}, size_bytes={self.size_bytes:.0f}")


class PQLinear(_PQLayer):
    """Product-quantized ``nn.Linear`` (see module docstring for storage, cache and LUT forward)."""

    def __init__(self, in_features, out_features, block_size, n_centroids, shared_codebook=True, codebook_bits=16,
                 bias=True, forward="decode", device=None, dtype=None):
        super().__init__()
        if forward not in FORWARD_MODES:
            raise ValueError(f"forward={forward!r} is not one of {FORWARD_MODES}")
        self.dense_config = dict(in_features=in_features, out_features=out_features)
        self.weight_shape = (out_features, in_features)
        self.forward_mode = forward
        self._init_storage(out_features, in_features, block_size, n_centroids, shared_codebook, codebook_bits,
                           bias, device, dtype)

    @property
    def config(self):
        return dict(**super().config, forward=self.forward_mode)

    def forward(self, x):
        if self.forward_mode == "lut":
            return self.forward_lut(x)
        return F.linear(x, self.weight_for_forward(), self.bias)

    def _lut_index(self):
        """``(out, n_sub)`` flat indices ``s * k + codes[o, s]`` into the flattened LUT (cached)."""
        key = (id(self.codes), self.codes._version, self.codes.data_ptr(), self.codes.device)
        cached = getattr(self, "_lut_index_cache", None) if not _tracing() else None
        if cached is None or cached[0] != key:
            offsets = torch.arange(self.n_sub, device=self.codes.device) * self.n_centroids
            self._lut_index_cache = (key, self.codes.long() + offsets)
        return self._lut_index_cache[1]

    def forward_lut(self, x):
        """Q-CNN look-up-table forward: never materializes the weight."""
        lead, n = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, n)
        d, n_sub = self.block_size, self.n_sub
        if n_sub * d != n:
            x = F.pad(x, (0, n_sub * d - n))
        xs = x.reshape(-1, n_sub, d)
        C = self.codebooks
        if C.shape[0] == 1:
            lut = xs @ C[0].T                                    # (B, n_sub, k)
        else:
            lut = torch.einsum("bsd,skd->bsk", xs, C)
        table = lut.reshape(lut.shape[0], -1).T.contiguous()     # (n_sub * k, B)
        y = F.embedding_bag(self._lut_index(), table, mode="sum").T   # (B, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.rows)

    def flops_and_shape(self, input_shape):
        """MACs: decode mode = the dense matmul; LUT mode = table (n_sub k d) + gathers (out n_sub) per row."""
        dense = nn.Linear(**self.dense_config, device="meta")
        macs, shape = layer_macs(dense, input_shape)
        if self.forward_mode == "lut":
            rows = math.prod(tuple(input_shape)[:-1])
            macs = rows * (self.n_sub * self.n_centroids * self.block_size + self.rows * self.n_sub)
        return macs, shape

    def extra_repr(self):
        cfg = self.dense_config
        return (f"in_features={cfg['in_features']}, out_features={cfg['out_features']}, {self._storage_repr()}, "
                f"forward={self.forward_mode!r}, bias={self.bias is not None}")


class PQConv(_PQLayer):
    """Product-quantized ``nn.Conv1d/2d/3d`` (see module docstring); forward = decoded-weight conv."""

    def __init__(self, in_channels, out_channels, kernel_size, block_size, n_centroids, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", dim=2, shared_codebook=True,
                 codebook_bits=16, device=None, dtype=None):
        super().__init__()
        template = standard_type(dim)(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                      dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode,
                                      device="meta")
        self.dense_config = conv_config(template)
        self.weight_shape = tuple(template.weight.shape)
        self._init_storage(out_channels, math.prod(self.weight_shape[1:]), block_size, n_centroids,
                           shared_codebook, codebook_bits, bias, device, dtype)

    def forward(self, x):
        cfg = self.dense_config
        padding = cfg["padding"]
        if cfg["padding_mode"] != "zeros":  # as nn.ConvNd: pad with the mode, then a padding-free conv
            x = pad_input(x, padding, cfg["kernel_size"], cfg["dilation"], cfg["padding_mode"])
            padding = 0
        return functional(cfg["dim"])(x, self.weight_for_forward(), self.bias, cfg["stride"], padding,
                                      cfg["dilation"], cfg["groups"])

    def flops_and_shape(self, input_shape):
        """MACs of the decoded-weight conv (the same as the dense conv)."""
        return layer_macs(self.dense_type(**self._dense_kwargs(), device="meta"), input_shape)

    def extra_repr(self):
        cfg = self.dense_config
        return (f"{cfg['in_channels']}, {cfg['out_channels']}, kernel_size={cfg['kernel_size']}, "
                f"stride={cfg['stride']}, padding={cfg['padding']}, {self._storage_repr()}, "
                f"bias={self.bias is not None}")


def _build(cls, layer, spec, groups, *, context, block_size, n_centroids, bits, shared_codebook, pad,
           codebook_bits, n_iter, random_state, gram, input_mean, **extra):
    """Plain PQ of ``layer.weight`` (decomp.pq), refined for the output error when ``gram`` is given."""
    tol = spec.value if spec is not None else None
    factors = pq(layer.weight, n_centroids=n_centroids, block_size=block_size, bits=bits, tol=tol,
                 shared_codebook=shared_codebook, pad=pad, n_iter=n_iter, codebook_bits=codebook_bits,
                 random_state=random_state, context=context)
    config = linear_config(layer) if isinstance(layer, nn.Linear) else conv_config(layer)
    module = cls(**config, block_size=factors.block_size, n_centroids=factors.n_centroids,
                 shared_codebook=shared_codebook, codebook_bits=codebook_bits, bias=layer.bias is not None,
                 device=layer.weight.device, dtype=layer.weight.dtype, **extra)
    module._load_factors(factors, layer.bias)
    module._data_aware(layer.weight, groups, gram, input_mean, layer.bias, n_iter, context)
    return module.train(layer.training)


PQ_SPECS = dict(spec_kinds=("tol",), spec_required=False, data_aware=True,
                spec_refusal="{kind} is not a product-quantization parameter; pass bits= (code bits per weight), "
                             "n_centroids= (with block_size=) or tol= (relative Frobenius error of the weight)")


@register("pq", ["linear"], "product quantization: k-means on weight sub-vectors (Stock et al. 2020)", **PQ_SPECS)
def _pq_linear(layer, spec, *, context, block_size=None, n_centroids=None, bits=None, shared_codebook=True, pad=False,
               codebook_bits=16, n_iter=50, forward="decode", random_state=None, gram=None, input_mean=None):
    """Options:
        n_centroids: codewords per codebook (or give bits=, or tol=)
        block_size: length of the weight sub-vectors (default: chosen from the shape)
        bits: code bits per weight (picks block_size and n_centroids)
        shared_codebook: one codebook for all sub-spaces (default True) or one per sub-space
        pad: zero-pad rows whose length block_size does not divide
        codebook_bits: bits per stored codebook entry, for size_bits (default 16)
        n_iter: k-means steps at most (default 50)
        forward: Linear: "decode" (decoded weight, cached in eval mode) or "lut" (look-up tables)
        random_state: seed (int or torch.Generator) of the k-means++ initialization
    """
    if forward not in FORWARD_MODES:
        raise ValueError(f"{context}: forward={forward!r} is not one of {FORWARD_MODES}")
    return _build(PQLinear, layer, spec, 1, context=context, block_size=block_size, n_centroids=n_centroids, bits=bits,
                  shared_codebook=shared_codebook, pad=pad, codebook_bits=codebook_bits, n_iter=n_iter,
                  random_state=random_state, gram=gram, input_mean=input_mean, forward=forward)


@register("pq", [1, 2, 3], "product quantization: k-means on weight sub-vectors (Stock et al. 2020)", **PQ_SPECS)
def _pq_conv(layer, spec, *, context, block_size=None, n_centroids=None, bits=None, shared_codebook=True, pad=False,
             codebook_bits=16, n_iter=50, forward="decode", random_state=None, gram=None, input_mean=None):
    if forward not in FORWARD_MODES:
        raise ValueError(f"{context}: forward={forward!r} is not one of {FORWARD_MODES}")
    if forward != "decode":
        raise UnsupportedLayerError(context, f"forward={forward!r}: convolutions only support forward='decode' "
                                             f"(look-up tables are implemented for Linear layers)")
    return _build(PQConv, layer, spec, layer.groups, context=context, block_size=block_size, n_centroids=n_centroids,
                  bits=bits, shared_codebook=shared_codebook, pad=pad, codebook_bits=codebook_bits, n_iter=n_iter,
                  random_state=random_state, gram=gram, input_mean=input_mean)


__all__ = ["PQLinear", "PQConv"]
