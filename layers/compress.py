"""``compress(model, ...)``: factorize every matching layer of a model.

The walker (:func:`find_targets`) sees every ``nn.Linear`` / ``nn.ConvNd`` / transposed conv /
``transformers`` ``Conv1D`` / user-registered layer kind (:mod:`layers.kinds`) of the model,
each module object once, with every dotted name it is reached by. Each is either factorized
or kept dense with the reason in the report:

* a module reached by several names is decomposed once and the result is installed at every
  name (``LayerRecord.names``); a Parameter tied across modules keeps its layer dense
  ("tied with <names>"), since decomposing one side would untie it and grow the model;
* forward hooks / pre-hooks and buffers are carried over to the replacement (its call
  signature is the layer's); a layer with backward hooks or extra parameters stays dense;
* a parametrized layer (``torch.nn.utils.parametrize``, legacy ``weight_norm`` /
  ``spectral_norm``) is decomposed from its effective weight;
* a subclass that overrides ``forward`` and is not a registered kind stays dense.

A wrong request (unknown method or option, invalid rank spec, a pattern matching nothing, a
non-finite weight, a model with nothing to factorize) raises before any work.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from decomp_toolkit.decomp._backend import all_finite

from ._accounting import layer_macs
from ._modules import (FUSED_READER_REASON, carry_hooks, check_patterns, eval_mode, fused_weight_readers,
                       note_fused_fast_path_off, owners_of_parameters, set_submodule, tied_names, tied_reason)
from .decompose import WorseThanZeroWarning, decompose, worse_than_zero
from .errors import UnsupportedLayerError
from .kinds import (TRANSPOSED_REASON, check_dense_equivalent, is_candidate, kind_of, legacy_reparametrization,
                    registered_kinds, unfactorizable_note, without_reparametrization)
from .report import LayerRecord, Report
from .speed import check_speed
from .transposed import budget_profile_of, is_transposed
SPEC_NAMES = ("rank", "energy", "tol", "ratio")
# options compress itself (or its calibration / speed plumbing) consumes, valid for every method
PLUMBING_OPTIONS = {"gram", "input_mean", "calibration", "center", "shrinkage", "optimize", "input_shape",
                    "on_slower"}
BUDGET_SCOPES = ("targeted", "model")


@dataclass
class Target:
    """One module the walker found: every name it is reached by, and its dense equivalent (or why not)."""

    module: nn.Module
    names: list
    dense: nn.Module | None = None
    reason: str | None = None
    tied_with: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def kind(self):
        """``"linear"`` or the conv's spatial dims, of the dense equivalent (None when kept dense)."""
        return None if self.dense is None else kind_of(self.dense).key


def _matches(name, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _policy_for(name, policy, default):
    """First policy entry whose pattern matches ``name`` (dict order), else the default."""
    for pattern, settings in (policy or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            return dict(settings)
    return dict(default) if default is not None else None


def record_input_shapes(model, example_input, names) -> dict:
    """Input shape of each named module for one forward of ``example_input`` (forward pre-hooks), run in eval mode.

    ``example_input``: a tensor, a tuple (``model(*x)``) or a dict / BatchEncoding (``model(**x)``).
    """
    from .calibrate import run_model
    shapes, hooks = {}, []
    modules = dict(model.named_modules(remove_duplicate=False))

    def remember(name):
        def hook(module, inputs):
            if inputs and isinstance(inputs[0], torch.Tensor):
                shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(remember(name)))
    try:
        with torch.no_grad(), eval_mode(model):   # a train-mode model would update its BatchNorm statistics
            run_model(model, example_input, what="example_input")
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


# --------------------------------------------------------------------------- the walker

def _is_candidate(module) -> bool:
    return is_candidate(module)


def unsupported_reason(module) -> str | None:
    """Why the walker cannot factorize (or calibrate) ``module``; None when it can."""
    row = kind_of(module)
    if row is None:
        return f"{type(module).__name__} is not a Linear/ConvNd/Conv1D nor a registered layer kind"
    if row.unsupported is not None and not is_transposed(module):
        return row.unsupported
    base = row.module_type
    for method in ("forward", "_conv_forward"):
        if hasattr(base, method) and getattr(type(module), method) is not getattr(base, method):
            return (f"{type(module).__name__} overrides {method}() of {base.__name__}, which a factorized layer "
                    f"could not reproduce; register it with layers.register_layer_kind(...) to factorize it")
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy layer is not initialized yet; run one forward pass first"
    return None


def data_aware_reason(module) -> str | None:
    """Why ``calibrate`` / ``compress_sequential`` cannot fit ``module`` from its inputs; None when they can
    (:func:`unsupported_reason`, and transposed convs, which ``compress`` factorizes from their weights)."""
    return TRANSPOSED_REASON if is_transposed(module) else unsupported_reason(module)


def carry_over_reason(module) -> str | None:
    """Why ``module``'s hooks / extra parameters could not move to a replacement (None when they can)."""
    if module._backward_hooks or module._backward_pre_hooks:
        return "has backward hooks, which a factorized replacement could not reproduce; remove them first"
    allowed = {"weight", "bias", "weight_g", "weight_v", "weight_orig"}
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in allowed]
    if extra:
        return f"holds parameters other than weight/bias ({', '.join(extra)}), which a replacement would drop"
    return None


def _dense_equivalent(module, label):
    """The plain Linear/ConvNd computing ``module``'s function (the module itself when it already is one)."""
    row = kind_of(module)
    if row.dense is not None:
        with torch.no_grad():
            dense = row.dense(module)
        check_dense_equivalent(module, dense, label)
        return dense
    return without_reparametrization(module)


