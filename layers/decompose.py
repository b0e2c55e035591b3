"""``decompose(layer, method=..., **rank_spec)``: one layer in, one factorized layer out."""
from __future__ import annotations

import torch

from ._validate import layer_kind, layer_label
from .registry import available_methods, get_builder

DATA_AWARE_OPTIONS = ("gram", "input_mean", "calibration", "center")
NO_DATA_AWARE_REASONS = {
    "cp": "with an input-side Gram the CP-ALS subproblem becomes a weighted CP, which loses ALS's closed-form "
          "normal equations; see layers.cp's docstring",
}


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
    data_aware = [k for k in unknown if k in DATA_AWARE_OPTIONS]
    if data_aware:
        able = sorted(m for m, e in available_methods().items()
                      if kind in e.builders and {"gram", "input_mean"} <= set(e.options(kind)))
        why = NO_DATA_AWARE_REASONS.get(method, "")
        raise TypeError(f"{context}: method {method!r} has no data-aware variant, so it takes no "
                        f"{', '.join(k + '=' for k in data_aware)}{' (' + why + ')' if why else ''}; use a data-aware "
                        f"method for this layer ({able}, e.g. 'svd' or 'tucker'), or drop "
                        f"{'/'.join(k + '=' for k in data_aware)} to decompose from the weights alone")
    if unknown:
        raise TypeError(f"{context}: unknown option(s) {unknown}; method {method!r} accepts "
                        f"{entry.options(kind)}")
    with torch.no_grad():
        return entry.builders[kind](layer, rank=rank, energy=energy, tol=tol, ratio=ratio,
                                    context=context, **options)
