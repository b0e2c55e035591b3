"""``calibrate(model, data)``: per-layer input Gram matrices for data-aware decomposition.

For every targeted ``nn.Linear`` / ``nn.Conv1d/2d/3d`` a forward pre-hook accumulates, in
float64, the Gram ``X^T X`` of the layer's inputs as the layer's weight matrix sees them
(products in float64 too, or in float32 with ``gram_precision="float32"``, see :func:`gram_of`):

* Linear: one row per input vector (all leading dimensions flattened), ``(1, in, in)``;
* ConvNd: one row per im2col patch (kernel, stride, dilation, padding applied explicitly
  with the layer's ``padding_mode``, 'same'/'valid' included), per group:
  ``(groups, C/g * prod(kernel), C/g * prod(kernel))`` with the patch entries ordered
  ``(channel, *kernel offsets)`` like ``weight.reshape(N, -1)``. Patches are materialized
  in chunks of at most ``chunk_elements`` numbers, never all at once.

So for the layer's weight matrix ``W`` (per group), ``||W' X^T||_F^2 = tr(W' G W'^T)`` is
the squared output (before bias) of any weight ``W'`` on the calibration data, which is
what :func:`decomp.whitened_svd` minimizes. ``calibrate`` does not change the model:
it runs under ``torch.no_grad()`` in eval mode (so BatchNorm statistics are not updated;
each module's training flag is restored afterwards) and removes its hooks even on error.
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from decomp_toolkit.decomp._backend import all_finite
from decomp_toolkit.decomp._kernels import gram_upper_triangle, mirror_upper, symmetric_gram

from ._accounting import CONV_TYPES
from ._modules import eval_mode
from .kinds import standard_layer
from .sample_size import row_correlation
from .transposed import is_transposed

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M float64 numbers = 32 MiB of patches at a time
GRAM_PRECISIONS = ("float64", "float32")
GRAM_BLOCK_ROWS = 2048  # rows per float32 product block (each block's sum is then added in float64)


@dataclass
class Calibration:
    """Input Grams of the calibrated layers, keyed by dotted module name.

    ``grams[name]``: float64 CPU tensor ``(groups, P, P)`` (``groups = 1`` for Linear);
    ``sums[name]``: ``(groups, P)`` the sum of the rows (for the mean / covariance);
    ``samples[name]``: rows accumulated (input vectors, or patches per group);
    ``weight_shapes[name]``: the layer's weight shape; ``batches``: batches run;
    ``fisher[name]``: ``(out,)`` diagonal output Fisher (only with ``calibrate(fisher=True)``,
    see :mod:`layers.fisher`): ``compress(budget=...)`` then allocates ranks on the estimated loss.
    ``correlation[name]``: the lag-1 autocorrelation sums of the rows along their sequence /
    spatial axes (:mod:`layers.sample_size`), from which :meth:`effective_samples` estimates how
    many independent rows the ``samples`` correlated ones are worth.
    ``calibration[name]`` is the Gram; ``calibration.gram_for(layer)`` finds a layer of
    the calibrated model by identity (or the only entry).
    """

    grams: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    weight_shapes: dict = field(default_factory=dict)
    batches: int = 0
    skipped: dict = field(default_factory=dict)   # name -> why the layer was not calibrated
    masked: dict = field(default_factory=dict)    # name -> padding rows left out (attention mask)
    fisher: dict = field(default_factory=dict)    # name -> (out,) output Fisher (calibrate(fisher=True))
    correlation: dict = field(default_factory=dict)   # name -> layers.sample_size.RowCorrelation of its rows
    _modules: dict = field(default_factory=dict, repr=False, compare=False)

    def __contains__(self, name) -> bool:
        return name in self.grams

    def __getitem__(self, name) -> torch.Tensor:
        if name not in self.grams:
            raise KeyError(f"no calibration Gram for layer {name!r}; calibrated layers: {sorted(self.grams)}")
        return self.grams[name]

    def __len__(self) -> int:
        return len(self.grams)

    def names(self) -> list:
        return list(self.grams)

    def gram(self, name, normalized: bool = False) -> torch.Tensor:
        """The Gram of ``name``; ``normalized=True`` divides by the sample count (a second moment)."""
        G = self[name]
        return G / max(self.samples[name], 1) if normalized else G

    def mean(self, name) -> torch.Tensor:
        """``(groups, P)`` mean input row of ``name``."""
        return self.sums[name] / max(self.samples[name], 1)

    def covariance(self, name) -> torch.Tensor:
        """``(groups, P, P)`` centered Gram ``sum (x - mean)(x - mean)^T = X^T X - n mean mean^T`` (PSD).

        An input entry whose centered variance is within rounding of zero (a constant input
        channel, e.g. behind a dead ReLU: ``X^T X - n mean^2`` then cancels to +-1e-12) gets its
        row and column set to exactly 0, so the result is PSD instead of slightly indefinite.
        """
        G, S, n = self[name], self.sums[name], max(self.samples[name], 1)
        C = G - S[:, :, None] * S[:, None, :] / n
        C = 0.5 * (C + C.transpose(1, 2))
        diag_G = torch.diagonal(G, dim1=-2, dim2=-1)
        rounding = 64 * torch.finfo(torch.float64).eps * math.sqrt(n) * diag_G
        constant = torch.diagonal(C, dim1=-2, dim2=-1) <= rounding
        if constant.any():
            keep = (~constant).to(C.dtype)
            C = C * keep[:, :, None] * keep[:, None, :]
        return C

    def statistics(self, name, center: bool = True, shrinkage="auto"):
        """``(gram, mean)`` to pass as ``gram=, input_mean=``: the covariance and mean when ``center``,
        else the uncentered Gram and None; regularized as ``shrinkage`` says (see :func:`shrinkage_weight`
        and :func:`shrink_gram`; its sample count is the row count, :meth:`effective_samples` for ``"ess"``).

        When ``center`` and the covariance is zero (one sample, or identical rows: the inputs
        carry no variation), the uncentered Gram is used instead (mean None).
        """
        gram, mean = (self.covariance(name), self.mean(name)) if center else (self[name], None)
        if center and float(torch.diagonal(gram, dim1=-2, dim2=-1).sum()) == 0.0:
            gram, mean = self[name], None
        samples = self.effective_samples(name) if shrinkage == "ess" else self.samples[name]
        weight = shrinkage_weight(gram, samples, shrinkage)
        return shrink_gram(gram, weight), mean

    def second_moment(self, name, about=None) -> torch.Tensor:
        """``(groups, P, P)`` ``sum (x - about)(x - about)^T`` over ``name``'s rows (``about (groups, P)``, e.g. another
        calibration's mean; None: the uncentered Gram): what the output error of a fit centered at ``about`` sees."""
        G = self[name]
        if about is None:
            return G
        S, n = self.sums[name], self.samples[name]
        m = torch.as_tensor(about, dtype=G.dtype).reshape(S.shape)
        outer = S[:, :, None] * m[:, None, :]
        return G - outer - outer.transpose(1, 2) + n * m[:, :, None] * m[:, None, :]

    def is_undersampled(self, name) -> bool:
        """True when fewer rows than input entries were seen: the Gram has rank < its dimension."""
        return self.samples[name] < self.grams[name].shape[-1]

    def effective_samples(self, name) -> float:
        """The effective sample size of ``name``'s rows (:mod:`layers.sample_size`: ``samples`` divided by
        the variance inflation of correlated rows along their sequence / spatial axes; in ``[1, samples]``).
        ``samples`` itself when no correlation sums were recorded (e.g. a Calibration built by hand)."""
        samples = self.samples[name]
        correlation = self.correlation.get(name)
        return float(samples) if correlation is None else correlation.effective_samples(samples)

    def autocorrelation(self, name) -> list:
        """``[rho_a]``: lag-1 autocorrelation of ``name``'s centered rows along each sequence / spatial axis."""
        correlation = self.correlation.get(name)
        return [] if correlation is None else correlation.autocorrelation()

    def name_of(self, layer, context: str = "") -> str:
        """The name of ``layer``: the calibrated module itself, else the only calibrated layer."""
        for name, ref in self._modules.items():
            if ref() is layer and name in self.grams:
                return name
        if len(self.grams) == 1:
            return next(iter(self.grams))
        prefix = f"{context}: " if context else ""
        raise ValueError(f"{prefix}this layer is not one of the calibrated modules and the calibration holds "
                         f"{len(self.grams)} layers; pass gram=calibration[name] (names: {sorted(self.grams)[:8]}"
                         f"{' ...' if len(self.grams) > 8 else ''}) or use compress(model, calibration=...)")

    def gram_for(self, layer, context: str = "") -> torch.Tensor:
        """The (uncentered) Gram of ``layer`` (see :meth:`name_of`)."""
        return self.grams[self.name_of(layer, context)]

    def __getstate__(self):   # pickling drops the (weak) references to the calibrated modules
        state = dict(self.__dict__)
        state["_modules"] = {}
        return state

    def __copy__(self):       # copies keep them: fisher_in_output_scale and name_of need them
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: v if k == "_modules" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def __repr__(self):
        return f"Calibration({len(self.grams)} layers, {self.batches} batches)"


