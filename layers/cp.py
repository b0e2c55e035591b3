"""CP layers: method ``"cp"`` (Lebedev et al. 2015).

``CPConv`` (Conv1d/2d/3d): the kernel ``K (N, C, *k)`` is CP-decomposed,
``K ~= sum_r a_r ⊗ b_r ⊗ u^(1)_r ⊗ ... ⊗ u^(d)_r``, and the layer is

* ``first``     1x1 conv C -> R (``b_r``);
* ``depthwise`` one depthwise conv per spatial axis (groups=R): kernel k_a along axis a,
  with that axis' stride, padding (int, or 'same'/'valid'), dilation and padding_mode
  (2-D: k x 1 then 1 x k, exactly Lebedev's scheme; 1-D: one stage; 3-D: three);
* ``last``      1x1 conv R -> N (``a_r`` with the CP weights, the original bias).

Padding every axis in its own stage is exact for every padding mode: reflect/replicate/
circular padding are per-axis index maps, which commute with a conv acting along the
other axes (and zero padding commutes with the bias-free 1x1 ``first``). Parameters
``R (C + sum k_a + N)`` (+ bias); MACs per output pixel of the separable form
``R C (input pixels) + R k_a (each stage's output) + R N``.

``implementation``: ``"separable"`` (default; the stages above) or ``"fused"`` (2-D/3-D:
one depthwise conv with the rank-1 kernel ``u^(1) ⊗ ... ⊗ u^(d)`` built on the fly from
the same parameters: more MACs, one memory pass fewer -- on CPUs this is sometimes
faster). ``optimize="speed"`` times both and keeps the faster (:mod:`layers.speed`).
``flops()`` counts what the chosen implementation runs.

Grouped convs: each group's kernel gets its own CP at a shared rank (stages become grouped
convs with groups=g; the depthwise stages have g*R channels). Depthwise convs, Linear
layers (a matrix's CP is its SVD: use ``svd``, or ``tt`` for a tensorized matrix) and
``energy=`` (CP has no spectrum) are refused. ``rank=R``, ``tol=`` (smallest rank found whose
fit meets it), ``ratio=``. ``fit.error`` is the exact a-posteriori error of the fit
(root sum of squares over groups; no bound is certified, ``fit.error_bound`` is None),
``fit.norm = ||K||_F``; ``fit.diagnostics["cp"]`` holds each group's ALS diagnostics.

No data-aware (calibrated) variant. ``svd``, ``tucker`` and ``pq`` accept ``gram=`` /
``calibration=`` and fit the OUTPUT error ``||(W - W')X^T||_F``; CP does not, on purpose.
The output error weighs the kernel's (channel, kernel offset) entries by the im2col Gram
``G``: ``tr(E G E^T)``. In CP-ALS each factor update is a linear least-squares problem
whose normal equations have the closed form ``A = X_(n) (⊙ other factors) (∗ Grams of
the other factors)^{-1}`` only because the metric is the identity, which makes the
Khatri-Rao Gram a Hadamard product of small R x R matrices. With ``G`` in the metric the
problem is a *weighted* CP: ``G`` couples the input-channel and spatial modes, so the
input-channel and spatial factor updates become dense ``(C R) x (C R)`` /
``(k R) x (k R)`` systems that change with every sweep (no Hadamard shortcut), ALS loses
its monotone cheap steps, and the well-known CP degeneracies (diverging rank-1 terms)
get worse. A refinement of the plain CP by gradient descent on the output error (or
distillation with :func:`layers.finetune`) is possible but is not done here.
``decompose(conv, method="cp", gram=...)`` raises a TypeError that says so and points to
``svd``/``tucker``; ``compress(model, method="cp", calibration=...)`` decomposes from the
weights alone and lists the layers in a report note.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from decomp_toolkit.decomp import CPFactors
from decomp_toolkit.decomp import cp as cp_decomp


from ._accounting import layer_macs
from ._tensor import SelectableForward, group_kernels, probe_config, refuse_depthwise
from .base import FactorizedLayer
from .fit import check_factors, spec_kwargs, weight_fit
from .kinds import conv_config, functional, pad_input, standard_type
from .registry import register, register_from_factors

IMPLEMENTATIONS = ("separable", "fused")
NO_DATA_AWARE = ("with an input-side Gram the CP-ALS subproblem becomes a weighted CP, which loses ALS's "
                 "closed-form normal equations; see layers.cp's docstring")


def _along(values, axis, dim, other):
    return tuple(values[a] if a == axis else other for a in range(dim))


def _axis_padding(padding, axis, dim):
    if isinstance(padding, str):
        return padding
    return _along(padding, axis, dim, 0)


class CPConv(SelectableForward, FactorizedLayer):
    """``first`` 1x1 conv C -> g*R, one depthwise stage per spatial axis, ``last`` 1x1 conv -> N (bias)."""

    IMPLEMENTATION_CHOICES = IMPLEMENTATIONS
    CONFIG = ("rank", "implementation")

    def __init__(self, in_channels, out_channels, kernel_size, rank, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", dim=2, implementation="separable", device=None, dtype=None):
        super().__init__()
        cfg = probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode,
                           dim)
        self.dense_config = cfg
        self.rank = int(rank)
        g, R, conv = groups, int(rank), standard_type(dim)
        kw = dict(device=device, dtype=dtype)
        self.first = conv(in_channels, g * R, 1, groups=g, bias=False, **kw)
        k, s, p, d = cfg["kernel_size"], cfg["stride"], cfg["padding"], cfg["dilation"]
        self.depthwise = nn.ModuleList(
            conv(g * R, g * R, _along(k, a, dim, 1), stride=_along(s, a, dim, 1), padding=_axis_padding(p, a, dim),
                 dilation=_along(d, a, dim, 1), groups=g * R, bias=False, padding_mode=padding_mode, **kw)
            for a in range(dim))
        self.last = conv(g * R, out_channels, 1, groups=g, bias=bias, **kw)
        self.implementation = implementation

    @property
    def implementations(self):
        return IMPLEMENTATIONS if self.dense_config["dim"] > 1 else ("separable",)

    @property
    def bias(self):
        return self.last.bias

    def fused_kernel(self):
        """The rank-1 depthwise kernel ``(g*R, 1, *k)``: product of the per-axis kernels (broadcast)."""
        kernel = self.depthwise[0].weight
        for stage in self.depthwise[1:]:
            kernel = kernel * stage.weight
        return kernel

    def _fused(self, x):
        cfg = self.dense_config
        padding = cfg["padding"]
        if cfg["padding_mode"] != "zeros":  # pad exactly as the dense conv would, then a padding-free conv
            x = pad_input(x, cfg["padding"], cfg["kernel_size"], cfg["dilation"], cfg["padding_mode"])
            padding = 0
        return functional(cfg["dim"])(x, self.fused_kernel(), None, cfg["stride"], padding, cfg["dilation"],
                                      self.first.out_channels)

    def forward(self, x):
        x = self.first(x)
        if self._implementation == "fused":
            x = self._fused(x)
        else:
            for stage in self.depthwise:
                x = stage(x)
        return self.last(x)

    def flops_and_shape(self, input_shape):
        total, shape = layer_macs(self.first, input_shape)
        if self._implementation == "fused":
            batch_shape = shape
            cfg = self.dense_config
            probe = standard_type(cfg["dim"])(self.first.out_channels, self.first.out_channels, cfg["kernel_size"],
                                          stride=cfg["stride"], padding=cfg["padding"], dilation=cfg["dilation"],
                                          groups=self.first.out_channels, bias=False, device="meta")
            macs, shape = layer_macs(probe, batch_shape)
            total += macs
        else:
            for stage in self.depthwise:
                macs, shape = layer_macs(stage, shape)
                total += macs
        macs, shape = layer_macs(self.last, shape)
        return total + macs, shape

    @classmethod
    def from_dense(cls, conv, spec, *, context="", random_state=None, n_iter_max=100):
        """CP of every group's kernel at a shared rank (the largest any group needs for ``tol=``)."""
        refuse_depthwise(conv, context, "cp")
        kernels = group_kernels(conv)

        def run(K, **rank_spec):
            return cp_decomp(K, **rank_spec, random_state=random_state, n_iter_max=n_iter_max,
                             compute_dtype=torch.float64, context=context)
        results = [run(K, **spec_kwargs(spec)) for K in kernels]
        R = max(f.rank for f in results)
        if any(f.rank != R for f in results):  # grouped + tol=: share the largest rank found
            results = [run(K, rank=R) for K in kernels]
        module = cls(**conv_config(conv), rank=R, bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
        module._load([f.absorbed_factors() for f in results])
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        module.fit = weight_fit(results, cp=[f.info for f in results])
        return module

    @classmethod
    def from_factors(cls, conv, factors, *, context=""):
        """The layer from a CP of the kernel ``(N, C, *k)`` computed elsewhere (ungrouped convs)."""
        refuse_depthwise(conv, context, "cp")
        if conv.groups != 1:
            raise ValueError(f"{context}: factors= for a grouped conv (groups={conv.groups}) is not supported; "
                             f"decompose it with a rank spec")
        check_factors(factors, CPFactors, [conv.weight.shape], context)
        module = cls(**conv_config(conv), rank=factors.rank, bias=conv.bias is not None, device=conv.weight.device,
                     dtype=conv.weight.dtype)
        module._load([[torch.as_tensor(f) for f in factors.absorbed_factors()]])
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        module.fit = weight_fit([factors])
        return module

    def _load(self, parts):
        """Per group ``(A (N/g, R), B (C/g, R), u_1 (k_1, R), ...)`` (weights absorbed) into the stages."""
        self.first.weight.copy_(torch.cat([p[1].T for p in parts]).reshape(self.first.weight.shape))
        for a, stage in enumerate(self.depthwise):
            stage.weight.copy_(torch.cat([p[2 + a].T for p in parts]).reshape(stage.weight.shape))
        self.last.weight.copy_(torch.stack([p[0] for p in parts]).reshape(self.last.weight.shape))

    def dense_weight(self):
        cfg = self.dense_config
        g, N, C, R = cfg["groups"], cfg["out_channels"], cfg["in_channels"], self.rank
        k = tuple(cfg["kernel_size"])
        A = self.last.weight.reshape(g, N // g, R)
        B = self.first.weight.reshape(g, R, C // g)
        # spatial part per component: (g, R, prod k)
        S = self.fused_kernel().reshape(g, R, math.prod(k))
        # W[n, c, s] = sum_r A[n, r] B[r, c] S[r, s]
        W = A @ (B[:, :, :, None] * S[:, :, None, :]).reshape(g, R, -1)
        return W.reshape(N, C // g, *k)

    def extra_repr(self):
        return f"rank={self.rank}, implementation={self.implementation!r}"


@register("cp", [1, 2, 3], "CP: 1x1, one depthwise conv per spatial axis, 1x1 (Lebedev et al. 2015)",
          spec_kinds=("rank", "tol", "ratio"), no_data_aware_reason=NO_DATA_AWARE,
          spec_refusal="{kind} is not supported by CP (it has no spectrum to keep a fraction of); pass rank= (an int), "
                       "tol= or ratio=",
          unsupported={"linear": "CP needs a 3-way or higher kernel, but a Linear weight is a matrix, whose CP "
                                 "decomposition is its (truncated) SVD; use method='svd' for that, or method='tt' "
                                 "for a tensorized (TT-matrix) factorization"})
def _cp_conv(layer, spec, *, context, random_state=None, n_iter_max=100, implementation="separable"):
    """Options:
        random_state: seed (int or torch.Generator) of the ALS initialization
        n_iter_max: ALS sweeps at most (default 100)
        implementation: "separable" (default: one depthwise conv per axis) or "fused" (one rank-1 kernel)
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{context}: implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    module = CPConv.from_dense(layer, spec, context=context, random_state=random_state, n_iter_max=n_iter_max)
    module.implementation = implementation
    return module


@register_from_factors("cp", [1, 2, 3])
def _cp_from_factors(layer, factors, *, context):
    return CPConv.from_factors(layer, factors, context=context)


__all__ = ["CPConv"]