def _check_weights(module, name):
    for param_name, param in module.named_parameters():
        if param.device.type == "meta":
            raise ValueError(f"{name} ({type(module).__name__}): parameter {param_name!r} is on the meta device "
                             f"(no data); load the weights first (model.to_empty(device=...) + load_state_dict)")
        if param.is_floating_point() and not all_finite(param):
            raise ValueError(f"{name} ({type(module).__name__}, {param_name} {tuple(param.shape)}): contains NaN or "
                             f"Inf entries; fix the weights before compressing")


def find_targets(model) -> list:
    """Every candidate module of ``model`` once, with all its names, dense equivalent or keep-dense reason."""
    targets, by_id = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not _is_candidate(module):
            continue
        if id(module) in by_id:
            by_id[id(module)].names.append(name)
            continue
        by_id[id(module)] = target = Target(module, [name])
        targets.append(target)
    owners, fused_readers = owners_of_parameters(model), fused_weight_readers(model)
    for target in targets:
        target.reason = unsupported_reason(target.module)
        if target.reason is None and id(target.module) in fused_readers:
            target.reason = FUSED_READER_REASON
        if target.reason is not None:
            continue
        _check_weights(target.module, target.name)
        target.tied_with = tied_names(target.module, owners)
        if target.tied_with:
            target.reason = tied_reason(target.tied_with)
            continue
        target.reason = carry_over_reason(target.module)
        if target.reason is None:
            target.dense = _dense_equivalent(target.module, f"{target.name} ({type(target.module).__name__})")
    return targets


# --------------------------------------------------------------------------- request validation

def _check_model(model):
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"compress: got a TorchScript {type(model).__name__}; its layers cannot be replaced. "
                        f"Compress the eager nn.Module, then script or export the result")
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: expected an nn.Module model, got {type(model).__name__}")
    if _is_candidate(model):
        raise TypeError(f"compress: got a single {type(model).__name__} layer, not a model; use "
                        f"decompose(layer, method=..., rank=...) for one layer")


def _check_settings(settings, where, require_spec=True):
    """Validate one settings dict (method, rank spec, options) before any work (``decompose.check_request``)."""
    from .decompose import check_options, check_request
    from .registry import available_methods, get_method
    if not isinstance(settings, dict):
        raise TypeError(f"{where}: settings must be a dict(method=..., rank/energy/tol/ratio=..., **options), "
                        f"got {type(settings).__name__}")
    method = settings.get("method", "svd")
    entry = get_method(method, where)
    spec = {k: settings[k] for k in SPEC_NAMES if settings.get(k) is not None}
    options = {k: v for k, v in settings.items() if k not in SPEC_NAMES + ("method",) and k not in PLUMBING_OPTIONS}
    refused = [k for k in spec if k not in entry.spec_kinds and not (k == "rank" and spec[k] == "vbmf")]
    if refused:
        able = sorted(m for m, e in available_methods().items() if refused[0] in e.spec_kinds)
        raise ValueError(f"{where}: method={method!r} does not take {refused[0]}= (it cannot guarantee it); it takes "
                         f"{[k + '=' for k in entry.spec_kinds if k != 'vbmf'] or 'no rank spec'}; methods that take "
                         f"{refused[0]}=: {able}")
    if require_spec or spec:
        check_request(method, spec, options, where)
    else:
        check_options(entry, options, None, where)


def _check_request(targets, default, policy, budget, include, exclude, example_input):
    names = [n for t in targets for n in t.names]
    check_patterns(names, "compress", include=include, exclude=exclude, policy=list((policy or {}).keys()))
    has_spec = any(default.get(k) is not None for k in SPEC_NAMES)
    if budget is not None:
        _check_budget_request(default, policy, budget, example_input)
        _check_settings(default, "compress", require_spec=False)
    else:
        _check_settings(default, "compress", require_spec=policy is None or has_spec)
    for pattern, settings in (policy or {}).items():
        _check_settings(settings, f"compress: policy[{pattern!r}]")


# --------------------------------------------------------------------------- compress

