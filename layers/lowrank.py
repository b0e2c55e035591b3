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
rank (exact solver), reported by the SVD factors' ``error_bound``.

Data-aware (``gram=X^T X`` of the layer's inputs, or ``calibration=`` from
:func:`layers.calibrate`; SVD-LLM whitening, :func:`decomp.whitened_svd`): Linear and the
channel scheme truncate the whitened matrix instead, which minimizes the OUTPUT error
``||(W - W')X^T||_F`` on the calibration data; then ``error_bound`` is that certified
output error, ``output_norm = ||W X^T||_F``, ``error_kind = "output"`` (``weight_error``
and ``weight_norm`` give the weight error). With ``input_mean=`` (``gram`` then being the
centered covariance; what ``calibration=`` passes with ``center=True`` for layers with a
bias) the bias is corrected by ``(W - W') mean``, so the certified error is the whole
output error on the calibration data and the truncation is not spent on the mean. The spatial scheme refuses ``gram=``: its
output error couples the kw columns of each patch (the Gram of a patch is not
``I_kw ⊗ G_(c,y)``), so no whitening of the (c, y) rows turns it into a plain truncated
SVD with a certified optimum; use scheme="channel".
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn as nn

from decomp_toolkit.decomp import svd
from decomp_toolkit.decomp.whitened import WhitenedSVDFactors, whitened_svd

from ._validate import conv_config, linear_config
from .base import DENSE_TYPES, FactorizedChain
from .budget import BudgetProfile
from .registry import register, register_budget_profile

SOLVERS = ("exact", "randomized")


def _factorize(matrix, *, rank, energy, tol, ratio, context, solver, random_state, gram=None,
               whitening="cholesky"):
    """Truncated SVD of ``matrix`` (g, m, n) in float64; returns balanced factors A, B.

    With ``gram`` ((n, n) or (g, n, n)) the data-aware whitened SVD is used instead.
    """
    if gram is not None:
        if solver != "exact":
            raise ValueError(f"{context}: the data-aware (gram=) SVD has only the exact solver; "
                             f"drop solver={solver!r}")
        if not isinstance(gram, torch.Tensor):
            raise TypeError(f"{context}: gram= must be a tensor X^T X, got {type(gram).__name__}")
        factors = whitened_svd(matrix, gram, rank=rank, energy=energy, tol=tol, ratio=ratio,
                               whitening=whitening, context=context)
        A, B = factors.balanced_factors()
        return A, B, factors
    factors = svd(matrix, rank=rank, energy=energy, tol=tol, ratio=ratio, method=solver,
                  random_state=random_state, context=context)
    A, B = factors.balanced_factors()
    return A, B, factors


def _attach_report(module, factors):
    module.error_bound = factors.error_bound
    module.weight_norm = factors.norm
    if isinstance(factors, WhitenedSVDFactors):  # data-aware: the bound is on the outputs
        module.error_kind = "output"
        module.output_norm = factors.norm
        module.weight_norm = factors.weight_norm
        module.weight_error = factors.weight_error
        module.whitening, module.jitter = factors.whitening, factors.jitter
    return module


def _resolve_gram(layer, gram, input_mean, calibration, center, context):
    """``(gram, input_mean)`` to use: the given ones, or the layer's statistics in ``calibration``.

    With ``calibration`` and ``center`` (and a bias to absorb the mean shift) the centered
    covariance and the mean are used, else the uncentered Gram.
    """
    if calibration is not None:
        if gram is not None or input_mean is not None:
            raise ValueError(f"{context}: pass gram=/input_mean= or calibration=, not both")
        name = calibration.name_of(layer, context)
        return calibration.statistics(name, center=bool(center) and layer.bias is not None)
    if input_mean is not None:
        if gram is None:
            raise ValueError(f"{context}: input_mean= goes with gram= (the centered covariance of the inputs)")
        if layer.bias is None:
            raise ValueError(f"{context}: input_mean= corrects the bias by (W - W') mean, but the layer has no "
                             f"bias; pass the uncentered Gram X^T X without input_mean=")
    return gram, input_mean


def _mean_correction(matrix, A, B, input_mean, context):
    """``(W - A B) mean`` per output row, flattened ``(g*m,)``: the bias shift that re-centres the outputs."""
    W = matrix.detach().double()
    g, m, n = W.shape
    mean = torch.as_tensor(input_mean, dtype=torch.float64, device=W.device).reshape(-1, n)
    if mean.shape[0] not in (1, g):
        raise ValueError(f"{context}: input_mean of shape {tuple(input_mean.shape)} does not match the weight "
                         f"matrix of shape {tuple(W.shape)}; expected ({n},) or ({g}, {n})")
    E = W - A.double() @ B.double()
    return (E @ mean.expand(g, n)[..., None]).reshape(g * m)


def _copy_bias(bias_param, layer_bias, matrix, A, B, input_mean, context):
    bias_param.copy_(layer_bias)
    if input_mean is not None:
        bias_param.add_(_mean_correction(matrix, A, B, input_mean, context).to(bias_param.dtype))


class LowRankLinear(FactorizedChain):
    """``y = U (V x) + b``: ``reduce`` Linear(in, rank), ``expand`` Linear(rank, out, bias)."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.dense_config = dict(in_features=in_features, out_features=out_features)
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.reduce = nn.Linear(in_features, rank, bias=False, **kw)
        self.expand = nn.Linear(rank, out_features, bias=bias, **kw)

    @property
    def config(self):
        return dict(**self.dense_config, rank=self.rank, bias=self.bias is not None)

    @classmethod
    def from_dense(cls, linear, *, rank=None, energy=None, tol=None, ratio=None, context="",
                   solver="exact", random_state=None, gram=None, input_mean=None, whitening="cholesky"):
        A, B, factors = _factorize(cls.weight_matrix(linear), rank=rank, energy=energy, tol=tol, ratio=ratio,
                                   context=context, solver=solver, random_state=random_state, gram=gram,
                                   whitening=whitening)
        module = cls(**linear_config(linear), rank=factors.rank, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.reduce.weight.copy_(B[0])
        module.expand.weight.copy_(A[0])
        if linear.bias is not None:
            _copy_bias(module.expand.bias, linear.bias, cls.weight_matrix(linear), A, B, input_mean, context)
        return _attach_report(module, factors)

    @staticmethod
    def weight_matrix(linear):
        """The (1, out, in) matrix the SVD truncates."""
        return linear.weight[None]

    def dense_weight(self):
        return self.expand.weight @ self.reduce.weight

    def extra_repr(self):
        cfg = self.dense_config
        return f"in_features={cfg['in_features']}, out_features={cfg['out_features']}, rank={self.rank}"


def _conv_type(dim):
    return DENSE_TYPES[dim]


class LowRankConv(FactorizedChain):
    """Channel scheme: ``reduce`` k x k conv C -> groups*rank, ``expand`` 1x1 conv -> N (bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        conv = _conv_type(dim)
        self.rank = rank
        kw = dict(device=device, dtype=dtype)
        self.reduce = conv(in_channels, groups * rank, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, groups=groups, bias=False, padding_mode=padding_mode, **kw)
        self.expand = conv(groups * rank, out_channels, 1, groups=groups, bias=bias, **kw)
        self.dense_config = conv_config(self.reduce) | dict(out_channels=out_channels)

    @property
    def config(self):
        return dict(**self.dense_config, rank=self.rank, bias=self.bias is not None)

    @classmethod
    def from_dense(cls, conv, *, rank=None, energy=None, tol=None, ratio=None, context="",
                   solver="exact", random_state=None, gram=None, input_mean=None, whitening="cholesky"):
        cfg = conv_config(conv)
        g = conv.groups
        if g > 1 and conv.in_channels // g == 1:
            raise ValueError(f"{context}: every filter of this depthwise conv sees a single "
                             f"input channel, so the channel scheme has nothing to factorize; use "
                             f"scheme='spatial' (Conv2d) or leave the layer dense")
        A, B, factors = _factorize(cls.weight_matrix(conv), rank=rank, energy=energy, tol=tol, ratio=ratio, context=context,
                                   solver=solver, random_state=random_state, gram=gram, whitening=whitening)
        module = cls(**cfg, rank=factors.rank, bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
        module.reduce.weight.copy_(B.reshape(module.reduce.weight.shape))
        module.expand.weight.copy_(A.reshape(module.expand.weight.shape))
        if conv.bias is not None:
            _copy_bias(module.expand.bias, conv.bias, cls.weight_matrix(conv), A, B, input_mean, context)
        return _attach_report(module, factors)

    @staticmethod
    def weight_matrix(conv):
        """Per group, the (N/g, C/g * prod(kernel)) matrix the SVD truncates: (g, N/g, C/g*k...)."""
        return conv.weight.reshape(conv.groups, conv.out_channels // conv.groups, -1)

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


class SpatialLowRankConv(FactorizedChain):
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

    @property
    def config(self):
        return dict(**self.dense_config, rank=self.rank, bias=self.bias is not None)

    @staticmethod
    def weight_matrix(conv):
        """W (N, C/g, kh, kw) -> M (g, C/g*kh, N/g*kw) with M[(c, y), (n, x)] = W[n, c, y, x]."""
        weight, groups = conv.weight, conv.groups
        N, c, kh, kw = weight.shape
        return weight.reshape(groups, N // groups, c, kh, kw).permute(0, 2, 3, 1, 4).reshape(
            groups, c * kh, (N // groups) * kw)

    @classmethod
    def from_dense(cls, conv, *, rank=None, energy=None, tol=None, ratio=None, context="",
                   solver="exact", random_state=None, gram=None, input_mean=None, whitening="cholesky"):
        if len(conv.kernel_size) != 2:
            raise ValueError(f"{context}: scheme='spatial' applies to Conv2d only; use scheme='channel'")
        if gram is not None or input_mean is not None:
            raise ValueError(f"{context}: data-aware decomposition (gram=/calibration=) supports the channel "
                             f"scheme only: the spatial scheme's output error couples the kernel columns of "
                             f"each patch, so no whitening gives a certified optimum; use scheme='channel'")
        g, N = conv.groups, conv.out_channels
        A, B, factors = _factorize(cls.weight_matrix(conv), rank=rank, energy=energy, tol=tol, ratio=ratio,
                                   context=context, solver=solver, random_state=random_state)
        cfg = conv_config(conv)
        module = cls(**cfg, rank=factors.rank, bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
        K, (kh, kw) = factors.rank, conv.kernel_size
        module.vertical.weight.copy_(A.transpose(1, 2).reshape(g * K, -1, kh, 1))
        module.horizontal.weight.copy_(B.reshape(g, K, N // g, kw).permute(0, 2, 1, 3).reshape(N, K, 1, kw))
        if conv.bias is not None:
            module.horizontal.bias.copy_(conv.bias)
        return _attach_report(module, factors)

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


@register("svd", ["linear"], "truncated SVD: two matmuls (Denton et al. 2014)")
def _svd_linear(layer, *, rank=None, energy=None, tol=None, ratio=None, context="", solver="exact",
                random_state=None, gram=None, input_mean=None, calibration=None, center=True,
                whitening="cholesky"):
    _check_solver(solver, context)
    gram, input_mean = _resolve_gram(layer, gram, input_mean, calibration, center, context)
    return LowRankLinear.from_dense(layer, rank=rank, energy=energy, tol=tol, ratio=ratio, context=context,
                                    solver=solver, random_state=random_state, whitening=whitening,
                                    gram=gram, input_mean=input_mean)


@register("svd", [1, 2, 3], "truncated SVD: channel (Zhang 2016) or spatial (Jaderberg 2014) scheme")
def _svd_conv(layer, *, rank=None, energy=None, tol=None, ratio=None, context="", scheme="channel",
              solver="exact", random_state=None, gram=None, input_mean=None, calibration=None, center=True,
              whitening="cholesky"):
    _check_solver(solver, context)
    if scheme not in SCHEMES:
        raise ValueError(f"{context}: scheme={scheme!r} is not one of {sorted(SCHEMES)}")
    gram, input_mean = _resolve_gram(layer, gram, input_mean, calibration, center, context)
    return SCHEMES[scheme].from_dense(layer, rank=rank, energy=energy, tol=tol, ratio=ratio, context=context,
                                      solver=solver, random_state=random_state, whitening=whitening,
                                      gram=gram, input_mean=input_mean)


def _check_solver(solver, context):
    if solver not in SOLVERS:
        raise ValueError(f"{context}: solver={solver!r} is not one of {SOLVERS}")


__all__ = ["LowRankLinear", "LowRankConv", "SpatialLowRankConv"]


@register_budget_profile("svd")
def _svd_budget_profile(layer, *, scheme="channel", gram=None, **_options):
    """Energies (squared singular values summed over groups) and a meta-device builder.

    With ``gram`` (the layer's calibration Gram / covariance, as passed to the builder) the
    energies are those of the OUTPUT spectrum ``s_i(W L)`` that the data-aware SVD truncates.
    """
    cls = LowRankLinear if isinstance(layer, nn.Linear) else SCHEMES[scheme]
    matrix = cls.weight_matrix(layer).detach().double()
    if gram is not None:
        from decomp_toolkit.decomp.whitened import whitening_factor
        G = torch.as_tensor(gram, dtype=torch.float64, device=matrix.device)
        matrix = matrix @ whitening_factor(G.expand(matrix.shape[0], *G.shape[-2:]))[0]
    spectrum = torch.linalg.svdvals(matrix)
    config = linear_config(layer) if cls is LowRankLinear else conv_config(layer)
    bias = layer.bias is not None

    def build(ranks):
        return cls(**config, rank=ranks[0], bias=bias, device="meta")
    return BudgetProfile([np.square(spectrum.cpu().numpy()).sum(axis=0)], build)
