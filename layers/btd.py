"""Block-term layers: method ``"btd"`` (Wang & Cheng 2016; De Lathauwer 2008).

``BlockTermConv`` (Conv1d/2d/3d): the kernel ``K (N, C, *k)`` is a sum of ``n_blocks``
Tucker blocks ``G_b ×_0 U_b ×_1 V_b`` (:func:`decomp.btd.btd` with block ranks
``(R_out, R_in, *k)``: the spatial modes are kept whole), and the layer is

* ``first``  1x1 conv C -> n_blocks*R_in (the stacked ``V_b^T``);
* ``core``   grouped k x k conv, groups = n_blocks (block b maps its R_in channels to its
  R_out channels with ``G_b``); carries stride, padding incl. 'same'/'valid',
  padding_mode, dilation;
* ``last``   1x1 conv n_blocks*R_out -> N (the stacked ``U_b``, the original bias).

One block is :class:`~layers.tucker.TuckerConv`; many small blocks trade the core's
``R_in R_out k^2`` for ``n_blocks (R_in R_out / n_blocks^2) k^2`` at equal channel widths.
MACs ``C B R_in H W + k^2 B R_in R_out H'W' + N B R_out H'W'``.

Ranks: ``n_blocks=`` (default 4) and ``rank=R`` (R_out = R_in = R) or ``(R_out, R_in)``
(the same for every block), or ``ratio=`` (the largest uniform channel rank whose layer fits:
:func:`ranks_within_ratio`; spatial modes whole); no
``energy=``/``tol=`` (no spectrum, ranks not nested). Grouped convs: one BTD per group,
the stages become grouped convs (first/last groups=g, core groups=g*n_blocks); depthwise
convs are refused. ``fit.error`` is the exact a-posteriori error of the fit (root sum
of squares over groups; no bound is certified, ``fit.error_bound`` is None);
``fit.diagnostics["btd"]`` holds each group's ALS diagnostics. ALS is costly, so the layer
defaults are ``n_iter_max=50``, ``n_init=2`` (decomp's: 100 and 4); both are passed to
:func:`decomp.btd.btd` (benchmarks/bench_decomp.py times it).
"""
from __future__ import annotations

import math

import torch

from decomp_toolkit.decomp import btd as btd_decomp
from decomp_toolkit.decomp.rank import largest_rank_within

from ._tensor import group_kernels, pair_rank, probe_config, refuse_depthwise
from .base import FactorizedChain
from .fit import spec_kwargs, weight_fit
from .kinds import conv_config, standard_type
from .registry import register