def calibrate(model, data, max_batches=None, include=None, progress=True, *, exclude=(), batch_size=128,
              chunk_elements=DEFAULT_CHUNK_ELEMENTS, forward=None, memory_limit=None, layers=None, fisher=False,
              loss=None, gram_precision="float64") -> Calibration:
    """Run ``data`` through ``model`` and collect each target layer's input Gram (float64).

    ``data``: an iterable of batches or one tensor that is split into batches of
    ``batch_size``. A batch goes to the model as users have it (:func:`run_model`): a dict /
    ``BatchEncoding`` as ``model(**batch)``, a tuple/list as ``model(*batch)`` when the
    model's forward takes that many positional arguments, else ``model(batch[0])`` (a
    DataLoader's ``(x, y)``); floating tensors are moved to the model's device and dtype.
    When a dict batch holds an ``attention_mask`` (B, T), the rows of padding tokens
    (mask 0) are left out of every Gram whose layer input starts with those (B, T) dims.
    ``forward(model, batch)`` overrides how a batch is run. ``max_batches`` stops early.

    ``include`` (alias ``layers``) / ``exclude``: dotted names or fnmatch patterns of the
    layers to calibrate (default: every Linear / Conv1d/2d/3d / Conv1D / registered kind);
    a pattern matching no such layer raises. A module reached by several names is
    calibrated once, under its first name. Transposed convs (no data-aware fit) and layers
    the walker cannot factorize (subclasses overriding forward: their weight does not see the
    input the hook would record) are not calibrated; ``Calibration.skipped`` lists them with
    the reason.

    ``memory_limit`` (bytes; default half of the available RAM): the Grams are refused
    before any allocation when one, or all together, would exceed it, naming the layer.
    NaN/Inf in a batch or in a layer's input raises at the first batch and layer it is seen.
    The model is not modified (see module docstring). Layers that never ran get no entry.
    Cost: layers reading the same tensor (q/k/v) share one Gram computation per call (each gets
    its own identical entry; :func:`gram_of`); an uncalibrated ``transformers`` LM head runs on
    the last position only (:func:`unused_logits_kwargs`).

    ``gram_precision``: the precision of the Gram's products (sums are always float64;
    :func:`gram_of`): ``"float64"`` (default: exact products of float32 inputs) or
    ``"float32"`` (float32 products over blocks of ``GRAM_BLOCK_ROWS`` = 2048 rows: 1.5-2x faster
    on the CPU, each entry within ``~ 2048 * 6e-8 * sum |x_i x_j|`` at worst, typically
    ``sqrt(2048) * 6e-8 = 3e-6`` of it, as SVD-LLM's all-float32 profiling; the centered
    covariance ``G/N - mean mean^T``
    of a channel whose mean is ``c`` times its standard deviation then loses ``~ c^2`` times
    more, so keep float64 when centering inputs with large means).

    ``fisher=True``: a second pass (forward + backward) records each layer's diagonal output
    Fisher of ``loss(model, batch)`` (default: a causal LM's cross-entropy, else the
    sensitivity of the model's outputs; :func:`layers.fisher.layer_fisher`) in
    ``Calibration.fisher``; ``data`` must then be re-iterable (a tensor or a list of batches).
    """
    include = _check_calibrate_arguments(data, fisher, include, layers, gram_precision, max_batches)
    targets, skipped = _select_layers(model, include, exclude)
    check_memory(targets, memory_limit)
    result = Calibration(skipped=skipped)
    state = {"mask": None, "batch": 0, "last": {}, "products": product_dtype(gram_precision)}
    hooks = []
    try:
        for name, module in targets:
            hooks.append(module.register_forward_pre_hook(_collector(result, name, module, state,
                                                                     chunk_elements)))
        with torch.no_grad(), eval_mode(model):
            for index, batch in enumerate(_progress(iter_batches(data, batch_size), progress, "calibrate",
                                                    _count(data, batch_size, max_batches))):
                if max_batches is not None and index >= max_batches:
                    break
                state["batch"], state["mask"] = index, attention_mask(batch)
                state["last"].clear()
                if forward is not None:
                    forward(model, batch)
                else:
                    run_model(model, batch, what=f"calibrate: batch {index}",
                              extra_kwargs=unused_logits_kwargs(model, targets, batch))
                result.batches += 1
    finally:
        for hook in hooks:
            hook.remove()
    if result.batches == 0:
        raise ValueError("calibrate: data yielded no batches")
    if fisher:
        from .fisher import layer_fisher
        result.fisher = layer_fisher(model, list(result.grams), data, loss=loss, forward=forward,
                                     batch_size=batch_size, max_batches=max_batches)
    return result