def compress(model, method="svd", *, rank=None, energy=None, tol=None, ratio=None, budget=None, include=("*",),
             exclude=(), policy=None, example_input=None, inplace=False, progress=True, calibration=None,
             held_out=None, fold_bn=False, bn_aware=True, eval_fn=None, eval_cache=None, time_layers=True,
             **options):
    """Factorize the Linear/Conv/Conv1D layers of ``model``; returns ``(compressed_model, Report)``.

    ``include``/``exclude``: fnmatch patterns on dotted module names (each must match a layer; ``include=None``:
    every layer, as in :func:`~layers.calibrate.calibrate`). ``policy``: an ordered ``{pattern: dict(method=...,
    rank/energy/tol/ratio=..., **options)}``; the first matching pattern wins and layers matching none use the
    top-level method and spec (without one they are kept dense, with that reason).
    Options that apply to some layer kinds only (``scheme=`` of svd convs) are passed to
    those and the report notes which layers went without them.

    ``budget=dict(params=f)`` or ``dict(flops=f)`` replaces the rank spec: ranks are
    allocated globally (Zhang et al. 2016's greedy rule, :mod:`layers.budget`) so that
    the *targeted* layers keep at most the fraction ``f`` of their parameters (or MACs,
    which needs ``example_input``); ``dict(params=f, of="model")`` counts the whole model
    instead. The report prints both fractions, computed on the final model after every skip.
    ``dict(latency=f)``: ranks on the targeted layers' *measured* times (:mod:`layers.latency`).
    A layer whose factorized form would not be smaller (parameters; stored bits for PQ) is left
    dense, with the reason in the report. ``example_input`` (a tensor, tuple or dict) lets the
    report count FLOPs and, with ``time_layers=True`` (default), times every replaced layer
    against its dense one on the shape it sees (a warning and a report note for each slower one;
    ``time_layers=False`` skips that timing, e.g. for large inputs). ``model`` is deep-copied
    unless ``inplace=True``.

    ``calibration`` (from :func:`layers.calibrate` on this model): data-aware decomposition;
    each layer's input statistics are passed to its builder (see
    :func:`layers.calibrate.calibrated_plan`) and ``rel_error_bound`` becomes the relative
    OUTPUT error measured on the calibration data. Layers calibrated on fewer rows than inputs get a
    shrunk Gram (``shrinkage="auto"``: OAS; ``"ess"``: OAS when the effective rows,
    :mod:`layers.sample_size`, are fewer; ``None``, ``"oas"``, ``"held_out"`` or a weight in [0, 1] per
    call or policy entry; :func:`layers.calibrate.layer_sampling`); the layers with fewer effective
    rows than inputs are listed in a note. ``held_out`` (data as ``calibrate`` takes it, not the
    calibration data): each layer's relative output error on it (``held_out_error``), which also
    CHOOSES the shrinkage weight of the undersampled layers (of every layer with ``"held_out"``),
    see :func:`_held_out_shrinkage` (it is then slightly optimistic: a third set is unbiased).

    A conv followed by a BatchNorm (:mod:`layers.batchnorm`): with ``bn_aware`` (default) it
    is decomposed in the BN's output scale, so ranks, budgets and errors reflect what the
    next layer sees; ``fold_bn=True`` instead replaces conv + BN by one conv before
    compressing. Both are exact in eval mode; the report notes which BNs were used.

    ``eval_fn`` (with ``budget=``): a callable ``model -> float`` (higher is better); the ranks
    are then allocated from the metric drop measured with each layer compressed alone at a
    few candidate ranks (:mod:`layers.evalalloc`; ``eval_cache``: a dict that keeps those
    measurements across calls). Without it the fast energy allocator is used.
    """
    _check_model(model)
    include = ("*",) if include is None else include
    if not isinstance(time_layers, bool):
        raise TypeError(f"compress: time_layers= must be True or False, got {time_layers!r}")
    default = dict(method=method, rank=rank, energy=energy, tol=tol, ratio=ratio, **options)
    target_model = model if inplace else _deepcopy(model)
    bn_notes = _prepare_batchnorm(target_model, include, exclude, fold_bn, bn_aware)
    targets = find_targets(target_model)
    if not targets:
        raise ValueError(f"compress: {type(model).__name__} has no Linear / Conv1d/2d/3d / Conv1D layer (nor a "
                         f"registered layer kind: {sorted(registered_kinds())}); nothing to factorize")
    _check_request(targets, default, policy, budget, include, exclude, example_input)
    report = Report(model_params_before=_model_params(model), model_bits_before=_model_bits(model))
    report.notes.extend(bn_notes + [note for note in [unfactorizable_note(model)] if note])
    names = [n for t in targets for n in t.names]
    shapes = record_input_shapes(target_model, example_input, names) if example_input is not None else {}
    plan = _initial_plan(targets, default, policy, include, exclude, report)
    plan, sampling, held = _calibrated_plan(target_model, targets, plan, calibration, held_out, report)
    if budget is not None:
        plan = _budget_plan(targets, plan, shapes, budget, method, report,
                            evaluation=(target_model, eval_fn, eval_cache) if eval_fn is not None else None,
                            calibration=calibration)
    for target in _progress(targets, progress):
        report.layers.append(_process(target_model, target, plan[target.name], shapes, held, time_layers,
                                      sampling.get(target.name)))
    if sampling:
        from .calibrate import undersampled_note
        report.notes.extend(note for note in [undersampled_note(report.layers)] if note)
    _check_runs(target_model, targets, example_input, report)
    report.model_params_after, report.model_bits_after = _model_params(target_model), _model_bits(target_model)
    _final_notes(report, budget, targets)
    return target_model, report


def _prepare_batchnorm(model, include, exclude, fold_bn, bn_aware) -> list:
    """Fold / rescale the conv + BatchNorm pairs of the included convs (:mod:`layers.batchnorm`); report notes."""
    from .batchnorm import BN_TYPES, prepare_batchnorm
    if not (fold_bn or bn_aware) or not any(isinstance(m, BN_TYPES) for m in model.modules()):
        return []
    names = [n for n, _ in model.named_modules() if n and _matches(n, include) and not _matches(n, exclude)]
    return prepare_batchnorm(model, names, fold_bn=fold_bn, bn_aware=bn_aware)


def _deepcopy(model):
    """``copy.deepcopy(model)``, also for legacy ``weight_norm`` layers (whose computed ``weight`` attribute is
    a non-leaf tensor that deepcopy refuses: it is detached for the copy and put back afterwards)."""
    stale = {}
    for module in model.modules():
        hook = legacy_reparametrization(module)
        if hook is not None and isinstance(getattr(module, hook.name, None), torch.Tensor):
            stale[module] = getattr(module, hook.name)
            setattr(module, hook.name, stale[module].detach())
    try:
        return copy.deepcopy(model)
    finally:
        for module, tensor in stale.items():
            setattr(module, legacy_reparametrization(module).name, tensor)


