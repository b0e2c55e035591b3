"""``decompose(layer, method=..., **rank_spec)``: one layer in, one factorized layer out."""
from __future__ import annotations

import torch

from ._validate import layer_kind, layer_label
from .registry import get_builder


def decompose(layer, method: str = "svd", *, rank=None, energy=None, tol=None, ratio=None, name=None,
              **options):
    """Replace one ``nn.Linear`` / ``nn.Conv1d/2d/3d`` by its factorized equivalent.

    Pass exactly one of ``rank`` (int, per-mode tuple, or ``"vbmf"``), ``energy``,
    ``tol``, ``ratio`` (see :mod:`decomp.rank`); ``options`` are method-specific (e.g.
    ``scheme="spatial"`` for svd convs, ``solver="randomized"``). ``name`` is used in
    error messages. The returned module has the same call signature, keeps bias,
    stride, padding (mode), dilation, groups, dtype and device; ``layer`` is not
    modified. Raises ValueError/TypeError naming the layer, its shape and the request.
    """
    kind = layer_kind(layer, name)
    spec = {k: v for k, v in dict(rank=rank, energy=energy, tol=tol, ratio=ratio).items() if v is not None}
    asked = ", ".join(f"{k}={v!r}" for k, v in spec.items()) or "no rank spec"
    context = f"{layer_label(layer, name)} with method={method!r}, {asked}"
    entry = get_builder(method, kind, context)
    unknown = sorted(set(options) - set(entry.options(kind)))
    if unknown:
        raise TypeError(f"{context}: unknown option(s) {unknown}; method {method!r} accepts "
                        f"{entry.options(kind)}")
    with torch.no_grad():
        return entry.builders[kind](layer, rank=rank, energy=energy, tol=tol, ratio=ratio,
                                    context=context, **options)