class BlockTermConv(FactorizedChain):
    """``first`` 1x1 C -> g*B*R_in, ``core`` k x k (groups g*B) -> g*B*R_out, ``last`` 1x1 -> N (bias)."""

    def __init__(self, in_channels, out_channels, kernel_size, rank, n_blocks, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", dim=2, device=None, dtype=None):
        super().__init__()
        self.dense_config = probe_config(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                                         padding_mode, dim)
        r_out, r_in = self.rank = pair_rank(rank)
        self.n_blocks = int(n_blocks)
        g, B, conv = groups, int(n_blocks), standard_type(dim)
        kw = dict(device=device, dtype=dtype)
        self.first = conv(in_channels, g * B * r_in, 1, groups=g, bias=False, **kw)
        self.core = conv(g * B * r_in, g * B * r_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=g * B, bias=False, padding_mode=padding_mode, **kw)
        self.last = conv(g * B * r_out, out_channels, 1, groups=g, bias=bias, **kw)

    CONFIG = ("rank", "n_blocks")

    @classmethod
    def from_dense(cls, conv, spec, *, context="", n_blocks=4, n_iter_max=50, n_init=2, random_state=None):
        """One BTD per group (:func:`decomp.btd.btd`, spatial modes kept whole) for RankSpec ``spec``."""
        refuse_depthwise(conv, context, "btd")
        block_spec = _block_spec(spec, conv, n_blocks, context)
        results = [btd_decomp(K, **block_spec, n_blocks=n_blocks, n_iter_max=n_iter_max, n_init=n_init,
                              random_state=random_state, compute_dtype=torch.float64, context=context)
                   for K in group_kernels(conv)]
        blocks = [_absorb_spatial(f.blocks, len(conv.kernel_size)) for f in results]
        r_out, r_in = blocks[0][0][0].shape[:2]
        module = cls(**conv_config(conv), rank=(int(r_out), int(r_in)), n_blocks=n_blocks, bias=conv.bias is not None,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        module.first.weight.copy_(torch.cat([V.T for group in blocks for _, _, V in group])
                                  .reshape(module.first.weight.shape))
        module.core.weight.copy_(torch.cat([G for group in blocks for G, _, _ in group])
                                 .reshape(module.core.weight.shape))
        module.last.weight.copy_(torch.stack([torch.cat([U for _, U, _ in group], dim=1) for group in blocks])
                                 .reshape(module.last.weight.shape))
        if conv.bias is not None:
            module.last.bias.copy_(conv.bias)
        module.fit = weight_fit(results, btd=[f.info for f in results])
        return module

    def dense_weight(self):
        cfg = self.dense_config
        g, N, C, B = cfg["groups"], cfg["out_channels"], cfg["in_channels"], self.n_blocks
        r_out, r_in = self.rank
        k = tuple(cfg["kernel_size"])
        kk = 1
        for s in k:
            kk *= s
        U = self.last.weight.reshape(g, N // g, B, r_out)
        G = self.core.weight.reshape(g, B, r_out, r_in, kk).transpose(3, 4)  # (g, B, R_out, kk, R_in)
        V = self.first.weight.reshape(g, B, r_in, C // g)
        inner = (G @ V[:, :, None]).reshape(g, B, r_out, kk * (C // g))
        W = torch.einsum("gnbo,gbox->gnx", U, inner).reshape(N, kk, C // g)
        return W.transpose(1, 2).reshape(N, C // g, *k)

    def extra_repr(self):
        return f"n_blocks={self.n_blocks}, rank={self.rank}"


def _block_spec(spec, conv, n_blocks, context):
    """The decomp.btd rank spec: a channel-rank pair (given, or the largest within ``ratio=``:
    :func:`ranks_within_ratio`) becomes the block rank ``(R_out, R_in, *k)``."""
    if spec.kind == "ratio":
        return {"rank": ranks_within_ratio(spec.value, conv, n_blocks, context) + tuple(conv.kernel_size)}
    if spec.kind != "rank":
        return spec_kwargs(spec)
    rank = pair_rank(spec.value) if isinstance(spec.value, int) else spec.value
    if len(rank) != 2:
        raise ValueError(f"{context}: rank={spec.value!r}: pass rank=R or rank=(R_out, R_in), the channel ranks "
                         f"of every block (the spatial modes are kept whole)")
    return {"rank": tuple(rank) + tuple(conv.kernel_size)}


def ranks_within_ratio(ratio, conv, n_blocks, context="") -> tuple:
    """``(R_out, R_in)``: the largest uniform channel rank ``R`` (capped at each group's channels) whose layer
    holds at most ``ratio`` times the dense weight's ``N (C/g) k`` parameters. The layer stores
    ``B R_in C + g B R_out R_in k + B R_out N`` (``B = n_blocks``, ``k`` the kernel's size, spatial modes
    whole in the cores). InfeasibleRankError when even ``R = 1`` does not fit."""
    g, N, C, kk = conv.groups, conv.out_channels, conv.in_channels, math.prod(conv.kernel_size)

    def pair(R):
        return min(R, N // g), min(R, C // g)

    def params(R):
        r_out, r_in = pair(R)
        return n_blocks * (r_in * C + g * r_out * r_in * kk + r_out * N)

    return pair(largest_rank_within(params, ratio * N * (C // g) * kk, max(N // g, C // g), context))


def _absorb_spatial(blocks, dims):
    """Absorb each block's spatial factors into its core: blocks become ``(core (R_out, R_in, *k), U, V)``."""
    out = []
    for core, Us in blocks:
        for a in range(dims):
            core = torch.movedim(torch.tensordot(Us[2 + a], core, dims=([1], [2 + a])), 0, 2 + a)
        out.append((core, Us[0], Us[1]))
    return out


@register("btd", [1, 2, 3], "block-term: 1x1, grouped k x k (groups=n_blocks), 1x1 (Wang & Cheng 2016)",
          spec_kinds=("rank", "ratio"), rank_tuples=True, conv_chain=True)
def _btd_conv(layer, spec, *, context, n_blocks=4, n_iter_max=50, n_init=2, random_state=None):
    """Options:
        n_blocks: number of Tucker blocks (default 4)
        n_iter_max: ALS sweeps at most per start (default 50)
        n_init: random starts; the best fit is kept (default 2)
        random_state: seed (int or torch.Generator) of the starts
    """
    return BlockTermConv.from_dense(layer, spec, context=context, n_blocks=n_blocks, n_iter_max=n_iter_max,
                                    n_init=n_init, random_state=random_state)


__all__ = ["BlockTermConv"]
