"""``calibrate(model, data)``: per-layer input Gram matrices for data-aware decomposition.

For every targeted ``nn.Linear`` / ``nn.Conv1d/2d/3d`` a forward pre-hook accumulates, in
float64, the Gram ``X^T X`` of the layer's inputs as the layer's weight matrix sees them:

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

import fnmatch
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._accounting import CONV_TYPES

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M float64 numbers = 32 MiB of patches at a time


@dataclass
class Calibration:
    """Input Grams of the calibrated layers, keyed by dotted module name.

    ``grams[name]``: float64 CPU tensor ``(groups, P, P)`` (``groups = 1`` for Linear);
    ``sums[name]``: ``(groups, P)`` the sum of the rows (for the mean / covariance);
    ``samples[name]``: rows accumulated (input vectors, or patches per group);
    ``weight_shapes[name]``: the layer's weight shape; ``batches``: batches run.
    ``calibration[name]`` is the Gram; ``calibration.gram_for(layer)`` finds a layer of
    the calibrated model by identity (or the only entry).
    """

    grams: dict = field(default_factory=dict)
    sums: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    weight_shapes: dict = field(default_factory=dict)
    batches: int = 0
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
        """``(groups, P, P)`` centered Gram ``sum (x - mean)(x - mean)^T = X^T X - n mean mean^T`` (PSD)."""
        G, S, n = self[name], self.sums[name], max(self.samples[name], 1)
        C = G - S[:, :, None] * S[:, None, :] / n
        return 0.5 * (C + C.transpose(1, 2))

    def statistics(self, name, center: bool = True):
        """``(gram, mean)`` to pass as ``gram=, input_mean=``: the covariance and mean when ``center``,
        else the uncentered Gram and None."""
        return (self.covariance(name), self.mean(name)) if center else (self[name], None)

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

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_modules"] = {}
        return state

    def __repr__(self):
        return f"Calibration({len(self.grams)} layers, {self.batches} batches)"


def calibrate(model, data, max_batches=None, layers=None, progress=True, *, batch_size=128,
              chunk_elements=DEFAULT_CHUNK_ELEMENTS, forward=None) -> Calibration:
    """Run ``data`` through ``model`` and collect each target layer's input Gram (float64).

    ``data``: an iterable of batches, each a tensor or a tuple/list whose first element is
    the model input (e.g. a DataLoader yielding ``(x, y)``), or one tensor that is split
    into batches of ``batch_size``. ``max_batches`` stops early. ``layers``: dotted names
    or fnmatch patterns of the modules to calibrate (default: every Linear/Conv1d/2d/3d;
    transposed convs are never targeted); a pattern that matches no such module raises
    ValueError. ``progress`` shows a tqdm bar. The model is not modified (see module
    docstring). Layers that never ran get no entry. ``forward(model, batch)`` runs the
    model on one batch (default: ``model(first element)``; e.g. ``lambda m, b: m(*b)`` for
    a model taking several tensors).
    """
    targets = _select_layers(model, layers)
    if isinstance(max_batches, bool) or (max_batches is not None and (not isinstance(max_batches, int)
                                                                       or max_batches < 1)):
        raise ValueError(f"max_batches={max_batches!r} must be a positive int or None")
    result = Calibration()
    device = next((p.device for p in model.parameters()), None)
    hooks, modes = [], {m: m.training for m in model.modules()}

    def collect(name):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"calibrate: {name} ({type(module).__name__}) was called without a tensor input")
            G, rows, S = input_gram(module, args[0], chunk_elements=chunk_elements, with_sum=True)
            if name in result.grams:
                result.grams[name] += G.cpu()
                result.sums[name] += S.cpu()
                result.samples[name] += rows
            else:
                result.grams[name], result.sums[name], result.samples[name] = G.cpu(), S.cpu(), rows
                result.weight_shapes[name] = tuple(module.weight.shape)
                result._modules[name] = weakref.ref(module)
        return hook

    try:
        for name, module in targets:
            hooks.append(module.register_forward_pre_hook(collect(name)))
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(_progress(iter_batches(data, batch_size), progress, "calibrate",
                                                    _count(data, batch_size, max_batches))):
                if max_batches is not None and index >= max_batches:
                    break
                if forward is not None:
                    forward(model, batch)
                else:
                    x = batch_input(batch)
                    model(x.to(device) if device is not None and isinstance(x, torch.Tensor) else x)
                result.batches += 1
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    if result.batches == 0:
        raise ValueError("calibrate: data yielded no batches")
    return result


# --------------------------------------------------------------------------- Grams

def input_gram(layer, x, chunk_elements=DEFAULT_CHUNK_ELEMENTS, with_sum=False):
    """``(G, rows)``: the float64 Gram ``(groups, P, P)`` of ``layer``'s weight-matrix inputs for input ``x``.

    ``with_sum=True`` returns ``(G, rows, S)`` with ``S (groups, P)`` the sum of the rows.
    """
    if isinstance(layer, nn.Linear):
        rows = x.detach().reshape(-1, x.shape[-1])
        G = torch.zeros(1, rows.shape[1], rows.shape[1], dtype=torch.float64, device=x.device)
        S = torch.zeros(1, rows.shape[1], dtype=torch.float64, device=x.device)
        step = max(1, chunk_elements // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step].double()
            G[0] += chunk.T @ chunk
            S[0] += chunk.sum(0)
        return (G, rows.shape[0], S) if with_sum else (G, rows.shape[0])
    if isinstance(layer, CONV_TYPES):
        G, rows, S = _conv_gram(layer, x.detach(), chunk_elements)
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


def _conv_gram(conv, x, chunk_elements):
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
            chunk = view.permute(perm).reshape(-1, g, P).double().transpose(0, 1)
            G += chunk.transpose(1, 2) @ chunk
            S += chunk.sum(1)
    return G, B * positions, S


# --------------------------------------------------------------------------- compress(calibration=)

OUTPUT_BOUND_NOTE = ("data-aware (calibrated) layers: rel_error_bound is the certified relative OUTPUT error "
                     "||(W - W')(X - mean)^T||_F / ||W (X - mean)^T||_F on the calibration inputs X (centered; the "
                     "bias absorbs the mean shift (W - W') mean, so it is the whole output error; layers without a "
                     "bias use X uncentered), not a weight error; rel_error is still the relative weight error")


def calibrated_plan(plan, layers, calibration, report):
    """``compress``'s per-layer plan with each layer's Gram added as ``gram=`` (returns a new plan).

    ``plan``: ``{name: settings dict or "skipped: ..." string}``; ``layers``: ``{name: module}``.
    A targeted layer without a Gram (it did not run during calibrate, or was not selected)
    is skipped with that reason; a layer whose method has no data-aware variant is
    decomposed from its weights alone and listed in a report note.
    """
    from .registry import available_methods

    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration= must be a layers.calibrate.Calibration (from decomp_toolkit.layers.calibrate(model, data)), "
                        f"got {type(calibration).__name__}")
    methods, new_plan, weight_only, used = available_methods(), dict(plan), [], False
    for name, settings in plan.items():
        if isinstance(settings, str) or not isinstance(layers[name], (nn.Linear,) + CONV_TYPES):
            continue
        method = settings.get("method", "svd")
        entry = methods.get(method)
        kind = "linear" if isinstance(layers[name], nn.Linear) else len(layers[name].kernel_size)
        if entry is None or kind not in entry.builders or not {"gram", "input_mean"} <= set(entry.options(kind)):
            weight_only.append(f"{name} ({method})")
            continue
        if name not in calibration:
            new_plan[name] = ("skipped: no calibration Gram for this layer (it did not run during calibrate(), "
                              "or was not selected by its layers=)")
            continue
        shape = calibration.weight_shapes.get(name)
        if shape is not None and tuple(shape) != tuple(layers[name].weight.shape):
            raise ValueError(f"{name}: the calibration was recorded for a weight of shape {tuple(shape)}, but the "
                             f"layer's weight has shape {tuple(layers[name].weight.shape)}; calibrate this model")
        center = settings.get("center", True) and layers[name].bias is not None
        gram, mean = calibration.statistics(name, center=center)
        new_plan[name] = {**{k: v for k, v in settings.items() if k != "center"}, "gram": gram, "input_mean": mean}
        used = True
    if used:
        report.notes.append(OUTPUT_BOUND_NOTE)
    if weight_only:
        report.notes.append("no data-aware variant (decomposed from the weights alone, weight-error bounds): "
                            + ", ".join(weight_only))
    return new_plan


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


def _select_layers(model, layers):
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: expected an nn.Module, got {type(model).__name__}")
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear,) + CONV_TYPES)]
    if layers is None:
        return candidates
    patterns = [layers] if isinstance(layers, str) else list(layers)
    chosen = []
    for pattern in patterns:
        hits = [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"calibrate: layers pattern {pattern!r} matches no Linear/Conv module; "
                             f"available: {[n for n, _ in candidates][:12]}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _progress(items, enabled, desc, total):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, unit="batch", total=total, leave=False)


__all__ = ["Calibration", "calibrate", "input_gram", "iter_batches", "batch_input"]