def _numel(params) -> int:
    return sum(p.numel() for p in params if not isinstance(p, nn.parameter.UninitializedParameter))


def _model_params(model) -> int:
    return _numel(model.parameters())


def _model_bits(model) -> int:
    """Stored bits of the parameters and persistent buffers (PQ codes are buffers)."""
    bits = _parameter_bits(model)
    for module in model.modules():
        if hasattr(module, "size_bits"):
            bits += module.size_bits - _parameter_bits(module)
    return bits


def _initial_plan(targets, default, policy, include, exclude, report) -> dict:
    """``{name: settings dict or "skipped: <reason>"}`` for every target (by its first name)."""
    plan, dropped = {}, {}
    has_spec = any(default.get(k) is not None for k in SPEC_NAMES)
    for target in targets:
        if target.reason is not None:
            plan[target.name] = "skipped: " + target.reason
            continue
        chosen = [_policy_for(n, policy, default if _matches(n, include) else None) for n in target.names]
        excluded = [n for n, s in zip(target.names, chosen)
                    if s is None or (_matches(n, exclude) and not _matches(n, (policy or {}).keys()))]
        if excluded:
            plan[target.name] = "skipped: excluded" + (f" (as {', '.join(excluded)})" if len(target.names) > 1 else "")
            continue
        if any(s != chosen[0] for s in chosen):
            plan[target.name] = ("skipped: this module is shared by names that the policy assigns different "
                                 f"settings ({', '.join(target.names)}); give them one pattern")
            continue
        settings = chosen[0]
        if policy and not has_spec and not _matches(target.name, policy.keys()) and \
                all(settings.get(k) is None for k in SPEC_NAMES):
            plan[target.name] = "skipped: matches no policy pattern and compress() got no top-level rank spec"
            continue
        plan[target.name] = _settings_for_kind(settings, target, dropped)
    for (method, option), layer_names in dropped.items():
        report.notes.append(f"{option}= applies only to some layer kinds of method {method!r}; these layers were "
                            f"decomposed without it: {', '.join(layer_names)}")
    return plan


def _settings_for_kind(settings, target, dropped) -> dict:
    """``settings`` without the options the method's builder for this layer kind does not take."""
    from .registry import available_methods
    method = settings.get("method", "svd")
    entry = available_methods()[method]
    if target.kind not in entry.builders:
        return settings  # decompose raises the "does not support" error, which becomes the reason
    own = set(entry.options(target.kind)) | set(SPEC_NAMES) | {"method"} | PLUMBING_OPTIONS
    for option in sorted(set(settings) - own):
        if settings[option] is not None:
            dropped.setdefault((method, option), []).append(target.name)
    return {k: v for k, v in settings.items() if k in own}


# --------------------------------------------------------------------------- one layer

def _process(model, target, settings, shapes, held, time_layers=True, sampling=None) -> LayerRecord:
    """The record of one target: factorized and installed, or kept dense with the reason. ``held``: the
    held-out Calibration (or None); ``sampling``: the layer's :class:`layers.calibrate.LayerSampling`."""
    module, dense = target.module, target.dense
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and not isinstance(
        weight, nn.parameter.UninitializedParameter) else ()
    record = LayerRecord(name=target.name, type=type(module).__name__, shape=shape,
                         params_before=_numel(module.parameters()), names=tuple(target.names))
    record.bits_before = _parameter_bits(module)
    record.params_after, record.bits_after = record.params_before, record.bits_before
    input_shape = shapes.get(target.name)
    plain = type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) or isinstance(
        module, nn.modules.conv._ConvTransposeNd)
    counted = dense if dense is not None else module if plain else None
    if input_shape is not None and counted is not None:
        record.flops_before = record.flops_after = layer_macs(counted, input_shape)[0]
    if sampling is not None:   # kept dense or not, what the calibration saw of this layer
        record.samples, record.effective_samples = sampling.samples, int(round(sampling.effective_samples))
        record.input_dim = sampling.input_dim
    if isinstance(settings, str):
        record.status = settings
        return record
    record.method = settings.get("method", "svd")
    held_gram = None
    if held is not None and target.name in held:
        held_gram = held.second_moment(target.name, about=settings.get("input_mean"))
    if sampling is not None:
        record.shrinkage = sampling.shrinkage
        if sampling.candidates and held_gram is not None:
            settings = _held_out_shrinkage(target, settings, sampling, held_gram, record)
    factorized = _factorize(target, settings, input_shape, record, time_layers)
    if factorized is None:
        record.shrinkage = None   # kept dense: no Gram was used
        return record
    _fill_record(record, dense, factorized, input_shape, held_gram)
    _install(model, target, factorized)
    return record


def _factorize(target, settings, input_shape, record, time_layers=True):
    """The factorized module, or None with ``record.status`` saying why the layer stays dense."""
    settings = _speed_settings({k: v for k, v in settings.items() if v is not None}, input_shape, target.name)
    try:
        with warnings.catch_warnings():   # a fit worse than zero is kept dense below, and said in the report
            warnings.simplefilter("ignore", WorseThanZeroWarning)
            factorized = decompose(target.dense, name=target.name, **settings)
    except UnsupportedLayerError as err:  # this method cannot factorize this layer: kept dense, say why
        record.status = "skipped: " + err.reason
        return None
    reason = worse_than_zero(factorized.fit)
    if reason is not None:
        record.status = "skipped: " + reason
        return None
    bits_after = _module_bits(factorized)
    if hasattr(factorized, "size_bits"):
        if bits_after >= record.bits_before:
            record.status = (f"skipped: factorized form stores {bits_after:,} bits, not fewer than the dense "
                             f"{record.bits_before:,}")
            return None
    elif factorized.num_params >= record.params_before:
        record.status = (f"skipped: factorized form has {factorized.num_params:,} parameters, "
                         f"not fewer than the dense {record.params_before:,}")
        return None
    if time_layers and input_shape is not None and factorized.fit.speedup is None:  # no silent slow-down
        try:
            check_speed(factorized, target.dense, input_shape, context=target.name,
                        on_slower=settings.get("on_slower", "warn"))
        except UnsupportedLayerError as err:  # on_slower='raise' (a latency budget): kept dense, say why
            record.status = "skipped: timed again after the allocation: " + err.reason
            return None
    return factorized


