"""``decompose(layer, method=..., **rank_spec)``: one layer in, one factorized layer out.

Validation happens here, once, against the registry (:mod:`layers.registry`): the method,
the layer kind, the option names, the data-aware options and the rank specification
(parsed into ONE :class:`~decomp.rank.RankSpec` that the builder receives). A wrong request
raises ValueError/TypeError before any work; "this method cannot (or should not) factorize
this layer" raises :class:`~layers.errors.UnsupportedLayerError`.
"""
from __future__ import annotations

import warnings

import torch

from decomp_toolkit.decomp import Factorization, from_tensorly
from decomp_toolkit.decomp.rank import InfeasibleRankError, parse_rank_spec

from ._modules import carry_marks
from .data_aware import DATA_AWARE_OPTIONS, resolve_statistics
from .errors import UnsupportedLayerError
from .fit import Fit
from .kinds import kind_name, layer_kind, layer_label, standard_layer, without_reparametrization
from .registry import available_methods, get_method, methods_for
from .speed import SPEED_OPTIONS, optimize_for_speed
from .transposed import decompose_transposed, is_transposed

SPEC_NAMES = ("rank", "energy", "tol", "ratio")


def describe_request(method, spec: dict) -> str:
    """``"method='svd', rank=4"`` (or ``"no rank spec"``) for messages."""
    asked = ", ".join(f"{k}={v!r}" for k, v in spec.items() if v is not None) or "no rank spec"
    return f"method={method!r}, {asked}"


def parse_spec(entry, spec: dict, context: str = ""):
    """The one RankSpec of ``spec`` (``{rank/energy/tol/ratio: value}``) for method ``entry``; None if it takes none.

    Raises ValueError/TypeError naming what the method accepts instead.
    """
    given = {k: v for k, v in spec.items() if v is not None}
    prefix = f"{context}: " if context else ""
    refused = [k for k in given if _kind_of(k, given[k]) not in entry.spec_kinds]
    if refused and entry.spec_refusal:
        kind = "rank='vbmf'" if _kind_of(refused[0], given[refused[0]]) == "vbmf" else f"{refused[0]}="
        raise ValueError(prefix + entry.spec_refusal.format(kind=kind, given="/".join(f"{k}=" for k in given)))
    if not given and not entry.spec_required:
        return None
    return parse_rank_spec(**given, allowed=entry.spec_kinds, allow_tuple=entry.rank_tuples, context=context)


def _kind_of(name, value):
    return "vbmf" if name == "rank" and isinstance(value, str) and value == "vbmf" else name


def check_options(entry, options, kind=None, context: str = ""):
    """TypeError for options the method (for layers of ``kind``; any kind when None) does not take."""
    accepted = entry.options(kind) if kind is not None else entry.all_options()
    unknown = sorted(set(options) - set(accepted))
    data_aware = [k for k in unknown if k in DATA_AWARE_OPTIONS]
    if data_aware:
        able = [m for m, e in available_methods().items() if e.data_aware and (kind is None or kind in e.builders)]
        why = f" ({entry.no_data_aware_reason})" if entry.no_data_aware_reason else ""
        raise TypeError(f"{context}: method {entry.name!r} has no data-aware variant, so it takes no "
                        f"{', '.join(k + '=' for k in data_aware)}{why}; use a data-aware method for this layer "
                        f"({sorted(able)}, e.g. 'svd' or 'tucker'), or drop {'/'.join(k + '=' for k in data_aware)} "
                        f"to decompose from the weights alone")
    if unknown:
        raise TypeError(f"{context}: unknown option(s) {unknown}; method {entry.name!r} accepts {accepted}")


def check_request(method, spec: dict, options: dict, context: str = ""):
    """Validate a request independently of any layer (what ``compress`` checks before any work).

    Returns ``(MethodEntry, RankSpec | None)``.
    """
    entry = get_method(method, context)
    check_options(entry, options, None, context)
    return entry, parse_spec(entry, spec, context)


