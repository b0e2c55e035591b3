"""Low-rank (truncated SVD) layers: method ``"svd"``.

* ``LowRankLinear``        W (out, in) ~= U (out, k) @ V (k, in): two matmuls, bias on the second.
* ``LowRankConv``          channel scheme (Zhang et al. 2016): a k x k conv C -> g*r (carries
                           stride, padding, padding_mode, dilation, groups) then a 1x1 conv
                           g*r -> N with the bias; per group the (N/g, C/g*k*k) matrix is
                           truncated at the shared rank r. Conv1d/2d/3d.
* ``SpatialLowRankConv``   spatial scheme (Jaderberg et al. 2014, scheme 2), Conv2d only:
                           a kh x 1 conv C -> g*K then a 1 x kw conv g*K -> N; per group the
                           matrix M[(c, y), (n, x)] = W[n, c, y, x] is truncated at rank K.

Guarantee: ``||W - to_dense().weight||_F`` equals the Eckart–Young optimum for the
rank (exact algorithm): ``fit.error_bound`` (certified) equals ``fit.error`` (measured).

Data-aware (``gram=X^T X`` of the layer's inputs, or ``calibration=`` from
:func:`layers.calibrate`; SVD-LLM whitening, :func:`decomp.whitened_svd`): Linear and the
channel scheme truncate the whitened matrix instead, which minimizes the OUTPUT error
``||(W - W')X^T||_F`` on the calibration data; then ``fit.error_kind = "output"``,
``fit.error_bound`` is that certified output error, ``fit.error`` the one measured a
posteriori, ``fit.norm = ||W X^T||_F`` (``fit.weight_error``/``fit.weight_norm`` give the
weight error) and ``fit.diagnostics`` has ``whitening`` and ``jitter``. With ``input_mean=``
(``gram`` then being the centered covariance; what ``calibration=`` passes with
``center=True`` for layers with a bias) the bias is corrected by ``(W - W') mean``, so the
certified error is the whole output error on the calibration data and the truncation is
not spent on the mean. The spatial scheme refuses ``gram=``: its output error couples the
kw columns of each patch (the Gram of a patch is not ``I_kw ⊗ G_(c,y)``), so no whitening
of the (c, y) rows turns it into a plain truncated SVD with a certified optimum; use
scheme="channel".
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from decomp_toolkit.decomp import SVDFactors, svd
from decomp_toolkit.decomp.whitened import WhitenedSVDFactors, whitened_svd, whitening_factor

from .base import FactorizedChain
from .budget import BudgetProfile
from .data_aware import copy_bias, output_fit
from .errors import UnsupportedLayerError
from .fit import check_factors, spec_kwargs, weight_fit
from .kinds import conv_config, dense_config, linear_config, standard_type
from .registry import register, register_budget_profile, register_from_factors

ALGORITHMS = ("exact", "randomized")


def _factorize(matrix, spec, *, context, algorithm, random_state, gram=None, whitening="cholesky"):
    """Truncated SVD of ``matrix`` (g, m, n) in float64; returns balanced factors A, B and the factors.

    With ``gram`` ((n, n) or (g, n, n)) the data-aware whitened SVD is used instead.
    """
    if gram is not None:
        if algorithm != "exact":
            raise ValueError(f"{context}: the data-aware (gram=) SVD has only the exact algorithm; "
                             f"drop algorithm={algorithm!r}")
        factors = whitened_svd(matrix, gram, **spec_kwargs(spec), whitening=whitening, context=context)
    else:
        factors = svd(matrix, **spec_kwargs(spec), algorithm=algorithm, random_state=random_state,
                      context=context)
    A, B = factors.balanced_factors()
    return A, B, factors


def _fit_of(factors):
    if isinstance(factors, WhitenedSVDFactors):  # data-aware: errors on the outputs
        return output_fit(error=factors.error, error_bound=factors.error_bound, norm=factors.norm,
                          weight_error=factors.weight_error, weight_norm=factors.weight_norm,
                          whitening=factors.whitening, jitter=factors.jitter)
    return weight_fit([factors])


class _LowRank(FactorizedChain):
    """Shared construction of the three SVD layers: truncate ``weight_matrix(layer)``, load ``A``, ``B``."""

    @classmethod
    def check_layer(cls, layer, gram, context):
        """Raise UnsupportedLayerError when this scheme cannot factorize ``layer``."""

    @classmethod
    def from_dense(cls, layer, spec, *, context="", algorithm="exact", random_state=None, gram=None,
                   input_mean=None, whitening="cholesky"):
        """The factorized layer of ``layer`` for RankSpec ``spec`` (see the module docstring)."""
        cls.check_layer(layer, gram, context)
        matrix = cls.weight_matrix(layer)
        A, B, factors = _factorize(matrix, spec, context=context, algorithm=algorithm, random_state=random_state,
                                   gram=gram, whitening=whitening)
        return cls._built(layer, matrix, A, B, factors, input_mean, context)

    @classmethod
    def _built(cls, layer, matrix, A, B, factors, input_mean, context):
        module = cls(**dense_config(layer), rank=factors.rank, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)
        module.load_factors(A, B)
        if layer.bias is not None:
            copy_bias(module.bias, layer.bias, matrix, A @ B, input_mean, context)
        module.fit = _fit_of(factors)
        return module

    @classmethod
    def from_factors(cls, layer, factors, *, context=""):
        """The layer from an SVD of ``weight_matrix(layer)`` computed elsewhere (``(m, n)`` or ``(g, m, n)``)."""
        cls.check_layer(layer, None, context)
        matrix = cls.weight_matrix(layer)
        check_factors(factors, SVDFactors, [matrix.shape] + ([matrix.shape[1:]] if matrix.shape[0] == 1 else []),
                      context)
        A, B = (t.reshape(matrix.shape[0], *t.shape[-2:]) for t in factors.balanced_factors())
        return cls._built(layer, matrix, torch.as_tensor(A), torch.as_tensor(B), factors, None, context)


class LowRankLinear(_LowRank):
    """``y = U (V x) + b``: ``reduce`` Linear(in, rank), ``expand`` Linear(rank, out, bias)."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.dense_config = dict(in_features=in_features, out_features=out_features)
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.reduce = nn.Linear(in_features, rank, bias=False, **kw)
        self.expand = nn.Linear(rank, out_features, bias=bias, **kw)

    @staticmethod
    def weight_matrix(linear):
        """The (1, out, in) matrix the SVD truncates."""
        return linear.weight[None]

    def load_factors(self, A, B):
        self.reduce.weight.copy_(B[0])
        self.expand.weight.copy_(A[0])

    def dense_weight(self):
        return self.expand.weight @ self.reduce.weight


