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

``fit.error_bound`` is the HOSVD bound of :func:`decomp.tucker.tucker` (root sum of squares
over groups), ``fit.weight_norm`` = ``||K||_F``. Ranks: ``rank=R`` (both modes), ``(R_out, R_in)``,
``energy=``, ``tol=`` (certified), ``ratio=``, ``"vbmf"`` (Kim et al.'s selector).
``algorithm`` is decomp.tucker's: ``"hooi"`` (default), ``"sthosvd"``, ``"hosvd"``.
``optimize="speed"``: see :mod:`layers.speed`.

Data-aware (``gram=X^T X`` of the layer's im2col inputs per group, or ``calibration=`` from
:func:`layers.calibrate`, which ``compress(calibration=)`` passes automatically; ``center=``
and ``input_mean=`` as for ``svd``): the ranks come from the rank spec exactly as for the
plain Tucker-2 (weight spectra), then the factors and core are refit for the OUTPUT error
``||(W - W')X^T||_F`` by :func:`decomp.data_aware.whitened_tucker2` (``n_iter_max``
alternating sweeps: exact U_out given U_in, whitened-input-mode U_in, least-squares core).
The plain Tucker-2 is kept when the refit does not beat it on the calibration statistics,
so the output error is never above plain Tucker-2's at the same ranks. Then
``fit.error_kind = "output"``, ``fit.error`` = the output error MEASURED on the given Gram
(exact on the calibration data; no bound is certified: ``fit.error_bound`` is None),
``fit.norm = ||W X^T||_F``, ``fit.weight_error`` the weight error, and ``fit.diagnostics``
has ``data_aware_fit`` (``"data-aware"``/``"plain"``: which was kept) and
``plain_output_error``. With ``input_mean=`` the bias is corrected by ``(W - W') mean``.
Grouped convs use each group's Gram. Linear layers get the whitened SVD (:mod:`layers.lowrank`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from decomp_toolkit.decomp import TuckerFactors
from decomp_toolkit.decomp import tucker as tucker_decomp
from decomp_toolkit.decomp.data_aware import whitened_tucker2
from decomp_toolkit.decomp.rank import RankSpec

from ._tensor import group_kernels, pair_rank, probe_config, refuse_depthwise
from .base import FactorizedChain
from .budget import BudgetProfile
from .data_aware import copy_bias, output_fit
from .fit import check_factors, spec_kwargs, weight_fit
from .kinds import conv_config, standard_type
from .lowrank import LowRankLinear, svd_budget_profile
from .registry import register, register_budget_profile, register_from_factors

ALGORITHMS = ("hooi", "sthosvd", "hosvd")


class TuckerConv(FactorizedChain):
    """``first`` 1x1 conv C -> g*R_in, ``core`` k x k conv g*R_in -> g*R_out, ``last`` 1x1 conv -> N (bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        self.dense_config = probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         padding_mode, dim)
        r_out, r_in = self.rank = pair_rank(rank)
        g, conv = groups, standard_type(dim)
        kw = dict(device=device, dtype=dtype)
        self.first = conv(in_channels, g * r_in, 1, groups=g, bias=False, **kw)
        self.core = conv(g * r_in, g * r_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=g, bias=False, padding_mode=padding_mode, **kw)
        self.last = conv(g * r_out, out_channels, 1, groups=g, bias=bias, **kw)

    @classmethod
    def from_dense(cls, conv, spec, *, context="", algorithm="hooi", gram=None, input_mean=None, n_iter_max=5):
        """Tucker-2 of every group's kernel at shared ranks; refit for the output error when ``gram`` is given."""
        refuse_depthwise(conv, context, "tucker")
        kernels = group_kernels(conv)
        results = _group_tucker(kernels, spec, algorithm, context)
        module = cls(**conv_config(conv), rank=results[0].rank, bias=conv.bias is not None,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        if gram is not None:
            return module._refit(conv, kernels, results, gram, input_mean, n_iter_max, context)
        module._load([f.factors[0] for f in results], [f.factors[1] for f in results], [f.core for f in results])
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        module.fit = weight_fit(results)
        return module

    @classmethod
    def from_factors(cls, conv, factors, *, context=""):
        """The layer from a Tucker of the kernel ``(N, C, *k)`` computed elsewhere (modes (0, 1), or all modes:
        the spatial factors are then absorbed into the core). Ungrouped convs."""
        refuse_depthwise(conv, context, "tucker")
        if conv.groups != 1:
            raise ValueError(f"{context}: factors= for a grouped conv (groups={conv.groups}) is not supported; "
                             f"decompose it with a rank spec")
        check_factors(factors, TuckerFactors, [conv.weight.shape], context)
        if tuple(factors.modes[:2]) != (0, 1):
            raise ValueError(f"{context}: factors= must decompose the channel modes (0, 1), got modes {factors.modes}")
        core = torch.as_tensor(factors.core, dtype=torch.float64)
        for mode, U in zip(factors.modes[2:], factors.factors[2:]):  # absorb spatial factors
            core = torch.movedim(torch.tensordot(torch.as_tensor(U, dtype=torch.float64), core, dims=([1], [mode])),
                                 0, mode)
        U_out, U_in = (torch.as_tensor(U, dtype=torch.float64) for U in factors.factors[:2])
        module = cls(**conv_config(conv), rank=(U_out.shape[1], U_in.shape[1]), bias=conv.bias is not None,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        module._load([U_out], [U_in], [core])
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        module.fit = weight_fit([factors])
        return module

    def _load(self, U_out, U_in, cores):
        """Per-group ``U_out (N/g, R_out)``, ``U_in (C/g, R_in)``, ``core (R_out, R_in, *k)`` into the stages."""
        self.first.weight.copy_(torch.cat([u.T for u in U_in]).reshape(self.first.weight.shape))
        self.core.weight.copy_(torch.cat(list(cores)).reshape(self.core.weight.shape))
        self.last.weight.copy_(torch.cat(list(U_out)).reshape(self.last.weight.shape))

    def _refit(self, conv, kernels, results, gram, input_mean, n_iter_max, context):
        """Refit the plain Tucker-2 ``results`` for the output error on ``gram`` (decomp.data_aware)."""
        refit = whitened_tucker2(kernels.double(), gram.double(),
                                 [(f.factors[0], f.factors[1], f.core) for f in results], n_iter_max=n_iter_max,
                                 context=context)
        self._load(refit.U_out, refit.U_in, refit.core)
        if conv.bias is not None:
            g = conv.groups
            matrix = kernels.reshape(g, conv.out_channels // g, -1)
            core = refit.core.reshape(*refit.core.shape[:3], -1)          # (g, R_out, R_in, kk)
            inner = torch.einsum("gosk,gcs->gock", core, refit.U_in).reshape(g, core.shape[1], -1)
            copy_bias(self.last.bias, conv.bias, matrix, refit.U_out @ inner, input_mean, context)
        self.fit = output_fit(error=refit.error, norm=refit.norm, weight_error=refit.weight_error,
                              weight_norm=refit.weight_norm, data_aware_fit=refit.fit,
                              plain_output_error=refit.plain_error)
        return self

    def dense_weight(self):
        cfg = self.dense_config
        g, N, C = cfg["groups"], cfg["out_channels"], cfg["in_channels"]
        r_out, r_in = self.rank
        k = tuple(cfg["kernel_size"])
        kk = math.prod(k)
        U_out = self.last.weight.reshape(g, N // g, r_out)
        core = self.core.weight.reshape(g, r_out, r_in, kk).transpose(2, 3)  # (g, R_out, kk, R_in)
        U_in_t = self.first.weight.reshape(g, r_in, C // g)
        inner = (core @ U_in_t[:, None]).reshape(g, r_out, kk * (C // g))  # (g, R_out, kk*C/g)
        full = (U_out @ inner).reshape(N, kk, C // g)
        return full.transpose(1, 2).reshape(N, C // g, *k)

    def extra_repr(self):
        return f"rank={self.rank}"


def _group_tucker(kernels, spec, algorithm, context):
    """Tucker-2 of each group's kernel; groups share the largest ranks any group needs."""
    if spec.kind == "rank" and isinstance(spec.value, int):
        spec = RankSpec("rank", (spec.value, spec.value))

    def run(K, **rank_spec):
        return tucker_decomp(K, **rank_spec, modes=(0, 1), algorithm=algorithm, compute_dtype=torch.float64,
                             context=context)
    results = [run(K, **spec_kwargs(spec)) for K in kernels]
    ranks = tuple(max(f.rank[m] for f in results) for m in range(2))
    if any(f.rank != ranks for f in results):
        results = [run(K, rank=ranks) for K in kernels]
    return results


def _check_algorithm(algorithm, context):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{context}: algorithm={algorithm!r} is not one of {ALGORITHMS}")


TUCKER_SPECS = dict(spec_kinds=("rank", "energy", "tol", "ratio", "vbmf"), rank_tuples=True, data_aware=True)


@register("tucker", [1, 2, 3], "Tucker-2 on the channel modes: 1x1, k x k core, 1x1 (Kim et al. 2016)",
          **TUCKER_SPECS, conv_chain=True)
def _tucker_conv(layer, spec, *, context, algorithm="hooi", n_iter_max=5, gram=None, input_mean=None):
    """Options:
        algorithm: "hooi" (default), "sthosvd" or "hosvd" (decomp.tucker)
        n_iter_max: data-aware fits: alternating refit sweeps (default 5)
    """
    _check_algorithm(algorithm, context)
    return TuckerConv.from_dense(layer, spec, context=context, algorithm=algorithm, gram=gram, input_mean=input_mean,
                                 n_iter_max=n_iter_max)


def _linear_spec(spec, context):
    if spec.kind == "rank" and isinstance(spec.value, tuple):
        if len(spec.value) != 2 or spec.value[0] != spec.value[1]:
            raise ValueError(f"{context}: for a Linear, Tucker-2 is the truncated SVD, whose core has rank "
                             f"min(R_out, R_in); pass rank=R or rank=(R, R), got rank={spec.value!r}")
        return RankSpec("rank", spec.value[0])
    return spec


@register("tucker", ["linear"], "Tucker-2 of a matrix = truncated SVD: two matmuls (LowRankLinear)", **TUCKER_SPECS)
def _tucker_linear(layer, spec, *, context, algorithm="hooi", n_iter_max=5, gram=None, input_mean=None):
    """``algorithm`` and ``n_iter_max`` are accepted (so compress can pass them to every layer) and unused: a
    matrix's SVD is exact; with ``gram=``/``calibration=`` it is the data-aware (whitened) SVD."""
    _check_algorithm(algorithm, context)
    return LowRankLinear.from_dense(layer, _linear_spec(spec, context), context=context, gram=gram,
                                    input_mean=input_mean)


@register_from_factors("tucker", [1, 2, 3])
def _tucker_from_factors(layer, factors, *, context):
    return TuckerConv.from_factors(layer, factors, context=context)


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
        return svd_budget_profile(layer)
    config, bias = conv_config(layer), layer.bias is not None

    def build(ranks):
        return TuckerConv(**config, rank=tuple(ranks), bias=bias, device="meta")
    return BudgetProfile(mode_energies(layer), build)


__all__ = ["TuckerConv"]
