"""Hidden-unit (interpolative) compression of layer pairs: producers -> channel-wise ops -> consumer.

A transformer MLP ``down(act(up(x)))`` (or the gated ``down(act(gate(x)) * up(x))``), or two
chained convs ``conv2(relu(bn(conv1(x))))``, is shrunk by keeping ``k`` of its ``n`` hidden units
(channels): the producers keep the rows (output channels) of those units, the channel-wise
modules between them (``between``: BatchNorms and depthwise convs) keep their entries, and the consumer keeps their
columns (input channels), refitted by least squares so that it reproduces the original model's
outputs from the inputs it really receives (:mod:`decomp.interpolative`; a conv's input channel
is the group of its ``kh * kw`` im2col columns). The result is smaller plain ``nn.Linear`` /
``nn.ConvNd`` layers: no extra matmul or conv, so the FLOP saving is realized by the same
kernels as the dense layer, and the nonlinearity between the two layers is kept (a low-rank
factorization of each layer cannot exploit it). A conv may be the consumer of one pair and the
producer of the next (a VGG chain): it then loses input and output channels.

Used by :func:`layers.sequential.compress_sequential` (``pairs="auto"``: the MLPs named as in
:data:`KNOWN_PAIRS` and the Linear -> channel-wise ops -> Linear and conv -> channel-wise ops -> conv
chains of its :mod:`torch.fx` graph, or of its submodules that trace (:mod:`layers._chains`); or a list of ``(producer(s), consumer[, between])``). A pair is valid only if the consumer's input is a CHANNEL-WISE function of the
producers' outputs and nothing else reads them; :func:`check_pairs` verifies this on a
calibration batch (slicing a random half of the units must equal zeroing the consumer's other
columns) and raises naming the pair otherwise.

A pair has no per-layer ``decompose`` entry in the registry: it is a decomposition of two (or
three) layers together, not of one.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from decomp_toolkit.decomp.asymmetric import centered_statistics
from decomp_toolkit.decomp.interpolative import greedy_columns, group_columns, interpolative_fit, selection_error

from ._chains import channel_chains, is_depthwise, is_per_unit
from ._modules import carry_requires_grad, name_counts, set_submodule
from ._accounting import CONV_TYPES
from .batchnorm import BN_TYPES
from .calibrate import shrunk_alike
from .errors import UnsupportedLayerError
from .fit import Fit

# (producer suffixes, consumer suffix) of the MLPs of common transformer families
KNOWN_PAIRS = (
    (("intermediate.dense",), "output.dense"),                # BERT, RoBERTa, MiniLM
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),      # LLaMA, Mistral, Qwen, SmolLM
    (("mlp.up_proj",), "mlp.down_proj"),                      # the same names without a gate (Nemotron)
    (("mlp.fc1",), "mlp.fc2"),                                # ViT, CLIP, Phi
    (("fc1",), "fc2"),                                        # OPT, BART, Whisper layers
    (("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),            # GPT-NeoX, Falcon
)
CHECK_TOLERANCE = 1e-4   # relative difference allowed between slicing and zeroing (rounding of a float32 forward)
# Ridge of the refit, relative to the mean input energy (decomp.interpolative.ridge_penalty). A consumer's
# refit has (kept units x taps) free coefficients per output; a conv deep in a CNN sees fewer calibration
# rows than that (CRAFT's 512-channel 3x3 convs at 1/16 resolution: ~2,400 rows for 4,608 columns), and
# without a ridge the refit fits noise: on CRAFT, relative score-map error 0.024 on the calibration pages
# and 7.0 on a test page at 1e-6, 0.046 at 1e-4, 0.049 at 1e-3, 0.080 at 1e-2 (90% of the channels kept).
PAIR_RIDGE = 1e-4


@dataclass(frozen=True)
class Pair:
    """``producers`` (dotted names of the layers whose outputs make the hidden units), ``consumer`` (the layer
    reading them) and ``between`` (channel-wise modules with per-unit state between them, sliced with the units:
    BatchNorms, depthwise convs)."""

    producers: tuple
    consumer: str
    between: tuple = ()

    @property
    def names(self) -> tuple:
        return self.producers + (self.consumer,)


def as_pairs(pairs, model, targets, sliceable=None) -> list:
    """``[Pair]`` from ``"auto"`` (:func:`find_pairs`), or a list of :class:`Pair` or ``(producer or [producers],
    consumer[, [per-unit modules between]])``; every name must be a targeted ``nn.Linear`` or ungrouped conv, every
    ``between`` entry a BatchNorm or depthwise conv, and the widths must agree (ValueError naming the pair).
    ``sliceable``: the names of the depthwise convs ``"auto"`` may slice (default: ``targets``)."""
    if pairs is None:
        return []
    if isinstance(pairs, str):
        if pairs != "auto":
            raise ValueError(f"compress_sequential: pairs={pairs!r}: pass 'auto', None or a list of "
                             f"(producer(s), consumer) names")
        return find_pairs(model, targets, sliceable)
    found = []
    for item in pairs:
        if isinstance(item, Pair):
            found.append(item)
            continue
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"compress_sequential: pairs entry {item!r}: pass (producer or [producers], consumer) "
                             f"or (producer(s), consumer, [batchnorms / depthwise convs between])")
        producers = (item[0],) if isinstance(item[0], str) else tuple(item[0])
        found.append(Pair(producers, item[1], tuple(item[2]) if len(item) == 3 else ()))
    for pair in found:
        _check_pair_layers(model, pair, targets)
    _check_roles(found)
    return found


def _check_roles(pairs):
    """A layer is the consumer of at most one pair and a producer of at most one (a chain link may be both)."""
    for role, names in (("consumer", [p.consumer for p in pairs]), ("producer", [n for p in pairs for n in p.producers])):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"compress_sequential: pairs= makes {twice} the {role} of two pairs")


def find_pairs(model, targets, sliceable=None) -> list:
    """The pairs of ``model`` among ``targets``: the channel-wise chains of its fx graph, or of its submodules
    that trace (:func:`layers._chains.channel_chains`), then the MLPs named as in :data:`KNOWN_PAIRS` (the first
    pattern whose layers all exist decides; if one of them is not targeted or not a plain layer the MLP is left
    to the rank fits). A chain whose widths do not agree, that runs through a depthwise conv not in
    ``sliceable`` (default: ``targets``; an excluded layer is not changed) or through a BatchNorm / depthwise
    conv shared with another part of the model (slicing it would untie it), is not a pair."""
    found, module = [], model.get_submodule   # a module shared by two blocks is read under either name
    sliceable = set(targets if sliceable is None else sliceable)
    counts = name_counts(model)
    for producers, consumer, between in channel_chains(model, targets):
        if (all(_outputs(module(n)) == _inputs(module(consumer)) for n in producers)
                and all(n in sliceable for n in between if is_depthwise(module(n)))
                and all(counts[id(module(n))] == 1 for n in between)):   # slicing would untie a shared module
            found.append(Pair(producers, consumer, between))
    taken = {n for p in found for n in p.names}
    for consumer in targets:
        for producers, tail in KNOWN_PAIRS:
            if not (consumer == tail or fnmatch.fnmatchcase(consumer, f"*.{tail}")):
                continue
            prefix = consumer[: len(consumer) - len(tail)]
            names = tuple(prefix + p for p in producers)
            if not all(_exists(model, n) for n in names):
                continue
            pair = Pair(names, consumer)
            if all(n in targets and n not in taken for n in pair.names) and _pairable(model, pair, targets):
                found.append(pair)
                taken.update(pair.names)
            break
    return found


def _exists(model, name) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _pairable(model, pair, targets) -> bool:
    """Whether a pair found by name can be compressed by hidden units (its layers are plain ``nn.Linear`` /
    ungrouped convs of agreeing widths; Falcon's ``FalconLinear``, a subclass, is not): else its layers are
    left to the rank fits."""
    try:
        _check_pair_layers(model, pair, targets)
    except (ValueError, UnsupportedLayerError):
        return False
    return True


def _check_pair_layers(model, pair, targets):
    for name in pair.names:
        if name not in targets:
            raise ValueError(f"compress_sequential: pair {pair.producers} -> {pair.consumer!r}: {name!r} is not a "
                             f"targeted layer (include= it, or leave it out of pairs=)")
        layer = model.get_submodule(name)
        if not (type(layer) is nn.Linear or (type(layer) in CONV_TYPES and layer.groups == 1)):
            raise UnsupportedLayerError(name, f"pair {pair.producers} -> {pair.consumer!r}: hidden-unit "
                                              f"compression takes nn.Linear and ungrouped nn.ConvNd layers, got "
                                              f"{type(layer).__name__}" + (f" (groups={layer.groups})"
                                                                           if hasattr(layer, 'groups') else ""))
    for name in pair.between:
        module = model.get_submodule(name)
        if not is_per_unit(module):
            raise ValueError(f"compress_sequential: pair {pair.producers} -> {pair.consumer!r}: between entry "
                             f"{name!r} ({type(module).__name__}) must be a BatchNorm or a depthwise conv (groups == "
                             f"in_channels == out_channels): the channel-wise modules whose entries are sliced")
        if _units_of(module) != units(model, pair):
            raise ValueError(f"compress_sequential: pair {pair.producers} -> {pair.consumer!r}: between entry "
                             f"{name!r} has {_units_of(module)} channels but the consumer reads {units(model, pair)}")
    width = units(model, pair)
    for name in pair.producers:
        out = _outputs(model.get_submodule(name))
        if out != width:
            raise ValueError(f"compress_sequential: pair {pair.producers} -> {pair.consumer!r}: {name!r} has "
                             f"{out} outputs but the consumer reads {width}")


def _inputs(layer) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _outputs(layer) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _units_of(module) -> int:
    """The channels of a per-unit module (:func:`layers._chains.is_per_unit`)."""
    return module.num_features if isinstance(module, BN_TYPES) else module.out_channels


def _taps(layer) -> int:
    """Weights per (input, output) pair: 1 for a Linear, ``prod(kernel_size)`` for a conv."""
    return 1 if isinstance(layer, nn.Linear) else int(torch.Size(layer.kernel_size).numel())


def units(model, pair) -> int:
    """The number of hidden units of ``pair`` (the consumer's input width / channels)."""
    return _inputs(model.get_submodule(pair.consumer))


def units_for_ratio(model, pair, ratio: float) -> int:
    """Hidden units to keep so that the pair keeps ``<= ratio`` of its weights (at least 1)."""
    return max(1, int(ratio * units(model, pair)))


def paired_params(model, pairs, kept: dict) -> tuple:
    """``(before, after)``: parameters of every layer and BatchNorm of ``pairs`` before and after each pair keeps
    ``kept[consumer]`` units (absent: all); a chain link loses both its input and its output units."""
    keep_in = {p.consumer: kept.get(p.consumer, units(model, p)) / units(model, p) for p in pairs}
    keep_out = {}
    for p in pairs:
        for name in p.producers + p.between:
            keep_out[name] = keep_in[p.consumer]
    before = after = 0
    for name in dict.fromkeys(n for p in pairs for n in p.names + p.between):
        layer = model.get_submodule(name)
        fraction_in, fraction_out = keep_in.get(name, 1.0), keep_out.get(name, 1.0)
        for pname, param in layer.named_parameters(recurse=False):
            before += param.numel()
            # a bias (and a per-unit module's entries) follows the output units; a consumer-only layer keeps all
            scale = fraction_out if (pname == "bias" or is_per_unit(layer)) else fraction_out * fraction_in
            after += round(param.numel() * scale)
    return before, after


def pair_params(model, pair, kept: int) -> int:
    """Parameters of ``pair`` after keeping ``kept`` units (biases and the BatchNorms between included; each
    layer at its current width otherwise)."""
    total = 0
    for name in pair.producers:
        layer = model.get_submodule(name)
        total += kept * _inputs(layer) * _taps(layer) + (kept if layer.bias is not None else 0)
    for name in pair.between:
        module = model.get_submodule(name)
        total += kept * sum(p.numel() for p in module.parameters(recurse=False)) // _units_of(module)
    consumer = model.get_submodule(pair.consumer)
    return total + kept * _outputs(consumer) * _taps(consumer) + (_outputs(consumer) if consumer.bias is not None
                                                                   else 0)


def pair_profile(model, pair, gram, total, rows, fisher=None, min_rank=None, multiple=None):
    """The :class:`layers.budget.LossProfile` of ``pair`` over the number of hidden units kept.

    ``multiple`` (int or None): only unit counts that are multiples of it are available (the
    allocation then takes kernel-friendly widths, :func:`layers.budget.multiple_rank_costs`), unless
    the pair has fewer units than ``multiple``.

    ``gram``, ``total``: ``X^T X`` and ``X^T 1`` of the consumer's ``rows`` calibration inputs in the
    original model (centered when the consumer has a bias); ``fisher``: the consumer's diagonal output
    Fisher ``(out,)`` or None. Unit ``t`` of the greedy order (:func:`decomp.interpolative.greedy_columns`
    on ``Y = X W^T``) explains ``g_tj`` of output channel ``j``; its estimated loss is
    ``sum_j F_j g_tj / rows``, the scale of :func:`layers.sequential.component_losses`, so pairs and
    low-rank layers share one allocation. The cost of ``k`` units is :func:`pair_params`.
    """
    from .budget import LossProfile, multiple_rank_costs, rank_floor

    consumer = model.get_submodule(pair.consumer)
    W = consumer.weight.detach().double().reshape(_outputs(consumer), -1).to(gram.device)
    gram = gram.double()
    if consumer.bias is not None:
        mean = total.double() / max(rows, 1)
        gram = gram - rows * torch.outer(mean, mean)
    _, gains = greedy_columns(gram, gram @ W.T, units(model, pair), context=pair.consumer, strict=False,
                              group=_taps(consumer))
    weights = fisher.double().to(gains.device) if fisher is not None else torch.ones(W.shape[0], dtype=torch.float64)
    losses = (gains @ weights) / max(rows, 1)
    fixed = _outputs(consumer) if consumer.bias is not None else 0
    step, n = pair_params(model, pair, 1) - fixed, units(model, pair)
    rounded = multiple is not None and n >= multiple
    return LossProfile(losses=losses.cpu().numpy(), step=step, fixed_cost=fixed,
                       dense_cost=pair_params(model, pair, n), min_rank=rank_floor(pair.consumer, n, min_rank),
                       rank_costs=multiple_rank_costs(n, step, fixed, multiple) if rounded else None)


def _resized(layer, inputs: int, outputs: int, bias: bool, groups: int = 1):
    """A layer of ``layer``'s kind, configuration and train / eval mode with ``inputs`` / ``outputs`` units (and
    ``groups``, for a conv), marked ``resized``."""
    kw = dict(bias=bias, device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(inputs, outputs, **kw)
    else:
        new = type(layer)(inputs, outputs, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                          dilation=layer.dilation, groups=groups, padding_mode=layer.padding_mode, **kw)
    new.resized = True   # fewer units than the model it came from (layers._modules.carry_resized)
    return carry_requires_grad(layer, new.train(layer.training))


def slice_producer(layer, indices: torch.Tensor):
    """``layer`` (a Linear, an ungrouped conv or a depthwise conv, :func:`layers._chains.is_depthwise`) keeping only
    the output units (rows) ``indices``; a depthwise conv keeps the same input channels (its groups)."""
    k = len(indices)
    depthwise = is_depthwise(layer)
    new = _resized(layer, k if depthwise else _inputs(layer), k, layer.bias is not None, groups=k if depthwise else 1)
    rows = indices.to(layer.weight.device)
    with torch.no_grad():
        new.weight.copy_(layer.weight[rows])
        if layer.bias is not None:
            new.bias.copy_(layer.bias[rows])
    return new


def slice_per_unit(module, indices: torch.Tensor):
    """A per-unit module between a pair's layers (a BatchNorm or a depthwise conv) keeping the channels ``indices``."""
    return slice_batchnorm(module, indices) if isinstance(module, BN_TYPES) else slice_producer(module, indices)


def slice_batchnorm(bn, indices: torch.Tensor):
    """``bn`` keeping only the channels ``indices`` (parameters and running statistics)."""
    like = next((t for t in (bn.weight, bn.running_mean) if t is not None), None)
    new = type(bn)(len(indices), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                   track_running_stats=bn.track_running_stats, device=like.device if like is not None else None,
                   dtype=like.dtype if like is not None else None)
    rows = indices.to(like.device if like is not None else indices.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            source = getattr(bn, name)
            if source is not None:
                getattr(new, name).copy_(source[rows])
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return carry_requires_grad(bn, new.train(bn.training))


def consumer_on(layer, indices: torch.Tensor, weight: torch.Tensor, bias):
    """A layer of ``layer``'s kind reading the ``len(indices)`` kept units with ``weight (out, k * taps)`` (or
    already in the layer's weight shape) and ``bias (out,)`` or None."""
    new = _resized(layer, len(indices), _outputs(layer), bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight.reshape(new.weight.shape).to(new.weight.dtype))
        if bias is not None:
            new.bias.copy_(bias.to(new.bias.dtype))
    return new


@torch.no_grad()
def fit_pair(consumer: nn.Linear, stats, kept: int, context: str = "", ridge: float = PAIR_RIDGE,
             shrinkage=None) -> tuple:
    """``(indices, new consumer, Fit)``: keep ``kept`` hidden units of the consumer's input.

    ``stats``: the consumer's :class:`layers.sequential.FitStatistics` (``X`` its inputs in the
    original model, ``X'`` in the partly compressed one). Objective ``||W X^T - W' X'_S^T||_F`` over
    the calibration rows, centered when the consumer has a bias (the bias then absorbs the mean
    shift); ``Fit.error`` is that objective's exact value (:func:`decomp.interpolative.selection_error`).
    ``ridge``: relative ridge of the selection and of the least-squares refit (:data:`PAIR_RIDGE`).
    ``shrinkage``: as :func:`layers.sequential.fit_layer` (the rule of :func:`layers.calibrate.shrinkage_weight`
    on ``X'^T X'`` and the rows): the units are chosen and the consumer refitted on the three statistics
    shrunk alike towards their scaled identity, which pulls the refit towards the consumer's own weights on
    the directions the calibration rows do not excite; ``Fit.error`` stays the unshrunk objective.
    """
    gram, gram_in, cross, mean, mean_in = stats.resolved()
    centered = consumer.bias is not None
    if centered:
        gram, gram_in, cross = centered_statistics(gram, gram_in, cross, mean, mean_in, stats.count)
    W = consumer.weight.detach().double().reshape(_outputs(consumer), -1)
    taps = _taps(consumer)
    w, shrunk = shrunk_alike((gram, gram_in, cross), stats.count, shrinkage)
    fit = interpolative_fit(shrunk[1], shrunk[2] @ W.T, float((W @ shrunk[0] * W).sum()), kept, context=context,
                            group=taps, ridge=ridge)
    target_energy = float((W @ gram * W).sum())                  # ||W X^T||_F^2
    error = selection_error(gram_in, cross @ W.T, target_energy, fit.indices, fit.weight, taps) if w else fit.error
    indices = fit.indices.to(consumer.weight.device)
    bias = None
    if centered:
        columns = group_columns(indices, taps)
        bias = consumer.bias.detach().double() + W @ mean - fit.weight @ mean_in[columns]
    module = consumer_on(consumer, indices, fit.weight, bias)
    module.fit = Fit(method="interpolative-sequential", ranks=kept, error=error, error_bound=error,
                     error_kind="output", norm=max(target_energy, 0.0) ** 0.5, weight_error=None,
                     weight_norm=float(W.norm()),
                     diagnostics=dict(units_before=W.shape[1] // taps, independent=fit.independent, shrinkage=w,
                                      rows=stats.count, inputs=W.shape[1]))
    return indices, module, module.fit


@torch.no_grad()
def check_pairs(model, pairs, run, blocks=(), seed: int = 0):
    """Raise :class:`~layers.errors.UnsupportedLayerError` for the first pair whose consumer input is not a
    channel-wise function of its producers' outputs, or whose producers feed other layers.

    ``run(model)`` runs ``model`` on one calibration batch. For each pair a random half of the units
    is kept: the model with those rows / columns sliced must give the same consumer outputs, and the
    same outputs of the modules ``blocks`` (the blocks holding the pairs), as the original with the
    consumer's other columns zeroed (to :data:`CHECK_TOLERANCE`, relative).
    """
    import copy

    if not pairs:
        return
    generator = torch.Generator().manual_seed(seed)
    zeroed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    kept_outputs = {}   # a chain link's output in the sliced model holds only the next pair's kept units
    for pair in pairs:
        n = units(model, pair)
        keep = torch.randperm(n, generator=generator)[: max(1, n // 2)].sort().values
        kept_outputs.update({name: (1 if type(model.get_submodule(name)) in CONV_TYPES else -1, keep)
                             for name in pair.producers})
        drop = torch.ones(n, dtype=torch.bool)
        drop[keep] = False
        consumer = zeroed.get_submodule(pair.consumer)
        consumer.weight[:, drop.to(consumer.weight.device)] = 0
        original = sliced.get_submodule(pair.consumer)
        set_submodule(sliced, pair.consumer, consumer_on(original, keep, original.weight[:, keep.to(
            original.weight.device)], original.bias))
        for name in pair.producers:
            set_submodule(sliced, name, slice_producer(sliced.get_submodule(name), keep))
        for name in pair.between:
            set_submodule(sliced, name, slice_per_unit(sliced.get_submodule(name), keep))
    consumers = [p.consumer for p in pairs]
    gaps = _output_gaps(zeroed, sliced, consumers + [b for b in blocks if b not in consumers], run, kept_outputs)
    for pair in pairs:
        if gaps[pair.consumer] > CHECK_TOLERANCE:
            raise UnsupportedLayerError(pair.consumer, _not_channelwise(pair, gaps[pair.consumer]))
    for block in blocks:
        if gaps[block] > CHECK_TOLERANCE:
            raise UnsupportedLayerError(block or "model", f"slicing the hidden units of the pairs in "
                                                          f"{block or 'the model'!r} changes its "
                                               f"output by {gaps[block]:.2e} (relative) against zeroing them in "
                                               f"the consumers: a producer's output is read by another layer; "
                                               f"leave those pairs out of pairs=")


def _not_channelwise(pair, gap):
    return (f"pair {pair.producers} -> {pair.consumer!r}: keeping half of the hidden units changes the consumer's "
            f"output by {gap:.2e} (relative) against zeroing the others, so its input is not a channel-wise "
            f"function of the producers' outputs; leave this pair out of pairs=")


def _relative_gap(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def _first_tensor(output):
    while isinstance(output, (tuple, list)):
        output = output[0]
    return output


def _output_gaps(zeroed, sliced, names, run, kept_outputs=None) -> dict:
    """``{name: relative difference}`` of the (first) output of each named module between the two models;
    ``kept_outputs[name] = (dim, indices)``: compare only those entries of the zeroed model's output."""
    outputs = {"zeroed": {}, "sliced": {}}
    for label, model in (("zeroed", zeroed), ("sliced", sliced)):
        def record(module, args, output, name, label=label):   # returns None: the module's output is kept
            outputs[label].setdefault(name, _first_tensor(output))

        hooks = [model.get_submodule(n).register_forward_hook(
            lambda m, a, y, n=n, record=record: record(m, a, y, n)) for n in names]
        try:
            run(model)
        except RuntimeError as err:
            raise UnsupportedLayerError(names[0], f"the model fails with the hidden units of its pairs sliced "
                                                  f"({err}): a layer between or beside the pair has the hidden width "
                                                  f"built in (a norm over the units, a producer or a BatchNorm left "
                                                  f"out): pass (producers, consumer, [per-unit modules between]) in "
                                                  f"pairs=, or leave the pair out") from err
        finally:
            for h in hooks:
                h.remove()
    missing = [n for n in names if n not in outputs["zeroed"]]
    if missing:
        raise UnsupportedLayerError(missing[0], "it did not run on the calibration batch; the pair check needs it")
    gaps = {}
    for n in names:
        reference = outputs["zeroed"][n]
        if n in (kept_outputs or {}):
            dim, keep = kept_outputs[n]
            reference = reference.index_select(dim, keep.to(reference.device))
        gaps[n] = _relative_gap(outputs["sliced"][n], reference)
    return gaps