def _check_calibrate_arguments(data, fisher, include, layers, gram_precision, max_batches):
    """Raise on a bad combination of :func:`calibrate`'s arguments; returns ``include`` (or its alias)."""
    if fisher and not isinstance(data, torch.Tensor) and iter(data) is data:
        raise TypeError("calibrate(fisher=True) runs the data twice: pass a tensor or a list of batches, "
                        f"not a one-shot {type(data).__name__}")
    if layers is not None:
        if include is not None:
            raise TypeError("calibrate: pass include= (or its alias layers=), not both")
        include = layers
    if gram_precision not in GRAM_PRECISIONS:
        raise ValueError(f"calibrate: gram_precision={gram_precision!r} is not one of {GRAM_PRECISIONS}")
    if isinstance(max_batches, bool) or (max_batches is not None and (not isinstance(max_batches, int)
                                                                       or max_batches < 1)):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int or None")
    return include


def gram_signature(layer) -> tuple:
    """What turns a layer's input tensor into the rows of its Gram: layers with the same signature
    reading the same tensor have the same Gram (e.g. the q/k/v projections of one attention)."""
    if isinstance(layer, nn.Linear):
        return ("linear", layer.in_features)
    return ("conv", type(layer).__name__, layer.in_channels, layer.groups, tuple(layer.kernel_size),
            tuple(layer.stride), tuple(layer.dilation), str(layer.padding), layer.padding_mode)


def _collector(result, name, module, state, chunk_elements):
    """The forward pre-hook that adds one call's inputs of ``module`` to ``result``.

    Layers reading the same input tensor (same object, not modified in place since) with the
    same :func:`gram_signature` share one computation of its statistics per call: the last
    input of each signature is remembered in ``state["last"]`` (cleared between batches)."""
    gram_module = standard_layer(module)
    signature = gram_signature(gram_module)

    def hook(_, args):
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"calibrate: {name} ({type(module).__name__}) was called without a tensor input")
        x = args[0]
        last = state["last"].get(signature)
        if last is not None and last[0] is x and last[1] == x._version:
            statistics = last[2]
        else:
            statistics = _input_statistics(gram_module, x.detach(), state, chunk_elements, name, module)
            statistics += (row_correlation(gram_module, x.detach(), state["mask"]),)
            state["last"][signature] = (x, x._version, statistics)
        _accumulate(result, name, module, gram_module, *statistics[:4])
        if name in result.correlation:
            result.correlation[name].add(statistics[4])
        else:
            result.correlation[name] = copy.deepcopy(statistics[4])
    return hook


def _input_statistics(gram_module, x, state, chunk_elements, name, module):
    """``(G, rows, S, masked)`` of one input ``x`` (``masked``: padding rows left out, None without a mask)."""
    if not all_finite(x):
        raise ValueError(f"calibrate: the input of layer {name} ({type(module).__name__}, weight "
                         f"{tuple(gram_module.weight.shape)}) contains NaN or Inf at batch {state['batch']}; "
                         f"the layers before it (or the data) produce non-finite values")
    x, masked = drop_padding(gram_module, x, state["mask"])
    G, rows, S = input_gram(gram_module, x, chunk_elements=chunk_elements, with_sum=True,
                            products=state["products"])
    return G, rows, S, masked


def drop_padding(layer, x, mask):
    """``(x, masked)``: the input ``x`` of ``layer`` without the rows of padding tokens, and their number.

    The rule: when ``layer`` is a Linear and ``x`` (B, T, ..., P) starts with the (B, T) dims of
    the attention ``mask``, the positions where the mask is 0 are dropped (``x`` becomes
    ``(kept, ..., P)``); otherwise (no mask, a conv, other leading dims) ``x`` is returned as is
    and ``masked`` is None."""
    if not isinstance(layer, nn.Linear) or mask is None or x.ndim < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x, None
    return x[mask.to(x.device).bool()], int((mask == 0).sum())


