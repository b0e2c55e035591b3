"""The exceptions of :mod:`decomp_toolkit.layers`.

Two kinds of failure are kept apart:

* a wrong request (unknown method, misspelt option, invalid rank spec, wrong type): ``ValueError`` /
  ``TypeError``, raised before any work, by :func:`decompose` and :func:`compress` alike;
* "this method cannot (or should not) factorize this layer" (a depthwise conv for Tucker, a rank above what the
  layer's shape allows, a tied weight...): :class:`UnsupportedLayerError`. ``compress`` turns exactly these into
  a "kept dense: <reason>" row of its report and goes on with the other layers.
"""
from __future__ import annotations


class UnsupportedLayerError(ValueError):
    """This method cannot (or should not) factorize this layer; ``compress`` keeps the layer dense.

    ``layer`` is the layer's name (or label), ``reason`` the sentence the report shows; ``message`` (default
    ``"layer: reason"``) the full text, e.g. with the request and shape in front of the reason.
    """

    def __init__(self, layer: str, reason: str, message: str | None = None):
        self.layer, self.reason = layer, reason
        super().__init__(message or (f"{layer}: {reason}" if layer else reason))