def _parameter_bits(module) -> int:
    return sum(p.numel() * p.element_size() * 8 for p in module.parameters()
               if not isinstance(p, nn.parameter.UninitializedParameter))


def _module_bits(module) -> int:
    return int(module.size_bits) if hasattr(module, "size_bits") else _parameter_bits(module)


def _fill_record(record, dense, factorized, input_shape, held_gram):
    fit = factorized.fit  # layers.fit.Fit: measured errors, certified bound, error kind
    record.type = f"{record.type} -> {type(factorized).__name__}"
    record.rank = getattr(factorized, "rank", None)
    record.speedup = fit.speedup
    record.params_after = _numel(factorized.parameters())  # what sum(p.numel()) of the model counts
    record.bits_after = _module_bits(factorized)
    record.rel_error = fit.relative_weight_error
    record.rel_error_bound = fit.relative_error_bound
    if fit.error_kind == "output":
        record.rel_output_error = fit.relative_error
    record.error_on = "calibration outputs" if fit.error_kind == "output" else "weights"
    if input_shape is not None:
        record.flops_after = factorized.flops(input_shape)
    if held_gram is not None:
        record.held_out_error = _output_error(dense, factorized, held_gram)


def _held_out_shrinkage(target, settings, sampling, held_gram, record) -> dict:
    """``settings`` with the shrinkage weight whose fit has the smallest held-out output error.

    The rank is fixed first (the given rank, else the one the spec takes on the default ``"auto"``
    Gram already in ``settings``; a method without ``rank=``, PQ, keeps its spec); each candidate
    of ``sampling`` is fitted at that rank and scored by :func:`_output_error` on ``held_gram``
    (the held-out inputs about the calibration mean); ties go to the earlier candidate (less
    shrinkage). ``record`` gets the weight and every
    candidate's error. A fit this method refuses leaves ``settings`` as they are (``_factorize``
    then reports why).
    """
    from .calibrate import shrink_gram
    from .registry import available_methods
    fit_settings = {k: v for k, v in settings.items() if v is not None and k not in ("optimize", "input_shape",
                                                                                      "on_slower")}
    spec = {k: fit_settings.pop(k) for k in SPEC_NAMES if k in fit_settings}
    try:
        rank = spec.get("rank")
        if "rank" not in available_methods()[settings.get("method", "svd")].spec_kinds:
            rank = None   # e.g. PQ (bits=, n_centroids=): every candidate gets the spec itself
        elif not isinstance(rank, (int, tuple, list)):
            rank = decompose(target.dense, name=target.name, **fit_settings, **spec).fit.ranks
        fixed = dict(rank=rank) if rank is not None else spec
        errors, weights = {}, {}
        for label, weight in sampling.candidates:
            module = decompose(target.dense, name=target.name,
                               **{**fit_settings, **fixed, "gram": shrink_gram(sampling.gram, weight)})
            errors[label], weights[label] = _output_error(target.dense, module, held_gram), weight
    except UnsupportedLayerError:
        return settings
    best = min(errors, key=errors.get)
    record.shrinkage = None if weights[best] is None else float(weights[best].mean())
    record.shrinkage_errors = errors
    chosen = {k: v for k, v in settings.items() if k not in SPEC_NAMES}
    return {**chosen, **fixed, "gram": shrink_gram(sampling.gram, weights[best])}