def _accumulate(result, name, module, gram_module, G, rows, S, masked):
    """Add one call's statistics to ``result``'s entry of ``name`` (a copy: entries never share storage)."""
    if masked is not None:
        result.masked[name] = result.masked.get(name, 0) + masked
    if name in result.grams:
        result.grams[name] += G.to("cpu")
        result.sums[name] += S.to("cpu")
        result.samples[name] += rows
    else:
        result.grams[name], result.sums[name] = (t.to("cpu", copy=True, memory_format=torch.contiguous_format)
                                                 for t in (G, S))
        result.samples[name] = rows
        result.weight_shapes[name] = tuple(gram_module.weight.shape)
        result._modules[name] = weakref.ref(module)


def attention_mask(batch):
    """The ``attention_mask`` tensor of a dict / BatchEncoding batch (None otherwise)."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
    return None


def _positional_capacity(model) -> float:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return math.inf
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _model_dtype_device(model):
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (None, None) if param is None else (param.dtype, param.device)


def _to_model(value, dtype, device):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and dtype is not None:
            return value.to(device=device, dtype=dtype)
        return value.to(device) if device is not None else value
    return value


def model_call(model, batch):
    """``(args, kwargs)`` the model is called with for ``batch`` (see :func:`calibrate`)."""
    dtype, device = _model_dtype_device(model)
    if isinstance(batch, Mapping):
        return (), {k: _to_model(v, dtype, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch")
        items = [_to_model(v, dtype, device) for v in batch]
        return (tuple(items) if len(items) <= _positional_capacity(model) else (items[0],)), {}
    return (_to_model(batch, dtype, device),), {}


def _describe_batch(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, Mapping):
        return "dict(" + ", ".join(f"{k}={_describe_batch(v)}" for k, v in batch.items()) + ")"
    if isinstance(batch, (tuple, list)):
        return type(batch).__name__ + "(" + ", ".join(_describe_batch(v) for v in batch) + ")"
    return type(batch).__name__


def _check_finite(batch, what):
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not all_finite(value):
            raise ValueError(f"{what}: the data contains NaN or Inf ({_describe_batch(batch)})")


def unused_logits_kwargs(model, targets, batch) -> dict:
    """``{"logits_to_keep": 1}`` when ``model`` is a ``transformers`` LM whose output head is not among
    ``targets`` ([(name, module)]) and the batch asks for no loss (no ``labels``), else ``{}``.

    Calibration discards the model's outputs, so the head (a vocabulary-sized product per
    token) then runs on the last position only; every layer before it sees the same inputs.
    """
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError, TypeError):   # not a transformers model, or no head
        head = None
    if not isinstance(head, nn.Module) or isinstance(batch, (tuple, list)):
        return {}
    if isinstance(batch, Mapping) and ("labels" in batch or "logits_to_keep" in batch):
        return {}
    inside = {id(m) for m in head.modules()}
    if any(id(module) in inside for _, module in targets):
        return {}
    try:
        accepted = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if accepted else {}


def run_model(model, batch, what="batch", extra_kwargs=None):
    """Run ``model`` on ``batch`` as :func:`model_call` says; a failure inside names the layer it reached.

    ``extra_kwargs`` are added to the call's keyword arguments. Errors raised by the model's
    forward (wrong shape, wrong dtype, a dict given to a model taking a tensor) become a
    ValueError naming the batch, the last layer entered and the input shape it got.
    """
    _check_finite(batch, what)
    args, kwargs = model_call(model, batch)
    kwargs = {**kwargs, **(extra_kwargs or {})}
    names = {id(m): n for n, m in model.named_modules()}
    last = {}

    def track(module, inputs):
        if id(module) in names:
            last["name"], last["module"] = names[id(module)], module
            last["shape"] = tuple(inputs[0].shape) if inputs and isinstance(inputs[0], torch.Tensor) else None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(track)
    try:
        return model(*args, **kwargs)
    except (RuntimeError, TypeError, AttributeError, IndexError, KeyError) as err:
        where = ""
        if last:
            weight = getattr(last["module"], "weight", None)
            shape = f", weight {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else ""
            where = (f" at {last['name'] or 'the model'} ({type(last['module']).__name__}{shape}), which got an "
                     f"input of shape {last['shape']}")
        raise ValueError(f"{what}: the model's forward failed on {_describe_batch(batch)}{where}: "
                         f"{type(err).__name__}: {err}") from err
    finally:
        handle.remove()


# --------------------------------------------------------------------------- memory guard

DEFAULT_MEMORY_FRACTION = 0.5


def statistic_bytes(module) -> int:
    """Bytes of the float64 Gram + row sums ``calibrate`` keeps for ``module``."""
    layer = standard_layer(module)
    if isinstance(layer, nn.Linear):
        groups, P = 1, layer.in_features
    else:
        groups, P = layer.groups, (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return 8 * groups * P * (P + 1)


def available_memory() -> int:
    """Available RAM in bytes (psutil when installed, else /proc via sysconf)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is usually present
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _size(n_bytes) -> str:
    for unit, factor in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n_bytes >= factor:
            return f"{n_bytes / factor:.2f} {unit}"
    return f"{int(n_bytes)} B"


def check_memory(targets, memory_limit=None) -> None:
    """Refuse (MemoryError naming the layer and what to do) statistics that would exceed ``memory_limit`` bytes."""
    if memory_limit is None:
        memory_limit = DEFAULT_MEMORY_FRACTION * available_memory()
    elif isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float)) or not memory_limit > 0:
        raise ValueError(f"calibrate: memory_limit={memory_limit!r} must be a positive number of bytes")
    sizes = {name: statistic_bytes(module) for name, module in targets}
    advice = ("exclude it (exclude=[name]), calibrate fewer layers at a time (include=), use a layer with fewer "
              "input channels x kernel entries per patch, or raise memory_limit=")
    for name, size in sizes.items():
        if size > memory_limit:
            module = dict(targets)[name]
            raise MemoryError(f"calibrate: layer {name} ({type(module).__name__}, weight "
                              f"{tuple(standard_layer(module).weight.shape)}) needs a {_size(size)} float64 "
                              f"Gram, over memory_limit={_size(memory_limit)}; {advice}")
    total = sum(sizes.values())
    if total > memory_limit:
        largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
        raise MemoryError(f"calibrate: the Grams of the {len(sizes)} layers need {_size(total)} together, "
                          f"over memory_limit={_size(memory_limit)} (largest: "
                          f"{', '.join(f'{n} {_size(sizes[n])}' for n in largest)}); calibrate the layers "
                          f"in several calls with include=/exclude=, or raise memory_limit=")