class LowRankConv(_LowRank):
    """Channel scheme: ``reduce`` k x k conv C -> groups*rank, ``expand`` 1x1 conv -> N (bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        conv = standard_type(dim)
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.reduce = conv(in_channels, groups * rank, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode, **kw)
        self.expand = conv(groups * rank, out_channels, 1, groups=groups, bias=bias, **kw)
        self.dense_config = conv_config(self.reduce) | dict(out_channels=out_channels)

    @classmethod
    def check_layer(cls, conv, gram, context):
        if conv.groups > 1 and conv.in_channels // conv.groups == 1:
            raise UnsupportedLayerError(context, "every filter of this depthwise conv sees a single input "
                                                 "channel, so the channel scheme has nothing to factorize; use "
                                                 "scheme='spatial' (Conv2d) or leave the layer dense")

    @staticmethod
    def weight_matrix(conv):
        """Per group, the (N/g, C/g * prod(kernel)) matrix the SVD truncates: (g, N/g, C/g*k...)."""
        return conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)

    def load_factors(self, A, B):
        self.reduce.weight.copy_(B.reshape(self.reduce.weight.shape))
        self.expand.weight.copy_(A.reshape(self.expand.weight.shape))

    def dense_weight(self):
        cfg = self.dense_config
        g, N, r = cfg["groups"], cfg["out_channels"], self.rank
        A = self.expand.weight.reshape(g, N // g, r)
        B = self.reduce.weight.reshape(g, r, -1)
        return (A @ B).reshape(N, cfg["in_channels"] // g, *cfg["kernel_size"])

    def extra_repr(self):
        return f"scheme='channel', rank={self.rank}"


def _split_padding(padding, axis):
    """Padding for a separable stage acting along ``axis`` (0 = height, 1 = width)."""
    if isinstance(padding, str):
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


def _along(values, axis, other=1):
    return (values[0], other) if axis == 0 else (other, values[1])


class SpatialLowRankConv(_LowRank):
    """Spatial scheme (Conv2d): ``vertical`` kh x 1 conv C -> groups*rank, ``horizontal`` 1 x kw -> N."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        if dim != 2:
            raise ValueError(f"the spatial scheme needs a Conv2d, got a Conv{dim}d")
        probe = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, padding_mode=padding_mode, device="meta")
        self.dense_config = conv_config(probe)
        self.rank = rank
        k, s, d, p = probe.kernel_size, probe.stride, probe.dilation, self.dense_config["padding"]
        kw = dict(groups=groups, padding_mode=padding_mode, device=device, dtype=dtype)
        self.vertical = nn.Conv2d(in_channels, groups * rank, _along(k, 0), stride=_along(s, 0),
                                  padding=_split_padding(p, 0), dilation=_along(d, 0), bias=False, **kw)
        self.horizontal = nn.Conv2d(groups * rank, out_channels, _along(k, 1), stride=_along(s, 1),
                                    padding=_split_padding(p, 1), dilation=_along(d, 1), bias=bias, **kw)

    @classmethod
    def check_layer(cls, conv, gram, context):
        if len(conv.kernel_size) != 2:
            raise UnsupportedLayerError(context, "scheme='spatial' applies to Conv2d only; use scheme='channel'")
        if gram is not None:
            raise UnsupportedLayerError(context, "data-aware decomposition (gram=/calibration=) supports the "
                                                 "channel scheme only: the spatial scheme's output error couples "
                                                 "the kernel columns of each patch, so no whitening gives a "
                                                 "certified optimum; use scheme='channel'")

    @staticmethod
    def weight_matrix(conv):
        """W (N, C/g, kh, kw) -> M (g, C/g*kh, N/g*kw) with M[(c, y), (n, x)] = W[n, c, y, x]."""
        weight, groups = conv.weight, conv.groups
        N, c, kh, kw = weight.shape
        return weight.reshape(groups, N // groups, c, kh, kw).permute(0, 2, 3, 1, 4).reshape(
            groups, c * kh, (N // groups) * kw)

    def load_factors(self, A, B):
        cfg = self.dense_config
        g, N, K, (kh, kw) = cfg["groups"], cfg["out_channels"], self.rank, cfg["kernel_size"]
        self.vertical.weight.copy_(A.transpose(1, 2).reshape(g * K, -1, kh, 1))
        self.horizontal.weight.copy_(B.reshape(g, K, N // g, kw).permute(0, 2, 1, 3).reshape(N, K, 1, kw))

    def dense_weight(self):
        cfg = self.dense_config
        g, N, K = cfg["groups"], cfg["out_channels"], self.rank
        c, (kh, kw) = cfg["in_channels"] // g, cfg["kernel_size"]
        A = self.vertical.weight.reshape(g, K, c * kh).transpose(1, 2)
        B = self.horizontal.weight.reshape(g, N // g, K, kw).permute(0, 2, 1, 3).reshape(g, K, -1)
        M = (A @ B).reshape(g, c, kh, N // g, kw)
        return M.permute(0, 3, 1, 2, 4).reshape(N, c, kh, kw)

    def extra_repr(self):
        return f"scheme='spatial', rank={self.rank}"


SCHEMES = {"channel": LowRankConv, "spatial": SpatialLowRankConv}
SVD_SPECS = dict(spec_kinds=("rank", "energy", "tol", "ratio", "vbmf"), data_aware=True)


def _check_choice(name, value, choices, context):
    if value not in choices:
        raise ValueError(f"{context}: {name}={value!r} is not one of {tuple(choices)}")


@register("svd", ["linear"], "truncated SVD: two matmuls (Denton et al. 2014)", **SVD_SPECS)
def _svd_linear(layer, spec, *, context, algorithm="exact", random_state=None, whitening="cholesky", gram=None,
                input_mean=None):
    """Options:
        algorithm: "exact" (LAPACK SVD, default) or "randomized" (Halko et al. sketch)
        random_state: seed (int or torch.Generator) of the randomized algorithm
        whitening: data-aware fits: "cholesky" (SVD-LLM, default) or "eigh" square root of the Gram
    """
    _check_choice("algorithm", algorithm, ALGORITHMS, context)
    return LowRankLinear.from_dense(layer, spec, context=context, algorithm=algorithm, random_state=random_state,
                                    whitening=whitening, gram=gram, input_mean=input_mean)


@register("svd", [1, 2, 3], "truncated SVD: channel (Zhang 2016) or spatial (Jaderberg 2014) scheme", **SVD_SPECS,
          conv_chain=True)
def _svd_conv(layer, spec, *, context, scheme="channel", algorithm="exact", random_state=None,
              whitening="cholesky", gram=None, input_mean=None):
    """Options:
        scheme: convs: "channel" (k x k conv then 1x1, default) or "spatial" (kh x 1 then 1 x kw, Conv2d)
    """
    _check_choice("algorithm", algorithm, ALGORITHMS, context)
    _check_choice("scheme", scheme, sorted(SCHEMES), context)
    return SCHEMES[scheme].from_dense(layer, spec, context=context, algorithm=algorithm, random_state=random_state,
                                      whitening=whitening, gram=gram, input_mean=input_mean)


@register_from_factors("svd", ["linear", 1, 2, 3])
def _svd_from_factors(layer, factors, *, context):
    cls = LowRankLinear if isinstance(layer, nn.Linear) else LowRankConv
    return cls.from_factors(layer, factors, context=context)


@register_budget_profile("svd")
def svd_budget_profile(layer, *, scheme="channel", gram=None, fisher=None, **_options):
    """Energies (squared singular values summed over groups) and a meta-device builder.

    With ``gram`` (the layer's calibration Gram / covariance, as passed to the builder) the
    energies are those of the OUTPUT spectrum ``s_i(W L)`` that the data-aware SVD truncates.
    With ``fisher`` too (the layer's ``(out,)`` output Fisher, :mod:`layers.fisher`) and a
    factorization whose rows are output channels (Linear, the ``channel`` conv scheme), they
    are the estimated loss increases of the components (objective ``"loss"``, comparable
    across layers); otherwise ``fisher`` is ignored and the objective stays ``"energy"``.
    """
    from .fisher import fisher_weighted_spectrum

    cls = LowRankLinear if isinstance(layer, nn.Linear) else SCHEMES[scheme]
    matrix = cls.weight_matrix(layer).detach().double()
    if gram is not None:
        G = torch.as_tensor(gram, dtype=torch.float64, device=matrix.device)
        matrix = matrix @ whitening_factor(G.expand(matrix.shape[0], *G.shape[-2:]))[0]
    config = linear_config(layer) if cls is LowRankLinear else conv_config(layer)
    bias = layer.bias is not None

    def build(ranks):
        return cls(**config, rank=ranks[0], bias=bias, device="meta")
    if fisher is not None and gram is not None and cls in (LowRankLinear, LowRankConv):
        return BudgetProfile([fisher_weighted_spectrum(matrix, fisher).numpy()], build, objective="loss")
    spectrum = torch.linalg.svdvals(matrix)
    return BudgetProfile([np.square(spectrum.cpu().numpy()).sum(axis=0)], build)


__all__ = ["LowRankLinear", "LowRankConv", "SpatialLowRankConv", "svd_budget_profile"]
