"""``module.fit``: the one record of what a factorization achieved.

Every module :func:`~layers.decompose` returns carries a :class:`Fit`. Errors are
Frobenius norms of the kind ``error_kind`` names:

* ``"weight"``: ``||W - W'||_F`` (``norm = ||W||_F``);
* ``"output"`` (data-aware fits): ``||(W - W') X^T||_F`` on the calibration inputs ``X``
  (``norm = ||W X^T||_F``); ``weight_error`` / ``weight_norm`` still give the weight error.

``error`` is MEASURED (None when not measured); ``error_bound`` is a CERTIFIED upper bound
(Eckart–Young for SVD, HOSVD / TT-SVD theorems, the whitened SVD's output bound) and None
for methods that certify nothing (CP, BTD, PQ, Toeplitz/circulant, data-aware Tucker/PQ).
``diagnostics`` holds method-specific details (ALS histories, k-means histories, the
whitening used, timing of ``optimize="speed"``, ...); its keys are listed per method in
the method modules' docstrings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from decomp_toolkit.decomp.formats.base import RelativeErrors, relative_to

ERROR_KINDS = ("weight", "output")


@dataclass
class Fit(RelativeErrors):
    """What one factorization achieved (see the module docstring)."""

    method: str = ""
    spec: object = None            # the decomp.rank.RankSpec it was asked for (None: no rank spec)
    ranks: object = None           # the ranks it got (the module's ``rank``)
    error: float | None = None
    error_bound: float | None = None
    error_kind: str = "weight"
    norm: float | None = None
    weight_error: float | None = None
    weight_norm: float | None = None
    speedup: float | None = None   # dense time / factorized time under optimize="speed", else None
    diagnostics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.error_kind not in ERROR_KINDS:
            raise ValueError(f"Fit.error_kind={self.error_kind!r} is not one of {ERROR_KINDS}")

    @property
    def relative_weight_error(self) -> float | None:
        return relative_to(self.weight_error, self.weight_norm)


def root_sum_squares(values):
    """``sqrt(sum v^2)`` of per-group errors; None if any is None."""
    values = list(values)
    if any(v is None for v in values):
        return None
    return math.sqrt(sum(float(v) ** 2 for v in values))


def _measured(factors):
    return getattr(factors, "error", None)


def weight_fit(factors_list, **diagnostics) -> Fit:
    """The weight-error Fit of one factor object per group (root sums of squares over groups)."""
    factors_list = list(factors_list)
    norm = root_sum_squares(f.norm for f in factors_list)
    return Fit(error=root_sum_squares(_measured(f) for f in factors_list),
               error_bound=root_sum_squares(f.error_bound for f in factors_list),
               norm=norm, weight_norm=norm, diagnostics=dict(diagnostics))


def check_factors(factors, expected_type, shapes, context):
    """TypeError unless ``factors`` is an ``expected_type``; ValueError unless its ``shape`` is one of ``shapes``."""
    if not isinstance(factors, expected_type):
        raise TypeError(f"{context}: factors= must be a {expected_type.__name__} (or its tensorly equivalent), "
                        f"got {type(factors).__name__}")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    if tuple(factors.shape) not in shapes:
        raise ValueError(f"{context}: factors= of shape {tuple(factors.shape)} do not fit this layer; expected "
                         f"{' or '.join(str(s) for s in shapes)}")


def spec_kwargs(spec) -> dict:
    """The ``rank=/energy=/tol=/ratio=`` keyword a :mod:`decomp` function takes for a RankSpec."""
    if spec is None:
        return {}
    if spec.kind == "vbmf":
        return {"rank": "vbmf"}
    return {spec.kind: spec.value}


__all__ = ["Fit", "ERROR_KINDS", "weight_fit", "root_sum_squares", "spec_kwargs", "check_factors"]