# --------------------------------------------------------------------------- Grams

def product_dtype(gram_precision) -> torch.dtype:
    """The dtype of a Gram's products for ``calibrate(gram_precision=...)``."""
    return torch.float32 if gram_precision == "float32" else torch.float64


def gram_of(rows: torch.Tensor, products=torch.float64) -> torch.Tensor:
    """``rows^T rows`` ``(P, P)`` in float64 for ``rows (N, P)``, exactly symmetric.

    ``products=torch.float64``: the products and sums are float64 (the rows are converted
    first). ``products=torch.float32``: the rows are converted to float32, each block of
    ``GRAM_BLOCK_ROWS`` rows is multiplied in float32 and the blocks are summed in float64;
    entry ``(i, j)`` is then within ``~ GRAM_BLOCK_ROWS * 6e-8 * sum_r |x_ri x_rj|`` of the
    float64 product (typically ``sqrt(GRAM_BLOCK_ROWS) * 6e-8`` of that sum), and 1.5-2x faster
    (the blocks' triangles are summed and mirrored once). On the CPU the symmetric
    rank-N update (BLAS ``dsyrk`` / ``ssyrk``: one triangle, half the multiplications of a
    general product, run on ``torch.get_num_threads()`` BLAS threads) is used and mirrored;
    elsewhere a matmul.
    """
    if products == torch.float64:
        return symmetric_gram(rows.detach().to(torch.float64))
    return _blocked_gram(rows.detach().to(torch.float32))


def gram_and_sum(rows: torch.Tensor, products=torch.float64) -> tuple:
    """``(rows^T rows (P, P), rows.sum(0) (P,))`` in float64 for ``rows (N, P)``, from ONE product.

    The rows are copied once into an ``(N, P + 1)`` buffer of the products' dtype whose last
    column is 1: the Gram of the buffer holds ``rows^T rows`` in its leading block and the
    row sum in its last row (so the conversion and the sum cost no pass of their own).
    Same precision as :func:`gram_of` (the sum's entries are products by 1: exact in float64,
    float32 sums of ``GRAM_BLOCK_ROWS`` rows added in float64 with ``products=torch.float32``).
    """
    N, P = rows.shape
    augmented = torch.empty(N, P + 1, dtype=products, device=rows.device)
    augmented[:, :P] = rows.detach()
    augmented[:, P] = 1.0
    full = gram_of(augmented, products)
    return full[:P, :P], full[P, :P]


def _blocked_gram(R: torch.Tensor) -> torch.Tensor:
    """float64 sum over blocks of ``GRAM_BLOCK_ROWS`` rows of the float32 Grams of a float32 ``R (N, P)``
    (the blocks' upper triangles are summed, the sum mirrored once; one block is mirrored in float32,
    exactly, then converted)."""
    if R.shape[0] <= GRAM_BLOCK_ROWS:
        return symmetric_gram(R).to(torch.float64)
    total = gram_upper_triangle(R[:GRAM_BLOCK_ROWS]).to(torch.float64)
    for start in range(GRAM_BLOCK_ROWS, R.shape[0], GRAM_BLOCK_ROWS):
        total += gram_upper_triangle(R[start:start + GRAM_BLOCK_ROWS])
    return mirror_upper(total)


