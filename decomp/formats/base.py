"""The protocol every factor object (the result of a decomposition) implements.

* ``shape``        shape of the approximated array (batch dimensions included);
* ``rank``         the rank(s) kept (int, or a tuple per mode / per bond; None where the
                   format has no rank);
* ``num_params``   number of stored numbers needed to apply the factorization;
* ``error``        the measured ``||A - to_tensor()||_F`` (exact, a posteriori), or None
                   where it was not measured (e.g. factors imported from tensorly without
                   the reference array);
* ``error_bound``  a certified upper bound on ``||A - to_tensor()||_F`` guaranteed by a
                   theorem (Eckart–Young, the HOSVD and TT-SVD bounds, ...), or None where
                   the method has no such guarantee (CP, BTD, PQ, projections, data-aware
                   refits: these report their measured ``error`` only);
* ``norm``         ``||A||_F`` of the input (None when unknown), so ``relative_error`` and
                   ``relative_error_bound`` can be formed;
* ``to_tensor()``  the reconstruction, the same array kind (numpy / torch) and dtype as
                   the factors.

Data-aware formats measure ``error``, ``error_bound`` and ``norm`` on the layer's OUTPUTS
(``||(W - W') X^T||_F`` and ``||W X^T||_F``); their docstrings say so.
Factors are stored in the caller's array kind and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._backend import to_torch


def relative_to(value, norm) -> float | None:
    """``value / norm`` as a float (0 for a zero norm), or None when either is unknown."""
    if value is None or norm is None:
        return None
    return float(value) / float(norm) if norm > 0 else 0.0


class RelativeErrors:
    """``relative_error`` / ``relative_error_bound`` of anything with ``error``, ``error_bound`` and ``norm``
    (the factor objects here and the layers' fit record)."""

    @property
    def relative_error(self) -> float | None:
        """``error / norm`` (measured), or None when either is unknown."""
        return relative_to(self.error, self.norm)

    @property
    def relative_error_bound(self) -> float | None:
        """``error_bound / norm`` (certified), or None without a certified bound."""
        return relative_to(self.error_bound, self.norm)


def _fmt(value) -> str:
    return "None" if value is None else f"{value:.4g}"


class Factorization(RelativeErrors):
    """Base class of all factor objects (see the module docstring for the protocol)."""

    shape: tuple
    norm: float | None
    error: float | None
    error_bound: float | None

    @property
    def num_params(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_tensor(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def dense_params(self) -> int:
        """Number of entries of the dense array."""
        return math.prod(self.shape)

    @property
    def compression(self) -> float:
        """dense_params / num_params (> 1 means smaller than dense)."""
        return self.dense_params / self.num_params

    def relative_error_to(self, reference) -> float:
        """Measured ``||reference - to_tensor()||_F / ||reference||_F`` (float64)."""
        ref = to_torch(reference).double()
        approx = to_torch(self.to_tensor()).double().to(ref.device)
        denom = float(ref.norm())
        return float((ref - approx).norm()) / denom if denom > 0 else float(approx.norm())

    def _repr_fields(self) -> dict:
        """What ``repr`` shows besides num_params, error and error_bound."""
        return dict(shape=self.shape, rank=self.rank)

    def __repr__(self):
        shown = [f"{k}={v!r}" for k, v in {**self._repr_fields(), "num_params": self.num_params}.items()]
        shown += [f"error={_fmt(self.error)}", f"error_bound={_fmt(self.error_bound)}"]
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(repr=False)
class MeasuredFactorization(Factorization):
    """A format whose methods certify no bound: ``error`` (measured) and ``norm`` are keyword
    fields, ``error_bound`` is always None."""

    error: float | None = field(kw_only=True)
    norm: float | None = field(kw_only=True)
    error_bound: None = field(default=None, init=False)