def _output_error(dense, factorized, gram):
    """``||(W - W') X^T||_F / ||W X^T||_F`` from the Gram ``(g, P, P)`` of held-out inputs X (compress passes
    ``Calibration.second_moment(name, about=calibration mean)`` for a centered fit, i.e. X minus that mean:
    the error of the installed layer, whose bias absorbs ``(W - W') mean``)."""
    groups = gram.shape[0]
    W = dense.weight.detach().double().reshape(groups, dense.weight.shape[0] // groups, -1)
    E = W - factorized.dense_weight().detach().double().reshape(W.shape)
    error = float(((E @ gram) * E).sum())
    norm = float(((W @ gram) * W).sum())
    return math.sqrt(max(error, 0.0) / norm) if norm > 0 else 0.0


def _install(model, target, factorized):
    """Put ``factorized`` at every name of ``target``, with the module's hooks and buffers carried over."""
    module = target.module
    carry_hooks(module, factorized, consumed=legacy_reparametrization(module))
    for name, buffer in module.named_buffers(recurse=False):
        if name not in dict(factorized.named_buffers(recurse=False)):
            factorized.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    factorized.train(module.training)
    _put_at_names(model, target.names, factorized)


def _put_at_names(model, names, module):
    for name in names:
        set_submodule(model, name, module)


def _check_runs(model, targets, example_input, report):
    """Run the compressed ``model`` on ``example_input``; a replaced layer whose ``.weight`` the model's own code
    reads (:class:`layers.base.FactorizedLayer` has none) goes back to dense, with that reason in its record,
    until the model runs. Any other failure raises ValueError naming it (the model does not run). Encoder layers
    with factorized Linears are first kept off torch's fused fast path (:func:`note_fused_fast_path_off`)."""
    from .base import FactorizedLayer
    from .calibrate import run_model

    note_fused_fast_path_off(model, report)

    if example_input is None:
        return
    records, kept = {r.name: r for r in report.layers}, []
    for _ in range(len(targets) + 1):
        installed = {t.name: model.get_submodule(t.name) for t in targets}
        for module in installed.values():
            module.__dict__.pop("weight_read", None)
        try:
            with torch.no_grad(), eval_mode(model):
                run_model(model, example_input, what="compress: the compressed model on example_input")
            break
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported below
            readers = [t for t in targets if isinstance(installed[t.name], FactorizedLayer)
                       and installed[t.name].__dict__.get("weight_read")]
            if not readers:
                raise ValueError(f"compress: the compressed model does not run on example_input: {err}") from err
            for target in readers:
                _keep_dense(model, target, records[target.name])
            kept += [t.name for t in readers]
    if kept:
        report.notes.append(f"kept dense because the model's code reads their .weight: {', '.join(kept)}")


def _keep_dense(model, target, record):
    """Put ``target``'s original module back at its names and make its record say why."""
    _put_at_names(model, target.names, target.module)
    record.status = "skipped: the model's code reads its .weight (a factorized layer has none)"
    record.type, record.rank, record.speedup = type(target.module).__name__, None, None
    record.params_after, record.bits_after, record.flops_after = (record.params_before, record.bits_before,
                                                                  record.flops_before)
    record.rel_error = record.rel_error_bound = record.rel_output_error = record.held_out_error = None


def _speed_settings(settings, input_shape, name):
    """With optimize='speed', time each layer on its recorded input and keep slower ones dense."""
    if settings.get("optimize") is None:
        return settings
    if input_shape is None:
        raise ValueError(f"{name}: optimize='speed' in compress needs example_input= to time each layer "
                         f"on the shape it really sees")
    return {"input_shape": input_shape, "on_slower": "raise", **settings}


def _calibrated_plan(model, targets, plan, calibration, held_out, report) -> tuple:
    """``(plan, sampling, held)``: the plan with the calibration statistics (:func:`layers.calibrate.calibrated_plan`;
    unchanged without calibration), ``{name: LayerSampling}``, and the held-out Calibration (or None)."""
    sampling = {}
    if calibration is not None:
        from .calibrate import calibrated_plan
        plan, sampling = calibrated_plan(plan, {t.name: t.dense for t in targets if t.dense is not None},
                                         calibration, report, held_out=held_out is not None)
    return plan, sampling, _held_out_statistics(model, held_out, plan)


def _held_out_statistics(model, held_out, plan):
    """The :class:`layers.calibrate.Calibration` of the held-out inputs of every planned layer (None without
    held_out, or with no planned layer)."""
    if held_out is None:
        return None
    from .calibrate import calibrate
    names = [n for n, s in plan.items() if not isinstance(s, str)]
    if not names:
        return None
    return calibrate(model, held_out, layers=[_escape(n) for n in names], progress=False)


def _escape(name) -> str:
    import glob
    return glob.escape(name)


# --------------------------------------------------------------------------- budget

def _check_budget_request(default, policy, budget, example_input):
    given = [k for k in SPEC_NAMES if default.get(k) is not None]
    if given or policy:
        raise ValueError(f"budget={budget!r} chooses the ranks itself; do not also pass "
                         f"{', '.join(f'{k}=' for k in given) or 'policy='}")
    what = [k for k in (budget if isinstance(budget, dict) else {}) if k not in BUDGET_KEYWORDS]
    if not isinstance(budget, dict) or len(what) != 1 or what[0] not in BUDGET_KINDS:
        raise ValueError(f"budget={budget!r}: pass dict(params=fraction), dict(flops=fraction) or "
                         f"dict(latency=fraction), optionally with of='targeted' (default) or of='model' and min_rank=")
    _check_min_rank(budget.get("min_rank"), budget)
    if budget.get("of", "targeted") not in BUDGET_SCOPES:
        raise ValueError(f"budget={budget!r}: of= must be one of {BUDGET_SCOPES}")
    fraction = budget[what[0]]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"budget={budget!r}: the fraction must be in (0, 1]")
    if "flops" in budget and example_input is None:
        raise ValueError("budget=dict(flops=...) needs example_input= to count the layers' FLOPs")
    if "latency" in budget and (example_input is None or budget.get("of", "targeted") != "targeted"):
        raise ValueError(f"budget={budget!r}: a latency budget times each targeted layer on the input it sees: "
                         f"pass example_input=, and of='targeted' (the fraction of the targeted layers' time)")


BUDGET_KEYWORDS = ("of", "min_rank")
BUDGET_KINDS = ("params", "flops", "latency")


def _check_min_rank(min_rank, budget):
    """``min_rank``: an int rank, a float fraction of each layer's full rank, or ``{pattern: either}``."""
    if min_rank is None:
        return
    values = min_rank.values() if isinstance(min_rank, dict) else [min_rank]
    for value in values:
        fine = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
            isinstance(value, float) and 0 < value <= 1)
        if not fine:
            raise ValueError(f"budget={budget!r}: min_rank values must be an int >= 1 (a rank) or a float in (0, 1] "
                             f"(a fraction of each layer's full rank), got {value!r}")