def input_gram(layer, x, chunk_elements=DEFAULT_CHUNK_ELEMENTS, with_sum=False, products=torch.float64):
    """``(G, rows)``: the float64 Gram ``(groups, P, P)`` of ``layer``'s weight-matrix inputs for input ``x``.

    ``with_sum=True`` returns ``(G, rows, S)`` with ``S (groups, P)`` the sum of the rows.
    Sums are float64, products in ``products`` (:func:`gram_of`), over chunks of at most
    ``chunk_elements`` numbers. ``G`` and ``S`` may be views of one buffer (copy before storing).
    """
    if isinstance(layer, nn.Linear):
        rows = x.detach().reshape(-1, x.shape[-1])
        step = max(1, chunk_elements // max(rows.shape[1], 1))
        G, S = gram_and_sum(rows[:step], products)
        for start in range(step, rows.shape[0], step):
            gram, total = gram_and_sum(rows[start:start + step], products)
            G += gram
            S += total
        return (G[None], rows.shape[0], S[None]) if with_sum else (G[None], rows.shape[0])
    if isinstance(layer, CONV_TYPES):
        G, rows, S = _conv_gram(layer, x.detach(), chunk_elements, products)
        return (G, rows, S) if with_sum else (G, rows)
    raise TypeError(f"input_gram: expected nn.Linear or nn.Conv1d/2d/3d, got {type(layer).__name__}")


def explicit_padding(conv) -> list:
    """``[(left, right)]`` per spatial dim, as the conv pads (int/tuple, 'valid', 'same')."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [(0, 0)] * dims
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in conv.padding]


def pad_input(conv, x):
    """``x`` padded as ``conv`` pads it (its padding_mode), so a padding-free unfold follows."""
    pads = explicit_padding(conv)
    flat = [v for pair in reversed(pads) for v in pair]
    if not any(flat):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, flat, mode=mode)


def unfold_patches(conv, x):
    """View ``(B, C, *out_spatial, *kernel)`` of the im2col patches of ``x`` (already padded)."""
    dims = len(conv.kernel_size)
    for i, (k, s, d) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    if x.ndim != 2 + 2 * dims:  # pragma: no cover - defensive
        raise RuntimeError("unexpected unfold shape")
    return x


def _conv_gram(conv, x, chunk_elements, products=torch.float64):
    dims = len(conv.kernel_size)
    unbatched = x.ndim == dims + 1
    if unbatched:
        x = x[None]
    g, C = conv.groups, conv.in_channels
    patches = unfold_patches(conv, pad_input(conv, x))  # (B, C, *O, *K)
    B, out_spatial = patches.shape[0], tuple(patches.shape[2:2 + dims])
    K = 1
    for k in conv.kernel_size:
        K *= k
    P = (C // g) * K
    G = torch.zeros(g, P, P, dtype=torch.float64, device=x.device)
    S = torch.zeros(g, P, dtype=torch.float64, device=x.device)
    positions = 1
    for o in out_spatial:
        positions *= o
    per_sample = positions * C * K
    # chunks along the batch, and along the first output dim when one sample is too big
    samples_per_chunk = max(1, chunk_elements // max(per_sample, 1))
    rows_per_chunk = out_spatial[0] if samples_per_chunk > 1 or not out_spatial else max(
        1, chunk_elements // max(per_sample // max(out_spatial[0], 1), 1))
    perm = [0] + list(range(2, 2 + dims)) + [1] + list(range(2 + dims, 2 + 2 * dims))
    for b0 in range(0, B, samples_per_chunk):
        for o0 in range(0, out_spatial[0] if out_spatial else 1, rows_per_chunk):
            view = patches[b0:b0 + samples_per_chunk]
            if out_spatial:
                view = view[:, :, o0:o0 + rows_per_chunk]
            # (b, *O, C, *K) -> (rows, g, C/g*K) -> (g, rows, P)
            chunk = view.permute(perm).reshape(-1, g, P).transpose(0, 1)
            if g == 1:
                gram, total = gram_and_sum(chunk[0], products)
                G[0] += gram
                S[0] += total
            else:   # many small per-group Grams: one batched float64 product
                chunk = chunk.double()
                G += chunk.transpose(1, 2) @ chunk
                S += chunk.sum(1)
    return G, B * positions, S


# --------------------------------------------------------------------------- shrinkage

SHRINKAGE_RULES = ("auto", "ess", "oas", "held_out")
# the weights shrinkage="held_out" tries (besides OAS's): none, then half-decades up to the scaled identity
HELD_OUT_WEIGHTS = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
HELD_OUT_HINT = ("shrinkage='held_out' chooses each layer's shrinkage weight by its relative output error on "
                 "held-out inputs: pass held_out=<batches, in any form calibrate() accepts, not the calibration "
                 "data> to compress(), or use shrinkage='auto', 'oas', a weight in [0, 1] or None")


def oas_weight(gram, samples) -> torch.Tensor:
    """Per block, the Oracle Approximating Shrinkage weight of Chen, Wiesel, Eldar & Hero (2010, eq. 23).

    For the sample second moment ``S = gram / n`` of dimension ``p``::

        rho = min(1, ((1 - 2/p) tr(S^2) + tr(S)^2) / ((n + 1 - 2/p) (tr(S^2) - tr(S)^2 / p)))

    (scale-free, so it is computed on ``gram`` directly). It minimizes the expected
    Frobenius error of ``(1 - rho) S + rho tr(S)/p I`` for Gaussian data and, unlike
    Ledoit-Wolf, needs no fourth moments: the Gram and the row count are enough.
    """
    G = gram if gram.ndim == 3 else gram[None]
    p = G.shape[-1]
    tr = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    tr2 = (G * G).sum((-2, -1))
    numerator = (1 - 2 / p) * tr2 + tr ** 2
    denominator = (samples + 1 - 2 / p) * (tr2 - tr ** 2 / p)
    rho = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.ones_like(tr))
    return rho.clamp(0.0, 1.0)


def shrinkage_weight(gram, samples, rule="auto"):
    """The shrinkage weight(s) for ``rule``: ``"auto"`` and ``"ess"`` = OAS when ``samples`` < dimension,
    else none; ``"oas"`` = OAS always; a number in [0, 1] = that weight; ``None`` / ``0`` = none.

    ``samples``: the rows the Gram holds for ``"auto"`` / ``"oas"``, the effective sample size
    (:meth:`Calibration.effective_samples`) for ``"ess"`` (the callers pass the right one). OAS's
    weight is derived for independent rows and correlated rows (tokens of one sentence, patches of
    one image) are worth fewer, but measured on real models the effective count over-shrinks the
    Grams of convs, whose neighbouring patches are strongly correlated (CRAFT at 12.5% of its MACs,
    loss-aware budget: word F1 0.975 with the row count, 0.952 with the effective count), while on a
    transformer calibrated on 64 sentences it helps (MiniLM held-out cosine 0.72 -> 0.82): ``"auto"``
    uses the row count, ``"ess"`` the effective one, and ``compress(held_out=)`` validates the
    choice on the layers whose effective count is below their dimension (:func:`layer_sampling`).
    ``"held_out"`` is resolved by ``compress(..., held_out=)`` (:func:`calibrated_plan`), not here.
    """
    if rule is None:
        return None
    if isinstance(rule, str):
        if rule not in SHRINKAGE_RULES:
            raise ValueError(f"shrinkage={rule!r} is not one of {SHRINKAGE_RULES}, a number in [0, 1] or None")
        if rule == "held_out":
            raise ValueError(HELD_OUT_HINT)
        if rule in ("auto", "ess") and samples >= gram.shape[-1]:
            return None
        return oas_weight(gram, samples)
    if isinstance(rule, bool) or not isinstance(rule, (int, float)) or not 0 <= rule <= 1:
        raise ValueError(f"shrinkage={rule!r} must be one of {SHRINKAGE_RULES}, a number in [0, 1] or None")
    return None if rule == 0 else torch.full(gram.shape[:-2] or (1,), float(rule), dtype=gram.dtype)


def shrink_gram(gram, weight):
    """``(1 - w) G + w tr(G)/p I`` per block (``weight`` None: ``gram`` unchanged).

    Why: with fewer calibration rows ``n`` than input entries ``p`` the Gram has rank ``n``,
    so a data-aware fit can zero the output error on the calibration rows while the error
    on new inputs is large (directions the data never excited are treated as free). The
    scaled identity keeps every direction's weight error in the objective, in proportion
    to how little the data says about it.
    """
    if weight is None:
        return gram
    G = gram if gram.ndim == 3 else gram[None]
    p = G.shape[-1]
    w = weight.to(G.dtype).reshape(-1, 1, 1)
    mu = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1).reshape(-1, 1, 1) / p
    eye = torch.eye(p, dtype=G.dtype, device=G.device)
    out = (1 - w) * G + w * mu * eye
    return out if gram.ndim == 3 else out[0]


def shrunk_alike(statistics, rows, rule) -> tuple:
    """``(w, shrunk)``: the one weight ``w`` of ``rule`` (:func:`shrinkage_weight` on ``statistics[1]`` and ``rows``;
    the largest over blocks; 0.0 for none) and every matrix of ``statistics`` shrunk by it (:func:`shrink_gram`;
    unchanged when ``w`` is 0). A sequential fit's ``X^T X``, ``X'^T X'`` and ``X'^T X`` are shrunk alike, so
    that the objective they define stays one objective."""
    weight = shrinkage_weight(statistics[1], rows, rule)
    w = 0.0 if weight is None else float(weight.max())
    return w, [shrink_gram(S, torch.tensor([w], dtype=S.dtype)) if w else S for S in statistics]


# --------------------------------------------------------------------------- compress(calibration=)

OUTPUT_BOUND_NOTE = ("data-aware (calibrated) layers: rel_error_bound is the relative OUTPUT error "
                     "||(W - W')(X - mean)^T||_F / ||W (X - mean)^T||_F MEASURED ON THE CALIBRATION DATA X (centered; "
                     "the bias absorbs the mean shift (W - W') mean; layers without a bias use X uncentered; with "
                     "shrinkage, on the regularized Gram), not a weight error and not a guarantee on new inputs; "
                     "rel_error is the relative weight error; pass held_out= to compress to see the held-out error")


@dataclass
class LayerSampling:
    """What ``compress`` records about one calibrated layer's statistics (shown per layer in the report).

    ``samples``: the Gram's rows; ``effective_samples``: what they are worth as independent rows
    (:meth:`Calibration.effective_samples`); ``input_dim``: the Gram's dimension ``P``; ``shrinkage``:
    the weight applied (mean over the groups of a grouped conv; None: none). When the weight is
    chosen by held-out error, ``candidates`` lists ``(label, weight)`` pairs to try (weight a
    ``(groups,)`` tensor or None) and ``gram`` is the unshrunk statistics they shrink.
    """

    samples: int
    effective_samples: float
    input_dim: int
    shrinkage: float | None = None
    candidates: list = field(default_factory=list)
    gram: torch.Tensor | None = None

    @property
    def undersampled(self) -> bool:
        """Fewer effective rows than input entries: the Gram is estimated from too little data."""
        return self.effective_samples < self.input_dim


def layer_sampling(calibration, name, gram, rule, held_out=False) -> tuple:
    """``(LayerSampling, weight)`` of ``name`` for the shrinkage ``rule`` (``gram``: its unshrunk statistics).

    ``"held_out"`` (needs ``held_out``), and ``"auto"`` when ``held_out`` data is given and the
    layer is undersampled (effective samples < dimension): the weight is chosen later by held-out
    error among :data:`HELD_OUT_WEIGHTS` and OAS's (with the row count and with the effective
    one); until then (and for the rank of an energy / tol spec) the ``"auto"`` weight stands.
    Every other rule: :func:`shrinkage_weight` (``"ess"`` with the effective sample size).
    """
    if rule == "held_out" and not held_out:
        raise ValueError(f"{name}: {HELD_OUT_HINT}")
    ess, dim, rows = calibration.effective_samples(name), gram.shape[-1], calibration.samples[name]
    search = rule == "held_out" or (rule == "auto" and held_out and ess < dim)
    weight = shrinkage_weight(gram, ess if rule == "ess" else rows, "auto" if search else rule)
    info = LayerSampling(calibration.samples[name], ess, dim, None if weight is None else float(weight.mean()))
    if search:
        blocks = gram.shape[0] if gram.ndim == 3 else 1
        info.gram = gram
        info.candidates = [(f"{w:g}", None if w == 0 else torch.full((blocks,), w, dtype=gram.dtype))
                           for w in HELD_OUT_WEIGHTS] + [("oas", oas_weight(gram, rows)),
                                                         ("oas ess", oas_weight(gram, ess))]
    return info, weight


def calibrated_plan(plan, layers, calibration, report, held_out=False) -> tuple:
    """``(plan, sampling)``: ``compress``'s per-layer plan with each layer's statistics added as ``gram=`` /
    ``input_mean=``, and ``{name: LayerSampling}`` of the calibrated layers.

    ``plan``: ``{name: settings dict or "skipped: ..." string}``; ``layers``: ``{name: the plain
    Linear/ConvNd equivalent}``. A targeted layer without a Gram (it did not run during
    calibrate, or was not selected) is skipped with that reason; a layer whose method has no
    data-aware variant is decomposed from its weights alone and listed in a report note.
    ``settings["shrinkage"]`` (default ``"auto"``, see :func:`layer_sampling`) regularizes the
    Gram; ``held_out``: whether compress got held-out data (then ``"auto"`` chooses the weight of
    undersampled layers by held-out error, and ``"held_out"`` is allowed).
    """
    from .registry import available_methods

    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration= must be a layers.calibrate.Calibration (from decomp_toolkit.layers.calibrate("
                        f"model, data)), got {type(calibration).__name__}")
    methods, new_plan, weight_only, sampling, missing = available_methods(), dict(plan), [], {}, []
    for name, settings in plan.items():
        if isinstance(settings, str) or name not in layers:
            continue
        layer, method = layers[name], settings.get("method", "svd")
        entry = methods.get(method)
        kind = "linear" if isinstance(layer, nn.Linear) else len(layer.kernel_size)
        if entry is None or kind not in entry.builders or not {"gram", "input_mean"} <= set(entry.options(kind)) \
                or is_transposed(layer):
            weight_only.append(f"{name} ({method})")
            new_plan[name] = {k: v for k, v in settings.items() if k not in ("center", "shrinkage")}
            continue
        if name not in calibration:
            why = calibration.skipped.get(name, "it did not run during calibrate(), or was not selected by include=")
            new_plan[name] = f"skipped: no calibration Gram for this layer ({why})"
            missing.append(name)
            continue
        shape = calibration.weight_shapes.get(name)
        if shape is not None and tuple(shape) != tuple(layer.weight.shape):
            raise ValueError(f"{name}: the calibration was recorded for a weight of shape {tuple(shape)}, but the "
                             f"layer's weight has shape {tuple(layer.weight.shape)}; calibrate this model")
        center = settings.get("center", True) and layer.bias is not None
        gram, mean = calibration.statistics(name, center=center, shrinkage=None)
        sampling[name], weight = layer_sampling(calibration, name, gram, settings.get("shrinkage", "auto"), held_out)
        new_plan[name] = {**{k: v for k, v in settings.items() if k not in ("center", "shrinkage")},
                          "gram": shrink_gram(gram, weight), "input_mean": mean}
    _check_calibration_matches(missing, sampling, calibration)
    if sampling:
        report.notes.append(OUTPUT_BOUND_NOTE)
    if weight_only:
        report.notes.append("no data-aware variant (decomposed from the weights alone, weight-error bounds): "
                            + ", ".join(weight_only))
    return new_plan, sampling


def _check_calibration_matches(missing, sampling, calibration):
    """ValueError when the calibration holds a Gram for none of the layers that would use one (``missing``: the
    layers without one; ``sampling``: those with one), e.g. a calibration of another model or of other layers:
    every such layer would be kept dense."""
    if missing and not sampling:
        raise ValueError(f"calibration= holds no Gram for any of the {len(missing)} layers to compress (layers: "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}; calibrated: {calibration.names()[:6]}"
                         f"{' ...' if len(calibration) > 6 else ''}): was it recorded on another model or with "
                         f"another include=? Run calibrate(model, data) on this model")


def undersampled_note(records) -> str | None:
    """The report note listing the replaced layers calibrated on fewer effective rows than their input
    dimension (``records``: LayerRecords with ``samples`` / ``effective_samples`` / ``input_dim`` / ``shrinkage``)."""
    listed = []
    for r in records:
        if not r.replaced or r.effective_samples is None or r.effective_samples >= r.input_dim:
            continue
        rows = f"{r.samples} rows < {r.input_dim}" if r.samples < r.input_dim else \
            f"{r.samples} rows, effective {r.effective_samples:.0f} < {r.input_dim}"
        how = "none" if not r.shrinkage else f"{r.shrinkage:.3g}"
        listed.append(f"{r.name} ({rows}) shrinkage {how}{' [held-out choice]' if r.shrinkage_errors else ''}")
    if not listed:
        return None
    return ("calibration too small for these layers (effective samples < input dimension: rows of one sequence / "
            "image are correlated, layers.sample_size; the Gram is regularized towards a scaled identity with the "
            "weight shown, layers.calibrate.shrink_gram: OAS when the rows themselves are fewer than the dimension "
            "(shrinkage='ess': when the effective ones are), or with held_out= the weight of smallest held-out "
            "output error): " + ", ".join(listed))


# --------------------------------------------------------------------------- data plumbing

def iter_batches(data, batch_size=128):
    """Batches of ``data``: a tensor is split along dim 0; anything else is iterated as is."""
    if isinstance(data, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        return (data[i:i + batch_size] for i in range(0, len(data), batch_size))
    try:
        return iter(data)
    except TypeError:
        raise TypeError(f"data must be a tensor or an iterable of batches, got {type(data).__name__}") from None


def batch_input(batch):
    """The model input of a batch: the tensor itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty batch")
        return batch[0]
    return batch