def decompose(layer, method: str = "svd", *, rank=None, energy=None, tol=None, ratio=None, name=None, factors=None,
              **options):
    """Replace one ``nn.Linear`` / ``nn.Conv1d/2d/3d`` (or registered layer kind) by its factorized equivalent;
    an ``nn.ConvTranspose1d/2d/3d`` goes through the conv it is the adjoint of (:mod:`layers.transposed`). A
    layer with a parametrization (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.parametrize``) is factorized
    from its effective weight, as its eval-mode forward uses it; the returned layer holds no parametrization.

    Pass exactly one of ``rank`` (int, per-mode tuple, or ``"vbmf"``), ``energy``,
    ``tol``, ``ratio`` (see :mod:`decomp.rank`; what each method accepts is in the table
    below); ``options`` are method-specific (table below). ``name`` is used in error
    messages. ``factors=`` (a tensorly decomposition or a :mod:`decomp` factor object
    computed elsewhere, instead of a rank spec) builds the layer from those factors, for
    the methods that register a ``from_factors`` builder. The returned module has the
    same call signature, keeps bias, stride, padding (mode), dilation, groups, dtype and
    device, and carries ``module.fit``
    (:class:`~layers.fit.Fit`: errors, bound, ranks, diagnostics); ``layer`` is not
    modified. A wrong request raises ValueError/TypeError naming the layer, its shape and
    the request; a layer this method cannot or should not factorize raises
    :class:`~layers.errors.UnsupportedLayerError` (a ValueError).

    Methods (generated from the registry, :func:`available_methods`)::

    {methods}
    """
    spec_given = dict(rank=rank, energy=energy, tol=tol, ratio=ratio)
    layer = without_reparametrization(layer)  # weight_norm / spectral_norm / parametrize: its effective weight
    if is_transposed(layer):   # through the conv it is the adjoint of (layers.transposed)
        if factors is not None:
            raise TypeError(f"{layer_label(layer, name)}: factors= is not supported for transposed convs; pass a "
                            f"rank spec")
        return carry_marks(layer, decompose_transposed(layer, decompose, method, spec_given, name, **options))
    kind = layer_kind(layer, name)
    label = layer_label(layer, name)
    context = f"{label} with {describe_request(method, spec_given)}"
    entry = get_method(method, context)
    if factors is not None:
        _check_kind(entry, kind, label)
        return carry_marks(layer, _from_factors(entry, kind, layer, factors, spec_given, options, context))
    speed = {k: options.pop(k) for k in SPEED_OPTIONS if k in options}
    supported = kind in entry.builders and kind not in entry.unsupported
    check_options(entry, options, kind if supported else None, context)
    spec = parse_spec(entry, spec_given, context)
    _check_kind(entry, kind, label)  # a valid request this method refuses for this layer kind
    standard = standard_layer(layer)
    if entry.data_aware:
        options = _resolve_data(standard, options, context)

    def build(rank_spec):
        with torch.no_grad():
            try:
                module = entry.builders[kind](standard, rank_spec, context=context, **options)
            except InfeasibleRankError as err:
                raise UnsupportedLayerError(label, err.reason, str(err)) from err
            _complete_fit(module, standard, method, rank_spec)
        return module

    def rebuild(rank):  # optimize="speed": the same request at a rank the kernels like
        return build(parse_spec(entry, dict(rank=rank), context))
    built = optimize_for_speed(build(spec), standard, **speed, context=context,
                               rebuild=rebuild if "rank" in entry.spec_kinds else None)
    reason = worse_than_zero(built.fit)
    if reason is not None:
        warnings.warn(f"{context}: {reason}", WorseThanZeroWarning, stacklevel=2)
    return carry_marks(layer, built)


class WorseThanZeroWarning(UserWarning):
    """A factorized layer whose fit is worse than a zero weight (relative error >= 1)."""


def worse_than_zero(fit) -> str | None:
    """Why ``fit`` is worse than no layer at all (a relative error >= 1: a zero weight does as well), or None."""
    relative = fit.relative_error
    if relative is None or relative < 1.0:
        return None
    return (f"the fit's relative {fit.error_kind} error is {relative:.3g} >= 1, worse than a zero weight (the "
            f"method cannot represent this layer at this size)")


def _check_kind(entry, kind, label):
    """UnsupportedLayerError when method ``entry`` refuses, or has no builder for, layers of ``kind``."""
    if kind in entry.unsupported:
        raise UnsupportedLayerError(label, f"method={entry.name!r}: {entry.unsupported[kind]}")
    if kind not in entry.builders:
        raise UnsupportedLayerError(label, f"method={entry.name!r} does not support {kind_name(kind)} layers; "
                                           f"methods that do: {methods_for(kind)}")


def _from_factors(entry, kind, layer, factors, spec_given, options, context):
    """``decompose(..., factors=)``: the method's layer from given factors (no rank spec, no options)."""
    given = [k for k, v in spec_given.items() if v is not None] + sorted(options)
    if given:
        raise TypeError(f"{context}: factors= fixes the factorization; drop {', '.join(k + '=' for k in given)}")
    if kind not in entry.from_factors:
        able = sorted(m for m, e in available_methods().items() if kind in e.from_factors)
        raise TypeError(f"{context}: method {entry.name!r} cannot be built from given factors for "
                        f"{kind_name(kind)} layers; methods that can: {able}")
    if not isinstance(factors, Factorization):  # a tensorly decomposition
        factors = from_tensorly(factors)
    standard = standard_layer(layer)
    with torch.no_grad():
        module = entry.from_factors[kind](standard, factors, context=context)
        _complete_fit(module, standard, entry.name, None)
    return module


def _resolve_data(layer, options, context):
    """Replace calibration=/center= by the resolved ``gram``/``input_mean`` (layers.data_aware)."""
    given = {k: options.pop(k) for k in DATA_AWARE_OPTIONS if k in options}
    gram, input_mean = resolve_statistics(layer, **given, context=context)
    return dict(options, gram=gram, input_mean=input_mean)


def _complete_fit(module, layer, method, spec):
    """Fill the fields every fit has: method, spec, ranks and the measured weight error."""
    fit = module.fit if isinstance(getattr(module, "fit", None), Fit) else Fit()
    fit.method, fit.spec, fit.ranks = method, spec, getattr(module, "rank", None)
    weight = layer.weight.detach().double()
    fit.weight_error = float(torch.linalg.norm(weight - module.dense_weight().detach().double()))
    fit.weight_norm = float(torch.linalg.norm(weight))
    if fit.error_kind == "weight":
        fit.norm = fit.weight_norm
        if fit.error is None:
            fit.error = fit.weight_error
    module.fit = fit


__all__ = ["decompose", "check_request", "parse_spec", "check_options", "describe_request"]
