"""Tucker-2 layers: method ``"tucker"`` (Kim et al. 2016).

* ``TuckerConv`` (Conv1d/2d/3d): the kernel ``K (N, C, *k)`` is Tucker-2 decomposed on its
  channel modes (0, 1), ``K ~= core ×_0 U_out ×_1 U_in`` with ``core (R_out, R_in, *k)``;
  the layer is ``first`` 1x1 conv C -> R_in (``U_in^T``), ``core`` k x k conv R_in -> R_out
  (carries stride, padding incl. 'same'/'valid', padding_mode, dilation), ``last`` 1x1
  conv R_out -> N (``U_out``, the original bias). The 1x1 convs commute with every padding
  mode (they act per pixel, without bias), so the function is exactly the dense conv with
  the reconstructed kernel. MACs (Kim et al.): ``S R_in H W + D^2 R_in R_out H'W' + T R_out H'W'``.
  Grouped convs: each group's kernel is decomposed separately at shared ranks and the
  three stages become grouped convs (groups=g); with energy=/tol=/ratio= the ranks are
  the largest any group needs (so every group meets its energy/tol; ratio= may then be
  exceeded slightly). Depthwise convs are refused (their channel modes have size 1).
* Linear: Tucker-2 of a matrix ``W ~= U_out core U_in^T`` is its SVD with a (diagonal,
  after rotation) core of rank ``min(R_out, R_in)``, so a Linear becomes a
  :class:`~layers.lowrank.LowRankLinear` (two matmuls, the SVD-optimal factors); pass
  ``rank=R`` or ``(R, R)``, energy/tol/ratio/'vbmf' as for ``svd``.

``error_bound`` is the HOSVD bound of :func:`decomp.tucker.tucker` (root sum of squares
over groups), ``weight_norm`` = ``||K||_F``. Ranks: ``rank=R`` (both modes), ``(R_out, R_in)``,
``energy=``, ``tol=`` (certified), ``ratio=``, ``"vbmf"`` (Kim et al.'s selector).
``algorithm`` is decomp.tucker's method: ``"hooi"`` (default), ``"sthosvd"``, ``"hosvd"``.
Speed: see :mod:`layers.speed` (``optimize="speed"``).

Data-aware (``gram=X^T X`` of the layer's im2col inputs per group, or ``calibration=`` from
:func:`layers.calibrate`, which ``compress(calibration=)`` passes automatically; ``center=``
and ``input_mean=`` as for ``svd``): the ranks come from the rank spec exactly as for the
plain Tucker-2 (weight spectra), then the factors and core are refit for the OUTPUT error
``||(W - W')X^T||_F`` by :func:`decomp.data_aware.whitened_tucker2` (``n_iter`` alternating
sweeps: exact U_out given U_in, whitened-input-mode U_in, least-squares core). The plain
Tucker-2 is kept when the refit does not beat it on the calibration statistics, so the
output error is never above plain Tucker-2's at the same ranks; ``data_aware_fit`` says
which was kept (``"data-aware"`` / ``"plain"``), ``plain_output_error`` gives the plain one.
Then ``error_kind = "output"``, ``error_bound`` = the output error MEASURED on the given Gram
(exact on the calibration data, not a theorem bound: no certified optimum exists here),
``output_norm = ||W X^T||_F``, ``weight_error``/``weight_norm`` the weight error. With
``input_mean=`` the bias is corrected by ``(W - W') mean``. Grouped convs use each group's
Gram. Linear layers get the whitened SVD (:mod:`layers.lowrank`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from decomp_toolkit.decomp import tucker as tucker_decomp
from decomp_toolkit.decomp.data_aware import whitened_tucker2

from ._tensor import attach_report, combine_bounds, conv_type, group_kernels, probe_config, refuse_depthwise
from ._validate import conv_config
from .base import FactorizedChain
from .budget import BudgetProfile
from .lowrank import LowRankLinear, _copy_bias, _resolve_gram, _svd_budget_profile, _svd_linear
from .registry import register, register_budget_profile
from .speed import check_speed_options, finish


class TuckerConv(FactorizedChain):
    """``first`` 1x1 conv C -> g*R_in, ``core`` k x k conv g*R_in -> g*R_out, ``last`` 1x1 conv -> N (bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        self.dense_config = probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         padding_mode, dim)
        r_out, r_in = (rank, rank) if isinstance(rank, int) else tuple(int(r) for r in rank)
        self.rank = (r_out, r_in)
        g, conv = groups, conv_type(dim)
        kw = dict(device=device, dtype=dtype)
        self.first = conv(in_channels, g * r_in, 1, groups=g, bias=False, **kw)
        self.core = conv(g * r_in, g * r_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=g, bias=False, padding_mode=padding_mode, **kw)
        self.last = conv(g * r_out, out_channels, 1, groups=g, bias=bias, **kw)

    @property
    def config(self):
        return dict(**self.dense_config, rank=self.rank, bias=self.bias is not None)

    @classmethod
    def from_dense(cls, conv, *, rank=None, energy=None, tol=None, ratio=None, context="", algorithm="hooi",
                   gram=None, input_mean=None, n_iter=5):
        refuse_depthwise(conv, context, "tucker")
        if isinstance(rank, int) and not isinstance(rank, bool):
            rank = (rank, rank)
        kernels = group_kernels(conv)
        g = conv.groups

        def run(K, **spec):
            return tucker_decomp(K, **spec, modes=(0, 1), method=algorithm, compute_dtype=torch.float64,
                                 context=context)
        spec = dict(rank=rank, energy=energy, tol=tol, ratio=ratio)
        spec = {k: v for k, v in spec.items() if v is not None}
        results = [run(kernels[i], **spec) for i in range(g)]
        ranks = tuple(max(f.rank[m] for f in results) for m in range(2))
        if any(f.rank != ranks for f in results):  # grouped: share the largest ranks any group needs
            results = [run(kernels[i], rank=ranks) for i in range(g)]
        module = cls(**conv_config(conv), rank=ranks, bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
        if gram is not None:
            return cls._data_aware(module, conv, kernels, results, gram, input_mean, n_iter, context)
        if input_mean is not None:
            raise ValueError(f"{context}: input_mean= goes with gram= (the centered covariance of the inputs)")
        module.first.weight.copy_(torch.cat([f.factors[1].T for f in results]).reshape(module.first.weight.shape))
        module.core.weight.copy_(torch.cat([f.core for f in results]).reshape(module.core.weight.shape))
        module.last.weight.copy_(torch.cat([f.factors[0] for f in results]).reshape(module.last.weight.shape))
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        return attach_report(module, *combine_bounds([f.error_bound for f in results], [f.norm for f in results]))

    @staticmethod
    def _data_aware(module, conv, kernels, results, gram, input_mean, n_iter, context):
        """Refit the plain Tucker-2 ``results`` for the output error on ``gram`` (decomp.data_aware)."""
        if not isinstance(gram, torch.Tensor):
            raise TypeError(f"{context}: gram= must be a tensor X^T X, got {type(gram).__name__}")
        fit = whitened_tucker2(kernels.double(), gram.double(),
                               [(f.factors[0], f.factors[1], f.core) for f in results], n_iter=n_iter,
                               context=context)
        module.first.weight.copy_(fit["U_in"].transpose(1, 2).reshape(module.first.weight.shape))
        module.core.weight.copy_(fit["core"].reshape(module.core.weight.shape))
        module.last.weight.copy_(fit["U_out"].reshape(module.last.weight.shape))
        if conv.bias is not None:
            g = conv.groups
            matrix = kernels.reshape(g, conv.out_channels // g, -1)
            kk = int(np.prod(conv.kernel_size))
            inner = torch.einsum("gosk,gcs->gock", fit["core"].reshape(g, fit["core"].shape[1], -1, kk),
                                 fit["U_in"]).reshape(g, fit["core"].shape[1], -1)
            _copy_bias(module.last.bias, conv.bias, matrix, fit["U_out"], inner, input_mean, context)
        module.error_bound = fit["output_error"]       # MEASURED on the calibration statistics
        module.error_kind = "output"
        module.output_norm = fit["output_norm"]
        module.weight_norm = float(torch.linalg.norm(kernels.double()))
        module.weight_error = fit["weight_error"]
        module.plain_output_error = fit["plain_output_error"]
        module.data_aware_fit = fit["fit"]
        return module

    def dense_weight(self):
        cfg = self.dense_config
        g, N, C = cfg["groups"], cfg["out_channels"], cfg["in_channels"]
        r_out, r_in = self.rank
        k = tuple(cfg["kernel_size"])
        kk = int(np.prod(k))
        U_out = self.last.weight.reshape(g, N // g, r_out)
        core = self.core.weight.reshape(g, r_out, r_in, kk).transpose(2, 3)  # (g, R_out, kk, R_in)
        U_in_t = self.first.weight.reshape(g, r_in, C // g)
        inner = (core @ U_in_t[:, None]).reshape(g, r_out, kk * (C // g))  # (g, R_out, kk*C/g)
        full = (U_out @ inner).reshape(N, kk, C // g)
        return full.transpose(1, 2).reshape(N, C // g, *k)

    def extra_repr(self):
        return f"rank={self.rank}"


def _tucker_limits(conv):
    g = conv.groups
    return (conv.out_channels // g, conv.in_channels // g)


@register("tucker", [1, 2, 3], "Tucker-2 on the channel modes: 1x1, k x k core, 1x1 (Kim et al. 2016)",
          spec_kinds=("rank", "energy", "tol", "ratio"))
def _tucker_conv(layer, *, rank=None, energy=None, tol=None, ratio=None, context="", algorithm="hooi",
                 optimize=None, input_shape=None, on_slower="warn", gram=None, input_mean=None, calibration=None,
                 center=True, n_iter=5):
    check_speed_options(optimize, input_shape, on_slower, context)
    gram, input_mean = _resolve_gram(layer, gram, input_mean, calibration, center, context)
    data = dict(gram=gram, input_mean=input_mean, n_iter=n_iter)
    module = TuckerConv.from_dense(layer, rank=rank, energy=energy, tol=tol, ratio=ratio, context=context,
                                   algorithm=algorithm, **data)
    return finish(module, layer, optimize=optimize, input_shape=input_shape, on_slower=on_slower, context=context,
                  rebuild=lambda r: TuckerConv.from_dense(layer, rank=r, context=context, algorithm=algorithm,
                                                          **data),
                  limits=_tucker_limits(layer))


def _linear_rank(rank, context):
    if isinstance(rank, (tuple, list)):
        if len(rank) != 2 or rank[0] != rank[1]:
            raise ValueError(f"{context}: for a Linear, Tucker-2 is the truncated SVD, whose core has rank "
                             f"min(R_out, R_in); pass rank=R or rank=(R, R), got rank={tuple(rank)!r}")
        return int(rank[0])
    return rank


@register("tucker", ["linear"], "Tucker-2 of a matrix = truncated SVD: two matmuls (LowRankLinear)")
def _tucker_linear(layer, *, rank=None, energy=None, tol=None, ratio=None, context="", algorithm="hooi",
                   optimize=None, input_shape=None, on_slower="warn", gram=None, input_mean=None, calibration=None,
                   center=True, n_iter=5):
    """``algorithm`` and ``n_iter`` are accepted (so compress can pass them to every layer) and unused: a
    matrix's SVD is exact; with ``gram=``/``calibration=`` it is the data-aware (whitened) SVD."""
    check_speed_options(optimize, input_shape, on_slower, context)
    gram, input_mean = _resolve_gram(layer, gram, input_mean, calibration, center, context)
    module = _svd_linear(layer, rank=_linear_rank(rank, context), energy=energy, tol=tol, ratio=ratio,
                         context=context, gram=gram, input_mean=input_mean)
    return finish(module, layer, optimize=optimize, input_shape=input_shape, on_slower=on_slower, context=context,
                  rebuild=lambda r: LowRankLinear.from_dense(layer, rank=r, context=context, gram=gram,
                                                             input_mean=input_mean),
                  limits=min(layer.in_features, layer.out_features))


def mode_energies(conv):
    """Squared singular values of the mode-0 and mode-1 unfoldings, summed over groups (padded with 0)."""
    kernels = group_kernels(conv).double()
    out = []
    for mode in (0, 1):
        spectra = []
        for K in kernels:
            X = K.movedim(mode, 0).reshape(K.shape[mode], -1)
            spectra.append(torch.linalg.eigvalsh(X @ X.T).flip(-1).clamp_min(0).cpu().numpy())
        out.append(np.sum(spectra, axis=0))
    return out


@register_budget_profile("tucker")
def _tucker_budget_profile(layer, **options):
    """Convs: two rank axes (R_out from mode 0, R_in from mode 1); Linear: the SVD spectrum."""
    if isinstance(layer, nn.Linear):
        return _svd_budget_profile(layer)
    config, bias = conv_config(layer), layer.bias is not None

    def build(ranks):
        return TuckerConv(**config, rank=tuple(ranks), bias=bias, device="meta")
    return BudgetProfile(mode_energies(layer), build)


__all__ = ["TuckerConv"]
