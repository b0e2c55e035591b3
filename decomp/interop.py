"""Conversion to and from tensorly's decomposition classes (every format tensorly has).

==========================  ===========================================
ours                        tensorly
==========================  ===========================================
:class:`CPFactors`          ``tensorly.cp_tensor.CPTensor``
:class:`TuckerFactors`      ``tensorly.tucker_tensor.TuckerTensor``
:class:`TTFactors`          ``tensorly.tt_tensor.TTTensor``
:class:`TTMatrixFactors`    ``tensorly.tt_matrix.TTMatrix``
==========================  ===========================================

Conversions keep every array value (a round trip is exact); arrays are handed to tensorly's
active backend and come back as numpy arrays (or torch tensors with the pytorch backend).
A partial Tucker gets identity factors on the modes it leaves whole.
"""
from __future__ import annotations

from .formats import CPFactors, Factorization, TTFactors, TTMatrixFactors, TuckerFactors
from .formats._tensorly import tensorly

CONVERTIBLE = (CPFactors, TuckerFactors, TTFactors, TTMatrixFactors)


def to_tensorly(factors: Factorization):
    """The tensorly object of ``factors`` (see the module table); TypeError for formats tensorly lacks."""
    if not isinstance(factors, CONVERTIBLE):
        raise TypeError(f"to_tensorly: {type(factors).__name__} has no tensorly equivalent; convertible: "
                        f"{[c.__name__ for c in CONVERTIBLE]}")
    return factors.to_tensorly()


def from_tensorly(decomposition, *, reference=None) -> Factorization:
    """Our factor object for a tensorly ``CPTensor`` / ``TuckerTensor`` / ``TTTensor`` / ``TTMatrix``.

    ``reference``: the array the decomposition approximates; when given, ``error`` and
    ``norm`` are measured against it (otherwise both are None). ``error_bound`` is None:
    nothing certifies a decomposition computed elsewhere.
    """
    tl = tensorly()
    kinds = ((tl.cp_tensor.CPTensor, CPFactors), (tl.tucker_tensor.TuckerTensor, TuckerFactors),
             (tl.tt_matrix.TTMatrix, TTMatrixFactors), (tl.tt_tensor.TTTensor, TTFactors))
    for tensorly_class, ours in kinds:
        if isinstance(decomposition, tensorly_class):
            return ours.from_tensorly(decomposition, reference=reference)
    raise TypeError(f"from_tensorly: expected a tensorly CPTensor, TuckerTensor, TTTensor or TTMatrix, got "
                    f"{type(decomposition).__name__}")


__all__ = ["to_tensorly", "from_tensorly", "CONVERTIBLE"]