def _budget_kind(budget):
    kind = next(k for k in budget if k not in BUDGET_KEYWORDS)
    return kind, float(budget[kind]), budget.get("of", "targeted")


def _budget_plan(targets, plan, shapes, budget, method, report, evaluation=None, calibration=None):
    """Replace the per-layer settings of targeted layers by globally allocated ranks.

    Each layer's profile is built from its own settings (method options, and the
    calibration ``gram=`` when compress was calibrated: the allocation then weighs the
    output spectrum, not the weights'). When the calibration holds every targeted layer's
    output Fisher (``calibrate(fisher=True)``) and the method's profiles are estimated
    losses, the ranks minimize the summed estimated loss (:func:`layers.budget.allocate_by_loss`).
    """
    from .registry import available_methods

    entry = available_methods().get(method)
    if entry is None or entry.budget_profile is None:
        able = sorted(m for m, e in available_methods().items() if e.budget_profile is not None)
        raise ValueError(f"method={method!r} cannot allocate a budget (it has no spectrum); methods that can: {able}")
    kind, fraction, scope = _budget_kind(budget)
    dense = {t.name: t.dense for t in targets if t.dense is not None}
    targeted = [n for n, s in plan.items() if not isinstance(s, str)]

    def cost_of(name, module):
        return sum(p.numel() for p in module.parameters()) if kind == "params" else layer_macs(module, shapes[name])[0]

    layer_options = {name: {k: v for k, v in plan[name].items() if v is not None and k not in ("method",) + SPEC_NAMES}
                     for name in targeted}
    fisher = calibration.fisher if calibration is not None else {}
    profiles = {}
    for name in targeted:
        extra = {"fisher": fisher_in_output_scale(calibration, name, dense[name]) / max(calibration.samples[name], 1)
                 } if name in fisher else {}   # per Gram row: see layers.sequential.component_losses
        profiles[name] = budget_profile_of(entry, dense[name], **layer_options[name], **extra)
        profiles[name].dense_cost = cost_of(name, dense[name])
    targeted_cost = sum(p.dense_cost for p in profiles.values())
    total = targeted_cost if scope == "targeted" else _budget_total(kind, targets, shapes, report)
    report.budget_request = dict(kind=kind, fraction=fraction, scope=scope, names=set(targeted))
    if kind == "latency":
        if evaluation is not None:
            raise ValueError(f"budget={budget!r} allocates on measured layer times; eval_fn= allocates on metric "
                             f"drops: pass one of them")
        report.budget = _latency_allocation(profiles, dense, shapes, fraction, budget, cost_of, report)
    elif evaluation is not None:  # eval_fn=: ranks from measured metric drops (layers/evalalloc.py)
        from .evalalloc import eval_driven_plan
        new_plan, report.budget = eval_driven_plan(evaluation[0], dense, plan, total, fraction, cost_of, method,
                                                   evaluation[1], cache=evaluation[2], report=report)
        return new_plan
    else:
        report.budget = _allocate(profiles, cost_of, total - targeted_cost, fraction * total, budget, fisher, report,
                                  calibrated=calibration is not None)
    new_plan = dict(plan)
    for name in targeted:
        ranks = report.budget.ranks[name]
        if ranks is None:
            new_plan[name] = "skipped: kept dense by the budget allocation"
        else:
            slower = dict(on_slower="raise") if kind == "latency" else {}  # a time budget keeps no slower layer
            new_plan[name] = dict(method=method, rank=ranks[0] if len(ranks) == 1 else ranks,
                                  **{**slower, **layer_options[name]})
    return new_plan


def _latency_allocation(profiles, dense, shapes, fraction, budget, cost_of, report):
    """:func:`layers.latency.allocate_latency` (ranks on measured layer times), said in the report."""
    from .latency import allocate_latency

    allocation = allocate_latency(profiles, dense, shapes, fraction, min_rank=_min_rank_patterns(budget),
                                  macs_of=cost_of, report=report)
    on = "the estimated loss increase" if all(p.objective == "loss" for p in profiles.values()) else \
        "relative energy (calibrate(..., fisher=True) allocates on the estimated loss)"
    report.notes.append(f"budget allocated on measured layer times (layers.latency: each layer timed dense and at "
                        f"kernel-friendly ranks on its example_input shape, {torch.get_num_threads()} torch "
                        f"thread(s)) and on {on}")
    return allocation


def fisher_in_output_scale(calibration, name, layer) -> torch.Tensor:
    """``calibration.fisher[name]`` in the output scale of ``layer``: ``F_j / c_j^2``.

    ``c_j = ||W'_j|| / ||W_j||`` (output-channel row norms of ``layer`` vs the calibrated module): 1
    unless compress rescaled the layer's outputs (``bn_aware`` / ``fold_bn`` multiply output channel
    ``j`` by the BatchNorm's scale, so the loss gradient there is divided by it). Without the
    calibrated module at hand (it no longer exists) the Fisher is returned as recorded.
    """
    F = calibration.fisher[name].double()
    ref = calibration._modules.get(name)
    original = ref() if ref is not None else None
    if original is None or original is layer or getattr(original, "weight", None) is None:
        return F
    rows = layer.weight.detach().double().reshape(layer.weight.shape[0], -1).norm(dim=1).cpu()
    before = original.weight.detach().double().reshape(original.weight.shape[0], -1).norm(dim=1).cpu()
    if rows.shape != F.shape or before.shape != F.shape:
        return F
    c = torch.where(before > 0, rows / before.clamp_min(1e-300), torch.ones_like(rows))
    return F / c.clamp_min(1e-12).square()


