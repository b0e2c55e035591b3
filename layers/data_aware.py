"""The data-aware plumbing shared by every method that fits the OUTPUT error.

A data-aware builder (registered with ``data_aware=True``) receives ``gram`` and
``input_mean`` already resolved by :func:`resolve_statistics` from what the caller
passed: ``gram=X^T X`` (``(P, P)`` or per group ``(g, P, P)``, ``P`` the row length of the
layer's weight matrix, im2col layout for convs), optionally ``input_mean=`` (then ``gram``
is the centered covariance and the bias absorbs the mean shift), or ``calibration=``
(a :class:`~layers.calibrate.Calibration`) with ``center=``. :func:`corrected_bias` is
that bias correction ``b + (W - W') mean``.
"""
from __future__ import annotations

import torch

from .fit import Fit

DATA_AWARE_OPTIONS = ("gram", "input_mean", "calibration", "center")
DATA_AWARE_DOCS = {
    "gram": "X^T X of the layer's inputs ((P, P) or per group (g, P, P)): fit the OUTPUT error",
    "input_mean": "mean input row (with gram= the centered covariance): the bias absorbs (W - W') mean",
    "calibration": "a Calibration from layers.calibrate: the layer's Gram (and mean) are read from it",
    "center": "with calibration=: use the centered covariance and correct the bias (layers with a bias)",
}


def resolve_statistics(layer, *, gram=None, input_mean=None, calibration=None, center=True, context=""):
    """``(gram, input_mean)`` to fit on: the given ones, or the layer's statistics in ``calibration``.

    With ``calibration`` and ``center`` (and a bias to absorb the mean shift) the centered
    covariance and the mean are used, else the uncentered Gram. Raises ValueError/TypeError
    for inconsistent requests (both sources, a mean without a Gram or without a bias).
    """
    if calibration is not None:
        if gram is not None or input_mean is not None:
            raise ValueError(f"{context}: pass gram=/input_mean= or calibration=, not both")
        name = calibration.name_of(layer, context)
        return calibration.statistics(name, center=bool(center) and layer.bias is not None)
    if gram is not None and not isinstance(gram, torch.Tensor):
        raise TypeError(f"{context}: gram= must be a tensor X^T X, got {type(gram).__name__}")
    if input_mean is not None:
        if gram is None:
            raise ValueError(f"{context}: input_mean= goes with gram= (the centered covariance of the inputs)")
        if layer.bias is None:
            raise ValueError(f"{context}: input_mean= corrects the bias by (W - W') mean, but the layer has no "
                             f"bias; pass the uncentered Gram X^T X without input_mean=")
    return gram, input_mean


def mean_correction(matrix, approx, input_mean, context):
    """``(W - W') mean`` per output row, flattened ``(g*m,)``; ``matrix``/``approx`` are ``(g, m, n)``."""
    W = matrix.detach().double()
    g, m, n = W.shape
    mean = torch.as_tensor(input_mean, dtype=torch.float64, device=W.device).reshape(-1, n)
    if mean.shape[0] not in (1, g):
        raise ValueError(f"{context}: input_mean of shape {tuple(input_mean.shape)} does not match the weight "
                         f"matrix of shape {tuple(W.shape)}; expected ({n},) or ({g}, {n})")
    E = W - approx.detach().double()
    return (E @ mean.expand(g, n)[..., None]).reshape(g * m)


def copy_bias(bias_param, layer_bias, matrix=None, approx=None, input_mean=None, context=""):
    """``bias_param <- layer_bias`` (+ ``(W - W') mean`` when ``input_mean`` is given)."""
    bias_param.copy_(layer_bias)
    if input_mean is not None:
        bias_param.add_(mean_correction(matrix, approx, input_mean, context).to(bias_param.dtype))


def output_fit(*, error, norm, weight_error, weight_norm, error_bound=None, **diagnostics) -> Fit:
    """The Fit of a data-aware factorization (``error_kind="output"``)."""
    return Fit(error=error, error_bound=error_bound, error_kind="output", norm=norm, weight_error=weight_error,
               weight_norm=weight_norm, diagnostics=dict(diagnostics))


__all__ = ["DATA_AWARE_OPTIONS", "DATA_AWARE_DOCS", "resolve_statistics", "mean_correction", "copy_bias",
           "output_fit"]