def _count(data, batch_size, max_batches):
    try:
        total = -(-len(data) // batch_size) if isinstance(data, torch.Tensor) else len(data)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def _select_layers(model, include, exclude=()):
    """``(targets [(name, module)], skipped {name: reason})``: every candidate module once, by first name."""
    from .compress import _is_candidate, data_aware_reason
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: expected an nn.Module, got {type(model).__name__}")
    seen, candidates, skipped = set(), [], {}
    for name, module in model.named_modules():
        if _is_candidate(module) and id(module) not in seen:  # the root too: calibrate(layer, x) works
            seen.add(id(module))
            reason = data_aware_reason(module)
            if reason is None:
                candidates.append((name, module))
            else:
                skipped[name] = reason
    patterns = None if include is None else ([include] if isinstance(include, str) else list(include))
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    for label, group in (("include", patterns or []), ("exclude", excluded)):
        for pattern in group:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in candidates):
                refused = [f"{n} ({r})" for n, r in skipped.items() if fnmatch.fnmatchcase(n, pattern)]
                if refused:
                    raise ValueError(f"calibrate: {label} pattern {pattern!r} matches only layers that cannot be "
                                     f"calibrated: {refused[:4]}")
                raise ValueError(f"calibrate: {label} pattern {pattern!r} matches no Linear/Conv module; "
                                 f"available: {[n for n, _ in candidates][:12]}")
    chosen = [(n, m) for n, m in candidates if (patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns))
              and not any(fnmatch.fnmatchcase(n, p) for p in excluded)]
    return chosen, skipped


def _progress(items, enabled, desc, total):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", total=total, leave=False)


__all__ = ["Calibration", "calibrate", "input_gram", "iter_batches", "batch_input"]