def _allocate(profiles, cost_of, fixed_cost, target, budget, fisher, report, calibrated=False):
    """The loss allocator when every profile estimates losses, else the energy allocator (said in the report)."""
    from .budget import allocate, allocate_profiles_by_loss

    on_loss = [n for n, p in profiles.items() if p.objective == "loss"]
    if profiles and len(on_loss) == len(profiles):
        report.notes.append("budget allocated on the estimated loss increase (calibration Fisher x whitened "
                            "spectra; layers.budget.allocate_by_loss)")
        return allocate_profiles_by_loss(profiles, cost_of, fixed_cost, target, _min_rank_patterns(budget))
    if fisher:
        missing = sorted(set(profiles) - set(on_loss))
        report.notes.append(f"calibration Fisher not usable for {len(missing)} targeted layers ({', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}: no Fisher entry, or a factorization whose rows are "
                            f"not output channels); budget allocated on relative output energy instead")
    elif budget.get("min_rank") is not None:
        raise ValueError(f"budget={budget!r}: min_rank= applies to the loss allocator; pass a calibration from "
                         f"calibrate(model, data, fisher=True)")
    else:
        report.notes.append(f"budget allocated on relative {'output' if calibrated else 'weight'} energy (Zhang "
                            f"et al.'s objective); with calibrate(..., fisher=True) the ranks are allocated on the "
                            f"estimated loss instead (better on transformers, whose whitened spectra are dominated "
                            f"by one component)")
    return allocate(profiles, cost_of, fixed_cost, target)


def _min_rank_patterns(budget):
    value = budget.get("min_rank")
    return value if isinstance(value, dict) or value is None else {"*": value}


def _budget_total(kind, targets, shapes, report):
    if kind == "params":
        return report.model_params_before
    return sum(layer_macs(t.dense, shapes[t.name])[0] for t in targets if t.dense is not None and t.name in shapes)


def _final_notes(report, budget, targets):
    """Budget verdict and shared-module notes, computed from the final model's numbers."""
    slower = [r for r in report.layers if r.replaced and r.speedup is not None and r.speedup < 1]
    if slower:
        report.notes.append("SLOWER than dense on example_input (kept factorized; optimize='speed' keeps such "
                            "layers dense): " + ", ".join(f"{r.name} {r.speedup:.2f}x" for r in slower))
    shared = [r for r in report.layers if len(r.names) > 1]
    for record in shared:
        report.notes.append(f"shared module {record.name} is reached as {', '.join(record.names)}: "
                            f"{'one factorized module installed at every name' if record.replaced else 'kept dense'}")
    if budget is None:
        if not report.replaced:
            report.notes.append("nothing was factorized: every layer was kept dense (see status)")
        return
    request = report.budget_request
    kind, fraction, scope = request["kind"], request["fraction"], request["scope"]
    if kind == "latency":
        return _latency_verdict(report, fraction)
    totals = report.totals()
    if kind == "params":
        layers_before, layers_after = report.targeted_totals("params")
        model_before, model_after = totals["model_params_before"], totals["model_params_after"]
        what = "parameters"
    else:
        layers_before, layers_after = report.targeted_totals("flops")
        model_before, model_after = totals.get("flops_before", 0), totals.get("flops_after", 0)
        what = "MACs"
    base_before, base_after = (layers_before, layers_after) if scope == "targeted" else (model_before, model_after)
    report.budget.cost, report.budget.target = base_after, fraction * base_before  # the final model's figures
    met = report.budget.met
    label = "targeted layers" if scope == "targeted" else ("the whole model" if kind == "params"
                                                           else "all Linear/Conv layers")
    verdict = "met" if met else "NOT met"
    report.budget_met = met
    report.notes.insert(0, f"budget: {what} of {label} <= {fraction:.2%} of {base_before:,} = "
                           f"{fraction * base_before:,.0f}; {verdict}: reached {base_after:,} "
                           f"({base_after / max(base_before, 1):.2%})"
                        + ("" if met else f", {base_after - fraction * base_before:,.0f} over")
                        + f". Targeted layers: {layers_before:,} -> {layers_after:,} "
                          f"({layers_after / max(layers_before, 1):.2%}); whole model: {model_before:,} -> "
                          f"{model_after:,} ({model_after / max(model_before, 1):.2%})")


def _latency_verdict(report, fraction):
    """The latency budget's verdict: the allocation's predicted time, and the built layers timed again."""
    timed = report.latency
    before, predicted = timed["dense_seconds"], report.budget.cost
    speedups = [(timed["layers"][r.name]["dense_seconds"], r.speedup if r.replaced else 1.0)
                for r in report.layers if r.name in timed["layers"]]
    report.budget_met = report.budget.met
    text = (f"budget: time of the targeted layers <= {fraction:.2%} of {before * 1e3:.4g} ms = "
            f"{fraction * before * 1e3:.4g} ms; {'met' if report.budget_met else 'NOT met'}: predicted "
            f"{predicted * 1e3:.4g} ms ({predicted / before:.2%}) from the times measured for the allocation"
            + ("" if report.budget_met else " (the least these layers reach on this input, every one at its "
                                             "fastest measured form: ask for a larger fraction)"))
    if all(speedup for _, speedup in speedups):
        retimed = sum(seconds / speedup for seconds, speedup in speedups)
        text += (f"; the built layers timed again: {retimed * 1e3:.4g} ms ({retimed / before:.2%}, speedup "
                 f"{before / retimed:.2f}x)")
    report.notes.insert(0, text)


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
    return tqdm(items, desc="compress", unit="layer", leave=False)
