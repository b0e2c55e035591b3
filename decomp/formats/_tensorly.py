"""Array conversion between our factor formats and tensorly's (any tensorly backend)."""
from __future__ import annotations

import numpy as np
import torch

from .._backend import to_torch


def tensorly():
    """The tensorly module (imported on first use: converting is the only thing that needs it)."""
    import tensorly as tl
    return tl


def to_backend(array):
    """A numpy array / torch tensor as a tensor of tensorly's active backend (values unchanged)."""
    tl = tensorly()
    if tl.get_backend() == "pytorch":
        return tl.tensor(to_torch(array))
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return tl.tensor(np.asarray(array))


def from_backend(array):
    """A tensorly backend tensor as a numpy array or torch tensor (the kinds our formats hold)."""
    if isinstance(array, (np.ndarray, torch.Tensor)):
        return array
    return tensorly().to_numpy(array)


def measure_against(factors, reference):
    """Set ``factors.error`` / ``factors.norm`` from the array ``reference`` the factors approximate.

    Without a reference both stay None (nothing is known about the original array).
    """
    if reference is not None:
        ref = to_torch(reference).double()
        approx = to_torch(factors.to_tensor()).double().to(ref.device)
        factors.error = float((ref - approx).norm())
        factors.norm = float(ref.norm())
    return factors


def check_type(obj, expected, what: str):
    if not isinstance(obj, expected):
        raise TypeError(f"from_tensorly: expected a {what}, got {type(obj).__name__}")
