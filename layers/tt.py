"""TT-matrix layers: method ``"tt"`` (Novikov et al. 2015, "Tensorizing Neural Networks").

``TTLinear``: ``W (out, in)`` with ``out = m_1...m_d``, ``in = n_1...n_d`` is a TT-matrix
with cores ``G_k (r_{k-1}, m_k, n_k, r_k)`` (:func:`decomp.tt.tt_matrix`; shapes
auto-factorized into balanced factors, or ``in_shape=``/``out_shape=``). The forward never
rebuilds ``W``: it contracts the input with one core at a time. Right to left
(``implementation="rtl"``), the state is kept as ``(m_{k+1}..m_d, rows, n_1..n_k, r_k)``, so
each core is ONE plain GEMM ``(A, n_k r_k) @ (n_k r_k, r_{k-1} m_k)`` followed by one
transpose that moves the new output digit ``m_k`` to the front -- no einsum path search,
no batched tiny GEMMs. ``"ltr"`` runs the same scheme on the reversed train (digits of the
input and output reversed). MACs of one order:
``sum_k rows * (prod_{j<k} n_j) * (prod_{j>k} m_j) * r_{k-1} m_k n_k r_k``; the cheaper of
the two is the default, unless ``"rtl-pairs"`` (3 cores or more) needs at most 1.25x its MACs
at 64 rows, which then is the default. ``"rtl-pairs"`` first
merges adjacent cores pairwise (exact; ``sum r_{k-1} m_k n_k r_k m_{k+1} n_{k+1} r_{k+1}``
MACs per forward, independent of the batch) and contracts the half-length train: more
MACs, but half the GEMMs and transposes, each larger. Measured on one CPU thread
(benchmarks/bench_tensor_layers.py, loaded machine): Linear(4096, 4096) as (8,8,8,8) TT
at batch 64 ran 2-4x faster than ``"rtl"``; small TTs (Linear(1536, 384), ranks 1-5)
are overhead-bound either way. ``optimize="speed"`` times all three (:mod:`layers.speed`).
``flops()`` counts the chosen implementation (merging included). Parameters
``sum_k r_{k-1} m_k n_k r_k`` (+ bias).

Rank: ``rank=`` an int cap on every bond or the ``d - 1`` bond ranks, ``energy=``,
``tol=`` (certified: ``fit.error_bound <= tol ||W||_F``, TT-SVD, Oseledets 2011), ``ratio=``;
``max_rank=``, ``d=`` (number of cores). ``fit.error_bound`` is the TT-SVD bound,
``fit.norm = ||W||_F``. ``rank`` is the bond tuple ``(r_1, ..., r_{d-1})``.

Convs are refused: a TT over the channel modes of a conv with a k x k core would be a
chain whose channel part is what Tucker-2 already factorizes (with an optimal,
certified core); use ``tucker`` (or ``svd``) for convs.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from decomp_toolkit.decomp import TTMatrixFactors
from decomp_toolkit.decomp.tt import tt_matrix

from ._tensor import SelectableForward
from .base import FactorizedLayer
from .fit import check_factors, spec_kwargs, weight_fit
from .registry import register, register_from_factors

ORDERS = ("rtl", "ltr", "rtl-pairs")


def _merge_pairs(cores):
    """Adjacent cores merged pairwise (exact): ``(r0, m1 m2, n1 n2, r2)``; an odd last core stays."""
    merged = []
    for k in range(0, len(cores) - 1, 2):
        a, b = cores[k], cores[k + 1]
        r0, m1, n1, _ = a.shape
        _, m2, n2, r2 = b.shape
        merged.append(torch.einsum("amns,sMNb->amMnNb", a, b).reshape(r0, m1 * m2, n1 * n2, r2))
    if len(cores) % 2:
        merged.append(cores[-1])
    return merged


def _pair_shapes(shape):
    return tuple(math.prod(shape[k:k + 2]) for k in range(0, len(shape), 2))


def _chain_macs(in_shape, out_shape, ranks, rows=1):
    """MACs of the right-to-left contraction (see module docstring)."""
    d = len(in_shape)
    total = 0
    for k in range(d):
        a = rows * math.prod(in_shape[:k]) * math.prod(out_shape[k + 1:])
        total += a * in_shape[k] * ranks[k + 1] * ranks[k] * out_shape[k]
    return total


class TTLinear(SelectableForward, FactorizedLayer):
    """TT-matrix Linear: ``cores[k] (r_{k-1}, m_k, n_k, r_k)``, contracted core by core; ``bias (out,)``."""

    def __init__(self, in_features, out_features, in_shape, out_shape, rank, bias=True, implementation=None,
                 device=None, dtype=None):
        super().__init__()
        in_shape, out_shape = tuple(int(n) for n in in_shape), tuple(int(m) for m in out_shape)
        if math.prod(in_shape) != in_features or math.prod(out_shape) != out_features or \
                len(in_shape) != len(out_shape):
            raise ValueError(f"TTLinear: in_shape={in_shape} / out_shape={out_shape} do not factorize "
                             f"({in_features} -> {out_features}) with the same number of cores")
        d = len(in_shape)
        rank = (int(rank),) * (d - 1) if isinstance(rank, int) else tuple(int(r) for r in rank)
        if len(rank) != d - 1:
            raise ValueError(f"TTLinear: rank={rank} needs {d - 1} bond ranks")
        self.dense_config = dict(in_features=in_features, out_features=out_features)
        self.in_shape, self.out_shape, self.rank = in_shape, out_shape, rank
        self.ranks = (1,) + rank + (1,)
        kw = dict(device=device, dtype=dtype)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], out_shape[k], in_shape[k], self.ranks[k + 1], **kw))
            for k in range(d))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)
        if implementation is None:
            implementation = self._default_implementation()
        self.implementation = implementation
        self.reset_parameters()

    IMPLEMENTATION_CHOICES = ORDERS
    implementations = ORDERS
    CONFIG = ("in_shape", "out_shape", "rank", "implementation")

    def _default_implementation(self, rows=64):
        """The cheaper of rtl/ltr at ``rows`` rows, or rtl-pairs (from 3 cores) unless it needs over 1.25x the
        MACs there: pairs ran faster at equal MACs in the benchmarks (fewer, larger GEMMs)."""
        best = min(ORDERS[:2], key=lambda order: self._order_macs(order, rows))
        if len(self.in_shape) >= 3 and self._order_macs("rtl-pairs", rows) <= 1.25 * self._order_macs(best, rows):
            return "rtl-pairs"
        return best

    def _order_macs(self, order, rows=1):
        if order == "rtl":
            return _chain_macs(self.in_shape, self.out_shape, self.ranks, rows)
        if order == "rtl-pairs":  # the contraction itself, plus merging the pairs of cores
            ranks = self.ranks[::2] + ((1,) if len(self.in_shape) % 2 else ())
            merge = sum(self.ranks[k] * self.out_shape[k] * self.in_shape[k] * self.ranks[k + 1]
                        * self.out_shape[k + 1] * self.in_shape[k + 1] * self.ranks[k + 2]
                        for k in range(0, len(self.in_shape) - 1, 2))
            return _chain_macs(_pair_shapes(self.in_shape), _pair_shapes(self.out_shape), ranks, rows) + merge
        return _chain_macs(self.in_shape[::-1], self.out_shape[::-1], self.ranks[::-1], rows)

    def reset_parameters(self):
        with torch.no_grad():
            for core in self.cores:  # variance of W entries ~ 1/in (like nn.Linear's scale)
                nn.init.normal_(core, std=(1.0 / self.dense_config["in_features"]) ** (0.5 / len(self.cores))
                                / math.sqrt(core.shape[0]))
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    @staticmethod
    def _contract(x2d, cores, in_shape, out_shape):
        """Right-to-left contraction of ``x2d (rows, prod n)``; returns ``(rows, prod m)``."""
        rows = x2d.shape[0]
        d = len(cores)
        state = x2d  # layout (front = m_{k+1}..m_d, rows, n_1..n_k, r_k), r_d = 1
        front = 1
        for k in range(d - 1, -1, -1):
            core = cores[k]
            r_left, m, n, r_right = core.shape
            a = front * rows * math.prod(in_shape[:k])
            G = core.permute(2, 3, 0, 1).reshape(n * r_right, r_left * m)
            out = state.reshape(a, n * r_right) @ G  # (front, rows, n_<k, r_left, m)
            state = out.reshape(a * r_left, m).t()  # (m, front, rows, n_<k, r_left)
            front *= m
        return state.reshape(front, rows).t()

    def forward(self, x):
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.dense_config["in_features"])
        cores = list(self.cores)
        if self._implementation == "rtl":
            y = self._contract(x2d, cores, self.in_shape, self.out_shape)
        elif self._implementation == "rtl-pairs":
            y = self._contract(x2d, _merge_pairs(cores), _pair_shapes(self.in_shape), _pair_shapes(self.out_shape))
        else:
            d = len(cores)
            rev = [c.permute(3, 1, 2, 0) for c in cores[::-1]]
            xr = x2d.reshape((-1,) + self.in_shape).permute([0] + list(range(d, 0, -1))).reshape(x2d.shape)
            y = self._contract(xr, rev, self.in_shape[::-1], self.out_shape[::-1])
            y = y.reshape((-1,) + self.out_shape[::-1]).permute([0] + list(range(d, 0, -1))).reshape(y.shape)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.dense_config["out_features"])

    def flops_and_shape(self, input_shape):
        shape = tuple(int(s) for s in input_shape)
        if not shape or shape[-1] != self.dense_config["in_features"]:
            raise ValueError(f"input_shape {shape} should end with in_features={self.dense_config['in_features']}")
        rows = math.prod(shape[:-1])
        return self._order_macs(self._implementation, rows), shape[:-1] + (self.dense_config["out_features"],)

    def dense_weight(self):
        M = self.cores[0].reshape(self.out_shape[0], self.in_shape[0], self.ranks[1])
        for core in list(self.cores)[1:]:
            a, b, _ = M.shape
            _, m, n, s = core.shape
            M = torch.einsum("abr,rmns->ambns", M, core).reshape(a * m, b * n, s)
        return M[..., 0]

    def extra_repr(self):
        cfg = self.dense_config
        return (f"in_features={cfg['in_features']}, out_features={cfg['out_features']}, in_shape={self.in_shape}, "
                f"out_shape={self.out_shape}, rank={self.rank}, implementation={self.implementation!r}")

    @classmethod
    def from_dense(cls, linear, spec, *, context="", in_shape=None, out_shape=None, d=None, max_rank=None):
        """TT-matrix of ``linear.weight`` (:func:`decomp.tt.tt_matrix`) for RankSpec ``spec``."""
        factors = tt_matrix(linear.weight.detach(), **spec_kwargs(spec), in_shape=in_shape, out_shape=out_shape,
                            max_rank=max_rank, d=d, compute_dtype=torch.float64, context=context)
        return cls.from_factors(linear, factors, context=context)

    @classmethod
    def from_factors(cls, linear, factors, *, context=""):
        """The layer from a TT-matrix of ``linear.weight (out, in)`` computed elsewhere."""
        check_factors(factors, TTMatrixFactors, [linear.weight.shape], context)
        module = cls(linear.in_features, linear.out_features, factors.in_shape, factors.out_shape,
                     [int(c.shape[-1]) for c in factors.cores[:-1]], bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        for param, core in zip(module.cores, factors.cores):
            param.copy_(torch.as_tensor(core))
        if linear.bias is not None:
            module.bias.copy_(linear.bias)
        module.fit = weight_fit([factors])
        return module


@register("tt", ["linear"], "TT-matrix: the input contracted core by core (Novikov et al. 2015)",
          spec_kinds=("rank", "energy", "tol", "ratio"), rank_tuples=True,
          unsupported={kind: "TT factorizes Linear layers (TT-matrix); for a conv, the TT of its channel modes with "
                             "the k x k kernel kept is what method='tucker' (Tucker-2: 1x1, k x k, 1x1) computes with "
                             "an optimal certified core, so use method='tucker' (or 'svd'/'cp') for convs"
                       for kind in (1, 2, 3)})
def _tt_linear(layer, spec, *, context, in_shape=None, out_shape=None, d=None, max_rank=None):
    """Options:
        in_shape: factorization (n_1, ..., n_d) of in_features (default: balanced factors)
        out_shape: factorization (m_1, ..., m_d) of out_features (default: balanced factors)
        d: number of cores of the automatic factorization
        max_rank: cap on every bond rank
    """
    return TTLinear.from_dense(layer, spec, context=context, in_shape=in_shape, out_shape=out_shape, d=d,
                               max_rank=max_rank)


@register_from_factors("tt", ["linear"])
def _tt_from_factors(layer, factors, *, context):
    return TTLinear.from_factors(layer, factors, context=context)


__all__ = ["TTLinear"]
