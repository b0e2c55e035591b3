"""Singular-value spectra of Linear/Conv weights and the energy rank table.

``spectrum(layer)`` gives the singular values of the matrix the ``svd`` method
truncates (so the energy / tol rank rules of :mod:`decomp.rank` applied to it give the
rank ``decompose(layer, method="svd", ...)`` picks):

* ``nn.Linear`` / a raw 2-D array: the weight ``(out, in)``;
* conv, ``scheme="channel"`` (Zhang et al. 2016): per group the ``(N/g, C/g*k*k)`` matrix;
* transposed conv (``nn.ConvTranspose1d/2d/3d``, weight ``(C_in, C_out/g, k...)``): the matrices of
  the conv it is the adjoint of (:func:`layers.transposed.adjoint_conv`, ``C_out -> C_in``), the
  ones ``decompose`` factorizes for it;
* Conv2d, ``scheme="spatial"`` (Jaderberg et al. 2014): per group the ``(C/g*kh, N/g*kw)``
  matrix ``M[(c, y), (n, x)] = W[n, c, y, x]``;
* ``modes=True`` (or ``unfoldings=True``): the spectra of the mode-n unfoldings of the
  weight tensor, the quantities the Tucker rank rules work on.

``energy_table(model)`` lists, per layer, the rank each energy threshold needs and the
parameters of the factorized layer ``decompose`` would build at that rank (read off the
real layer class, built on the ``meta`` device: no formula is retyped here).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

from decomp_toolkit.decomp.rank import parse_rank_spec, select_rank
from decomp_toolkit.layers import count_params
from decomp_toolkit.layers.kinds import conv_config, is_supported, linear_config, registered_kind, standard_layer
from decomp_toolkit.layers.lowrank import SCHEMES, LowRankLinear
from decomp_toolkit.layers.transposed import adjoint_conv, is_transposed

from .tables import Table

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)
DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def _check_scheme(scheme):
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is not one of {sorted(SCHEMES)}")


def as_standard(layer):
    """The ``nn.Linear`` / ``nn.ConvNd`` / ``nn.ConvTransposeNd`` the svd method sees for ``layer``: the layer
    itself, the equivalent layer of a kind added with ``register_layer_kind`` (transformers' GPT-2 ``Conv1D``
    as the Linear of its transposed weight), or None for any other module."""
    if isinstance(layer, LAYER_TYPES):
        return layer
    if isinstance(layer, nn.Module) and registered_kind(layer) is not None and is_supported(layer):
        return standard_layer(layer)
    return None


def _weight_of(layer_or_weight, groups=None):
    """``(weight float64 cpu tensor, groups, label)`` of a layer or a raw array."""
    if isinstance(layer_or_weight, nn.Module):
        standard = as_standard(layer_or_weight)
        if standard is None:
            raise TypeError(f"spectrum() takes an nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, a layer kind "
                            f"added with register_layer_kind or an array, got {type(layer_or_weight).__name__}")
        weight = standard.weight
        groups = getattr(standard, "groups", 1)
        label = f"{type(layer_or_weight).__name__} weight {tuple(weight.shape)}"
    else:
        weight = layer_or_weight if isinstance(layer_or_weight, torch.Tensor) else torch.as_tensor(
            np.asarray(layer_or_weight))
        groups = 1 if groups is None else int(groups)
        label = f"array of shape {tuple(weight.shape)}"
    if weight.device.type == "meta":
        raise ValueError(f"{label}: the weight is on the meta device (no values); load the weights first")
    weight = weight.detach().to("cpu", torch.float64)
    if not torch.isfinite(weight).all():
        raise ValueError(f"{label}: contains NaN or Inf entries, so it has no spectrum; fix the weights first")
    if weight.ndim < 2:
        raise ValueError(f"spectrum() needs a weight with at least 2 dimensions, got the {label}")
    if weight.shape[0] % groups:
        raise ValueError(f"{label}: {weight.shape[0]} output channels are not divisible by groups={groups}")
    return weight, groups, label


def svd_matrix(layer_or_weight, scheme: str = "channel", groups=None) -> torch.Tensor:
    """The ``(g, m, n)`` float64 matrices the ``svd`` method truncates (see module docstring).

    Built by the layer classes' own ``weight_matrix`` (the code ``decompose`` runs).
    ``groups`` applies to raw conv kernels only (a conv module brings its own).
    """
    _check_scheme(scheme)
    weight, g, label = _weight_of(layer_or_weight, groups)
    if weight.ndim == 2:
        return LowRankLinear.weight_matrix(SimpleNamespace(weight=weight))
    if scheme == "spatial" and weight.ndim != 4:
        raise ValueError(f"{label}: scheme='spatial' applies to Conv2d kernels only; use scheme='channel'")
    conv = SimpleNamespace(weight=weight, groups=g, out_channels=weight.shape[0])
    return SCHEMES[scheme].weight_matrix(conv)


def unfolding_spectra(weight, modes=True) -> dict:
    """``{mode: singular values of the mode-n unfolding}`` of an N-D weight (float64, descending)."""
    W, _, label = _weight_of(weight)
    chosen = range(W.ndim) if modes is True else modes
    out = {}
    for n in chosen:
        if not -W.ndim <= n < W.ndim:
            raise ValueError(f"{label}: mode {n} does not exist (the weight has {W.ndim} modes)")
        n = n % W.ndim
        out[n] = torch.linalg.svdvals(W.movedim(n, 0).reshape(W.shape[n], -1)).numpy()
    return out


def spectrum(layer_or_weight, scheme: str = "channel", *, modes=None, unfoldings: bool = False, groups=None):
    """Singular values (numpy float64, descending) of a layer's weight as the svd method sees it.

    Shape ``(L,)``, or ``(g, L)`` (one row per group) for a grouped conv (``g > 1``): the
    svd method truncates every group at one shared rank, summing energy over groups.
    ``modes=True`` / a tuple of mode indices, or ``unfoldings=True``: instead return
    ``{mode: spectrum of the mode-n unfolding}`` of the weight tensor.
    """
    if unfoldings and modes is None:
        modes = True
    if modes is not None:
        standard = as_standard(layer_or_weight) if isinstance(layer_or_weight, nn.Module) else None
        weight = standard.weight if standard is not None else layer_or_weight
        return unfolding_spectra(weight, modes)
    s = torch.linalg.svdvals(svd_matrix(layer_or_weight, scheme, groups)).numpy()
    return s[0] if s.shape[0] == 1 else s


def energy_curve(s) -> np.ndarray:
    """Fraction of the squared Frobenius norm kept at rank k = 0..L (length L + 1).

    ``s`` is ``(L,)`` or ``(g, L)`` (energy summed over groups, as the rank rule does).
    """
    s2 = np.square(np.atleast_2d(np.asarray(s, dtype=np.float64))).sum(axis=0)
    curve = np.concatenate([[0.0], np.cumsum(s2)])
    return curve / curve[-1] if curve[-1] > 0 else np.ones_like(curve)


def named_layers(model) -> list:
    """``[(dotted name, module)]`` of the Linear/Conv layers of ``model`` (the model itself if it is one):
    every module :func:`as_standard` maps to a plain layer, registered kinds included."""
    if as_standard(model) is not None:
        return [(type(model).__name__, model)]
    return [(name, m) for name, m in model.named_modules() if name and as_standard(m) is not None]


def spectra(model, scheme: str = "channel", *, modes=None) -> dict:
    """``{layer name: spectrum(layer, scheme)}`` for every Linear/Conv layer of ``model``.

    Layers the svd method cannot factorize with this scheme are left out (depthwise convs
    for ``channel``, Conv1d/3d for ``spatial``); Linear layers always give their weight's
    spectrum. With ``modes=`` every layer gives its unfolding spectra.
    """
    _check_scheme(scheme)
    out = {}
    for name, layer in named_layers(model):
        if modes is None and _not_applicable(layer, scheme):
            continue
        try:
            out[name] = spectrum(layer, scheme, modes=modes)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return out


def _not_applicable(layer, scheme) -> str | None:
    """Why the svd method cannot factorize ``layer`` with ``scheme`` (None if it can)."""
    layer = as_standard(layer)
    if isinstance(layer, nn.Linear):
        return None
    if is_transposed(layer):
        return _not_applicable(adjoint_conv(layer), scheme)
    if scheme == "spatial" and len(layer.kernel_size) != 2:
        return "scheme='spatial' applies to Conv2d only"
    if scheme == "channel" and layer.groups > 1 and layer.in_channels // layer.groups == 1:
        return "depthwise conv: the channel scheme has nothing to factorize (try scheme='spatial')"
    return None


def svd_layer_params(layer, rank: int, scheme: str = "channel") -> int:
    """Parameters (bias included) of the svd-factorized form of ``layer`` at ``rank``.

    Read off the real module class (LowRankLinear / LowRankConv / SpatialLowRankConv)
    built on the ``meta`` device, so it is exactly ``decompose(layer, "svd", rank=rank).num_params``.
    """
    layer = as_standard(layer)
    bias = layer.bias is not None
    if is_transposed(layer):  # the adjoint's factors (no bias) + the transposed conv's own bias
        return svd_layer_params(adjoint_conv(layer), rank, scheme) + (layer.out_channels if bias else 0)
    if isinstance(layer, nn.Linear):
        module = LowRankLinear(**linear_config(layer), rank=rank, bias=bias, device="meta")
    else:
        _check_scheme(scheme)
        module = SCHEMES[scheme](**conv_config(layer), rank=rank, bias=bias, device="meta")
    return module.num_params


def _label(t) -> str:
    return f"{t:g}"


def energy_table(model, thresholds=DEFAULT_THRESHOLDS, scheme: str = "channel") -> Table:
    """Rank and parameters needed per layer to keep each energy fraction (svd method).

    One row per Linear/Conv/ConvTranspose layer: ``name``, ``type``, ``shape``, ``max_rank``,
    ``dense_params`` (weight + bias), then for each threshold ``t`` the columns
    ``rank@t`` (the rank ``decompose(layer, "svd", energy=t, scheme=scheme)`` picks: the same
    rule, :func:`decomp.rank.select_rank`) and ``params@t`` (that module's ``num_params``,
    bias included, like :class:`layers.Report`). ``scheme`` applies to conv layers.
    Layers the svd method cannot factorize get ``-`` and a note.
    """
    _check_scheme(scheme)
    specs = [parse_rank_spec(energy=t, context="energy_table threshold") for t in thresholds]
    rows, notes, over = [], [], []
    for name, layer in named_layers(model):
        row = dict(name=name, type=type(layer).__name__, shape=tuple(as_standard(layer).weight.shape), max_rank=None,
                   dense_params=count_params(layer))
        reason = _not_applicable(layer, scheme)
        if reason:
            notes.append(f"{name}: {reason}")
            row.update({f"{k}@{_label(s.value)}": None for s in specs for k in ("rank", "params")})
            rows.append(row)
            continue
        try:
            s = spectrum(layer, scheme)
        except ValueError as err:
            raise ValueError(f"energy_table: layer {name}: {err}") from err
        row["max_rank"] = max_rank = int(np.atleast_2d(s).shape[1])
        for spec in specs:
            rank = select_rank(spec, s, max_rank=max_rank)
            params = svd_layer_params(layer, rank, scheme)
            row[f"rank@{_label(spec.value)}"] = rank
            row[f"params@{_label(spec.value)}"] = params
            if params >= row["dense_params"]:
                over.append(f"{name}@{_label(spec.value)}")
        rows.append(row)
    if over:
        notes.append("not smaller than dense (compress keeps these dense): " + ", ".join(over))
    title = f"svd ranks per energy threshold (scheme={scheme!r})"
    return Table(rows, title=title, notes=notes)


__all__ = ["spectrum", "spectra", "svd_matrix", "unfolding_spectra", "energy_curve", "energy_table",
           "named_layers", "svd_layer_params", "as_standard", "LAYER_TYPES"]
