"""``compress(model, ...)``: factorize every matching layer of a model."""
from __future__ import annotations

import copy
import fnmatch

import torch
import torch.nn as nn

from ._accounting import CONV_TYPES, layer_macs
from ._validate import TRANSPOSED_TYPES
from .decompose import decompose
from .report import LayerRecord, Report

CANDIDATE_TYPES = (nn.Linear,) + CONV_TYPES + TRANSPOSED_TYPES


def _matches(name, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _policy_for(name, policy, default):
    """First policy entry whose pattern matches ``name`` (dict order), else the default."""
    for pattern, settings in (policy or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return dict(settings)
    return dict(default) if default is not None else None


def record_input_shapes(model, example_input, names) -> dict:
    """Input shape of each named module for one forward of ``example_input`` (forward hooks)."""
    shapes, hooks = {}, []
    modules = dict(model.named_modules())

    def remember(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_hook(remember(name)))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _set_submodule(model, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _relative_error(original, factorized):
    weight = original.weight.detach().double()
    approx = factorized.dense_weight().detach().double()
    norm = float(weight.norm())
    return float((weight - approx).norm()) / norm if norm > 0 else 0.0


def _relative_bound(factorized):
    bound, norm = getattr(factorized, "error_bound", None), getattr(factorized, "weight_norm", None)
    if bound is None or norm is None:
        return None
    return bound / norm if norm > 0 else 0.0


def compress(model, method="svd", *, rank=None, energy=None, tol=None, ratio=None, include=("*",),
             exclude=(), policy=None, example_input=None, inplace=False, progress=True, **options):
    """Factorize the Linear/Conv layers of ``model``; returns ``(compressed_model, Report)``.

    ``include``/``exclude``: fnmatch patterns on dotted module names. ``policy``: an
    ordered ``{pattern: dict(method=..., rank/energy/tol/ratio=..., **options)}``; the
    first matching pattern wins and layers matching none use the top-level method and
    spec. A layer whose factorized form would not hold fewer parameters is left dense,
    with the reason in the report. ``example_input`` (a tensor or tuple) lets the report
    count FLOPs. ``model`` is deep-copied unless ``inplace=True``.
    """
    default = dict(method=method, rank=rank, energy=energy, tol=tol, ratio=ratio, **options)
    target = model if inplace else copy.deepcopy(model)
    candidates = [(n, m) for n, m in target.named_modules() if isinstance(m, CANDIDATE_TYPES) and n]
    shapes = record_input_shapes(target, example_input, [n for n, _ in candidates]) if example_input is not None else {}
    report = Report(model_params_before=sum(p.numel() for p in model.parameters()))
    for name, layer in _progress(candidates, progress):
        record = LayerRecord(name=name, type=type(layer).__name__, shape=tuple(layer.weight.shape),
                             params_before=sum(p.numel() for p in layer.parameters()))
        record.params_after = record.params_before
        if name in shapes:
            record.flops_before = record.flops_after = layer_macs(layer, shapes[name])[0]
        settings = _policy_for(name, policy, default if _matches(name, include) else None)
        if settings is None or (_matches(name, exclude) and not _matches(name, (policy or {}).keys())):
            record.status = "skipped: excluded"
        else:
            _replace_layer(target, name, layer, settings, record, shapes.get(name))
        report.layers.append(record)
    report.model_params_after = sum(p.numel() for p in target.parameters())
    return target, report


def _replace_layer(model, name, layer, settings, record, input_shape):
    record.method = settings.get("method", "svd")
    settings = {k: v for k, v in settings.items() if v is not None}
    if isinstance(layer, TRANSPOSED_TYPES):
        record.status = "skipped: transposed convolutions are not supported"
        return
    try:
        factorized = decompose(layer, name=name, **settings)
    except ValueError as err:  # the request cannot be met for this layer: keep it dense, say why
        reason = str(err)
        record.status = "skipped: " + (reason.split(": ", 1)[1] if reason.startswith(name) else reason)
        return
    if factorized.num_params >= record.params_before:
        record.status = (f"skipped: factorized form has {factorized.num_params:,} parameters, "
                         f"not fewer than the dense {record.params_before:,}")
        return
    record.rank = getattr(factorized, "rank", None)
    record.params_after = factorized.num_params
    record.rel_error = _relative_error(layer, factorized)
    record.rel_error_bound = _relative_bound(factorized)
    if input_shape is not None:
        record.flops_after = factorized.flops(input_shape)
    _set_submodule(model, name, factorized)


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc="compress", unit="layer", leave=False)
