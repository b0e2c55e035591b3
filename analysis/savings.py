"""What a method can save, per layer, at a given error: ``savings_table(model, example_input, tol=0.1)``.

For every Linear/Conv layer the method is asked for the cheapest factorization whose
relative weight error is at most ``tol`` (``compress(..., tol=tol)``: certified for SVD,
Tucker, TT); the table lists the parameters and MACs it would save, or why the layer cannot
shrink at that error (a depthwise conv has no low-rank structure to exploit; a 1x1
bottleneck whose rank at ``tol`` is close to full is not cheaper factorized). The totals
say which fraction of the model's parameters and Linear/Conv MACs the method could remove
at that error, and a note flags a model where that is small, so a user sees that low rank
is the wrong tool (e.g. MobileNetV2) before compressing it anyway.
"""
from __future__ import annotations

from decomp_toolkit.layers import compress

from .tables import Table

LITTLE = 0.1  # below this fraction of MACs saved the note says low rank is the wrong tool


def savings_table(model, example_input, *, method="svd", tol=0.1, calibration=None, **options) -> Table:
    """Per-layer ``params``/``MACs`` before, saved at relative error ``tol``, and why not when nothing is saved.

    ``example_input``: one forward's input (counts the MACs). ``calibration``: measure the
    error on the layers' outputs instead of their weights (see :func:`layers.calibrate`).
    ``options`` go to :func:`layers.compress`. ``model`` is not modified.
    """
    if not 0 < tol < 1:
        raise ValueError(f"tol={tol!r}: pass a relative error in (0, 1)")
    _, report = compress(model, method=method, tol=tol, example_input=example_input, calibration=calibration,
                         progress=False, **options)
    rows = []
    for r in report.layers:
        saved_params = r.params_before - r.params_after
        saved_macs = (r.flops_before - r.flops_after) if r.flops_before is not None else None
        rows.append(dict(layer=r.name, type=r.type, shape=r.shape, params=r.params_before, macs=r.flops_before,
                         rank=r.rank if r.replaced else None, saved_params=saved_params, saved_macs=saved_macs,
                         saved_macs_frac=(saved_macs / r.flops_before) if r.flops_before else None,
                         why_not=None if r.replaced else r.status.replace("skipped: ", "")))
    totals = report.totals()
    macs_before = totals.get("flops_before")
    macs_saved = macs_before - totals["flops_after"] if macs_before else None
    params_frac = (totals["model_params_before"] - totals["model_params_after"]) / totals["model_params_before"]
    title = f"{method} savings at relative error <= {tol:g}"
    notes = [f"model parameters saved: {params_frac:.1%}"
             + (f"; Linear/Conv MACs saved: {macs_saved / macs_before:.1%}" if macs_before else "")]
    dense = [r for r in rows if r["why_not"] is not None]
    if dense:
        notes.append(f"{len(dense)} of {len(rows)} layers cannot shrink at this error")
    if macs_before and macs_saved / macs_before < LITTLE:
        notes.append(f"{method} saves under {LITTLE:.0%} of the MACs at this error: low rank is the wrong tool for "
                     f"this model (depthwise / thin layers); consider pruning, quantization or a smaller architecture")
    return Table(rows, title=title, notes=notes)


__all__ = ["savings_table"]
