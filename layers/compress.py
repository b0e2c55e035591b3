"""``compress(model, ...)``: factorize every matching layer of a model."""
from __future__ import annotations

import copy
import fnmatch

import torch
import torch.nn as nn

from ._accounting import CONV_TYPES, count_params, layer_macs
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
    if getattr(factorized, "error_kind", "weight") == "output":  # data-aware: relative OUTPUT error
        norm = getattr(factorized, "output_norm", None)
    if bound is None or norm is None:
        return None
    return bound / norm if norm > 0 else 0.0


def compress(model, method="svd", *, rank=None, energy=None, tol=None, ratio=None, budget=None, include=("*",),
             exclude=(), policy=None, example_input=None, inplace=False, progress=True, calibration=None,
             **options):
    """Factorize the Linear/Conv layers of ``model``; returns ``(compressed_model, Report)``.

    ``include``/``exclude``: fnmatch patterns on dotted module names. ``policy``: an
    ordered ``{pattern: dict(method=..., rank/energy/tol/ratio=..., **options)}``; the
    first matching pattern wins and layers matching none use the top-level method and
    spec. ``budget=dict(params=f)`` or ``dict(flops=f)`` replaces the rank spec: ranks
    are allocated globally (Zhang et al. 2016's greedy rule, :mod:`layers.budget`) so
    that the whole model keeps at most the fraction ``f`` of its parameters (or of the
    MACs of its Linear/Conv layers, which needs ``example_input``) while keeping the
    most energy; the report says whether the budget was met and by how much it missed.
    A layer whose factorized form would not hold fewer parameters is left dense, with
    the reason in the report. ``example_input`` (a tensor or tuple) lets the report
    count FLOPs. ``model`` is deep-copied unless ``inplace=True``.
    ``calibration`` (from :func:`layers.calibrate` on this model): data-aware decomposition;
    each layer's input Gram is passed to its builder as ``gram=`` (see
    :func:`layers.calibrate.calibrated_plan`), and its ``rel_error_bound`` becomes the
    certified relative OUTPUT error on the calibration data.
    """
    default = dict(method=method, rank=rank, energy=energy, tol=tol, ratio=ratio, **options)
    target = model if inplace else copy.deepcopy(model)
    candidates = [(n, m) for n, m in target.named_modules() if isinstance(m, CANDIDATE_TYPES) and n]
    shapes = record_input_shapes(target, example_input, [n for n, _ in candidates]) if example_input is not None else {}
    report = Report(model_params_before=sum(p.numel() for p in model.parameters()))
    plan = {}
    for name, _ in candidates:
        settings = _policy_for(name, policy, default if _matches(name, include) else None)
        excluded = settings is None or (_matches(name, exclude) and not _matches(name, (policy or {}).keys()))
        plan[name] = "skipped: excluded" if excluded else settings
    if calibration is not None:
        from .calibrate import calibrated_plan
        plan = calibrated_plan(plan, dict(candidates), calibration, report)
    if budget is not None:
        _check_budget_request(default, policy, budget, example_input)
        plan = _budget_plan(candidates, plan, shapes, budget, method, report)
    for name, layer in _progress(candidates, progress):
        record = LayerRecord(name=name, type=type(layer).__name__, shape=tuple(layer.weight.shape),
                             params_before=sum(p.numel() for p in layer.parameters()))
        record.params_after = record.params_before
        if name in shapes:
            record.flops_before = record.flops_after = layer_macs(layer, shapes[name])[0]
        if isinstance(plan[name], str):
            record.status = plan[name]
        else:
            _replace_layer(target, name, layer, plan[name], record, shapes.get(name))
        report.layers.append(record)
    report.model_params_after = sum(p.numel() for p in target.parameters())
    return target, report


