"""Array plumbing shared by every decomposition: numpy or torch in, same kind out.

All math runs on torch tensors in a compute dtype (float64 by default); results are
converted back to the caller's array kind and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_COMPUTE_DTYPE = torch.float64


@dataclass(frozen=True)
class ArrayKind:
    """Remembers what the caller passed, so results come back the same way."""

    is_numpy: bool
    dtype: object  # numpy dtype or torch dtype
    device: torch.device

    def restore(self, tensor: torch.Tensor):
        """Convert a compute tensor back to the caller's kind, dtype and device."""
        if self.is_numpy:
            return tensor.detach().cpu().numpy().astype(self.dtype, copy=False)
        return tensor.detach().to(device=self.device, dtype=self.dtype)


def describe(array) -> str:
    """Short description of an array for error messages."""
    kind = "numpy array" if isinstance(array, np.ndarray) else "tensor"
    return f"{kind} of shape {tuple(array.shape)}"


def as_compute_tensor(array, *, name: str = "input", ndim=None, compute_dtype=None):
    """Validate ``array`` and return ``(tensor, kind)``.

    ``tensor`` is a detached torch tensor in ``compute_dtype`` (float64 by default);
    ``kind`` restores results to the input's array type. Raises TypeError for
    non-arrays and integer/complex data, ValueError for a wrong number of
    dimensions, empty arrays and NaN/Inf entries.
    """
    if isinstance(array, np.ndarray):
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{name}: expected a floating-point array, got dtype {array.dtype}")
        kind = ArrayKind(True, array.dtype, torch.device("cpu"))
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    elif isinstance(array, torch.Tensor):
        if array.layout != torch.strided:
            raise TypeError(f"{name}: got a {array.layout} tensor of shape {tuple(array.shape)}; pass a dense "
                            f"tensor (tensor.to_dense())")
        if array.device.type == "meta":
            raise ValueError(f"{name}: got a meta-device tensor of shape {tuple(array.shape)}, which holds no "
                             f"values; load the data first")
        if not array.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {array.dtype}")
        kind = ArrayKind(False, array.dtype, array.device)
        tensor = array.detach()
    else:
        raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(array).__name__}")
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and tensor.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name}: expected a {want} array, got {describe(array)}")
    if tensor.numel() == 0:
        raise ValueError(f"{name}: got an empty {describe(array)}")
    tensor = tensor.to(compute_dtype or DEFAULT_COMPUTE_DTYPE)
    if not all_finite(tensor):
        raise ValueError(f"{name}: {describe(array)} contains NaN or Inf entries")
    return tensor, kind


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite: one reduction (a finite sum has finite terms), the
    entrywise test only when the sum is not finite (NaN/Inf, or finite entries whose sum overflows)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def times_power_of_two(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """``tensor * 2**exponent``, exact (in steps small enough never to overflow the factor itself)."""
    while exponent > 1000:
        tensor, exponent = tensor * 2.0 ** 1000, exponent - 1000
    while exponent < -1000:
        tensor, exponent = tensor * 2.0 ** -1000, exponent + 1000
    return tensor * 2.0 ** exponent if exponent else tensor


def unit_scale(tensor: torch.Tensor, even: bool = False) -> tuple:
    """``(tensor / 2**e, e)`` with the largest magnitude in [1, 2) (or [1, 4) when ``even``: e even).

    Dividing by a power of two is exact, so squares (norms, Grams, energies) of the result
    neither overflow nor underflow for data anywhere in float64's range (1e-300 .. 1e300);
    multiply what was computed from it by ``2**e`` (``2**(e/2)`` for square roots).
    """
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return tensor, 0
    exponent = math.frexp(peak)[1] - 1
    if even and exponent % 2:
        exponent -= 1
    return times_power_of_two(tensor, -exponent), exponent


def to_torch(array) -> torch.Tensor:
    """View a numpy array or tensor as a torch tensor (no copy where possible)."""
    if isinstance(array, np.ndarray):
        return torch.from_numpy(array)
    return array


def in_kind_of(result: torch.Tensor, like):
    """The torch ``result`` in the array kind (numpy / torch), dtype and device of ``like``."""
    if isinstance(like, np.ndarray):
        return result.detach().cpu().numpy().astype(like.dtype, copy=False)
    return result.to(device=like.device, dtype=like.dtype)


def make_generator(random_state, device=None) -> torch.Generator:
    """The torch.Generator of a ``random_state``: an int seed, an existing Generator, or None.

    This is the one place where ``random_state`` is interpreted, for every function of
    :mod:`decomp` that draws random numbers. Deviation from scikit-learn: ``None`` means
    seed 0, not a fresh non-deterministic stream, so that every decomposition (and every
    layer built from one) is reproducible by default. Pass a ``torch.Generator`` to draw
    from your own stream (it is used, and advanced, as given).
    """
    if isinstance(random_state, torch.Generator):
        return random_state
    if random_state is not None and not isinstance(random_state, (int, np.integer)):
        raise TypeError(f"random_state must be an int, a torch.Generator or None, got {type(random_state).__name__}")
    generator = torch.Generator(device=device or "cpu")
    generator.manual_seed(int(random_state) if random_state is not None else 0)
    return generator


def check_iteration_options(where: str, n_iter_max, convergence_tol, init, inits) -> None:
    """Validate the options shared by the iterative (ALS) methods; ValueError naming ``where``."""
    if not isinstance(n_iter_max, (int, np.integer)) or isinstance(n_iter_max, bool) or n_iter_max < 1:
        raise ValueError(f"{where}: n_iter_max={n_iter_max!r} must be an int >= 1")
    if isinstance(convergence_tol, bool) or not isinstance(convergence_tol, (int, float)) or not convergence_tol >= 0:
        raise ValueError(f"{where}: convergence_tol={convergence_tol!r} must be a number >= 0")
    if init not in inits:
        raise ValueError(f"{where}: init={init!r} is not one of {inits}")