def _check_budget_request(default, policy, budget, example_input):
    given = [k for k in ("rank", "energy", "tol", "ratio") if default.get(k) is not None]
    if given or policy:
        raise ValueError(f"budget={budget!r} chooses the ranks itself; do not also pass "
                         f"{', '.join(f'{k}=' for k in given) or 'policy='}")
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("params", "flops"):
        raise ValueError(f"budget={budget!r}: pass dict(params=fraction) or dict(flops=fraction)")
    fraction = next(iter(budget.values()))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"budget={budget!r}: the fraction must be in (0, 1]")
    if "flops" in budget and example_input is None:
        raise ValueError("budget=dict(flops=...) needs example_input= to count the layers' FLOPs")


def _budget_plan(candidates, plan, shapes, budget, method, report):
    """Replace the per-layer settings of targeted layers by globally allocated ranks.

    Each layer's profile is built from its own settings (method options, and the
    calibration ``gram=`` when compress was calibrated: the allocation then weighs the
    output spectrum, not the weights')."""
    from .budget import allocate
    from .registry import available_methods

    entry = available_methods().get(method)
    if entry is None or entry.budget_profile is None:
        able = sorted(m for m, e in available_methods().items() if e.budget_profile is not None)
        raise ValueError(f"method={method!r} cannot allocate a budget (it has no spectrum); methods that can: {able}")
    kind, fraction = next(iter(budget.items()))
    layers = dict(candidates)
    targeted = [n for n, s in plan.items() if not isinstance(s, str) and not isinstance(layers[n], TRANSPOSED_TYPES)]

    def cost_of(name, module):
        return count_params(module) if kind == "params" else layer_macs(module, shapes[name])[0]

    layer_options = {name: {k: v for k, v in plan[name].items()
                            if v is not None and k not in ("method", "rank", "energy", "tol", "ratio")}
                     for name in targeted}
    profiles = {}
    for name in targeted:
        profiles[name] = entry.budget_profile(layers[name], **layer_options[name])
        profiles[name].dense_cost = cost_of(name, layers[name])
    if kind == "params":
        total = report.model_params_before
    else:
        total = sum(layer_macs(m, shapes[n])[0] for n, m in candidates if n in shapes)
    fixed = total - sum(p.dense_cost for p in profiles.values())
    allocation = allocate(profiles, cost_of, fixed, fraction * total)
    what = "parameters" if kind == "params" else "MACs of the Linear/Conv layers"
    reached = f"reached {allocation.cost:,.0f} ({allocation.cost / total:.2%})"
    if allocation.met:
        report.notes.append(f"budget: {what} <= {fraction:.2%} of {total:,} = {fraction * total:,.0f}; {reached}")
    else:
        report.notes.append(f"budget NOT met: {what} <= {fraction:.2%} of {total:,} = {fraction * total:,.0f} asked, "
                            f"but the smallest reachable with method={method!r} is {allocation.cost:,.0f} "
                            f"({allocation.cost / total:.2%}), {allocation.cost - fraction * total:,.0f} over")
    new_plan = dict(plan)
    for name in targeted:
        ranks = allocation.ranks[name]
        if ranks is None:
            new_plan[name] = "skipped: kept dense by the budget allocation"
        else:
            new_plan[name] = dict(method=method, rank=ranks[0] if len(ranks) == 1 else ranks, **layer_options[name])
    report.budget = allocation
    return new_plan


def _speed_settings(settings, input_shape, name):
    """With optimize='speed', time each layer on its recorded input and keep slower ones dense."""
    if settings.get("optimize") is None:
        return settings
    if input_shape is None:
        raise ValueError(f"{name}: optimize='speed' in compress needs example_input= to time each layer "
                         f"on the shape it really sees")
    return {"input_shape": input_shape, "on_slower": "raise", **settings}


def _replace_layer(model, name, layer, settings, record, input_shape):
    record.method = settings.get("method", "svd")
    settings = _speed_settings({k: v for k, v in settings.items() if v is not None}, input_shape, name)
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
    record.speedup = getattr(factorized, "speedup", None)
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
