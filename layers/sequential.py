"""Sequential (asymmetric) low-rank compression, streamed block by block.

``compress_sequential(model, data, ratio=... | budget=... | ranks=...)`` replaces the
targeted ``nn.Linear`` (and ungrouped ``nn.ConvNd``) layers of ``model`` by
:class:`~layers.lowrank.LowRankLinear` / :class:`~layers.lowrank.LowRankConv` modules whose
weights are fitted in execution order so that each layer reproduces the ORIGINAL model's
outputs from the inputs it REALLY receives in the partly compressed model:

    W' = argmin_{rank <= k} ||W X^T - W' X'^T||_F          (see :mod:`decomp.asymmetric`)

``X``: the layer's inputs in the original model; ``X'``: its inputs when every layer fitted
before it is already compressed. The closed form needs ``X'^T X'``, the cross-Gram
``X'^T X`` and ``X^T X``; it is the exact optimum at that rank (both factors jointly, so it
includes the truncation-aware refit of the kept factors), and the report's
``rel_error_bound`` is the certified relative error ``||W X^T - W' X'^T||_F / ||W X^T||_F``
on the calibration data (an upper bound when a jitter was needed; ``SequentialReport.fits``
also holds the error the non-sequential whitened fit of the same rank would have on the same
objective, which is never lower).

Streaming. The model is cut into ``blocks`` (default: the ``nn.ModuleList`` holding the most
targeted layers, e.g. a transformer's decoder blocks) that run as a chain: each block's first
positional input is the previous block's output, its other inputs (masks, rotary embeddings,
...) are those of the first block. Only the current block's calibration activations, one
copy of its original weights and the statistics of one group of layers (the layers reading
the same tensor, e.g. q/k/v) are alive at a time. Inside a block the layers are fitted in
stages: a pass over the microbatches accumulates the statistics of the next group of
unfitted layers and stops the block there; the group is fitted and replaced; the next pass
goes one group further. ``device="cuda"`` moves the block being compressed (and the
microbatches it runs on) to that device and back to the CPU afterwards, so the rest of the
model never leaves the CPU; ``device=None`` keeps everything where it is.

Distributed: with ``torch.distributed`` initialised, each rank passes its own shard of the
calibration data; the statistics are all-reduced (sum) before each fit, each layer is fitted
by rank ``index % world_size`` and its factors broadcast, so every rank ends with the same
model as one process on all the data (to rounding).

Ranks: ``ratio`` (each layer keeps that fraction of its parameters), ``ranks`` ({name: k}),
or ``budget=dict(params=f)`` / ``dict(layer_params=f)``: the whole model (``params``) or the
targeted layers (``layer_params``) keep at most the fraction ``f`` of their parameters, ranks
allocated on the estimated LOSS increase (:func:`layer_loss_profiles`,
:func:`layers.budget.allocate_by_loss`).

Pairs (``pairs="auto"`` or a list of ``(producer(s), consumer[, [per-unit modules between]])``): a
transformer MLP, or two chained convs, compressed by keeping ``k`` of its hidden units
(:mod:`layers.interpolative`: ``"auto"`` takes the MLPs named as in
:data:`layers.interpolative.KNOWN_PAIRS` and the conv -> BN / activation / pool / depthwise conv -> conv
chains of the model's :mod:`torch.fx` graph, e.g. MobileNet's ``1x1 -> depthwise -> 1x1``). The consumer
is refitted sequentially like the other layers (least squares on the kept units, from the inputs it
really receives) and its producers (and the BatchNorms and depthwise convs between) keep the rows of
those units; a depthwise conv sliced so is reported with the pair's units (it has no fit of its own). A pair keeps the fraction ``ratio``
of its units, or the budget's fraction (``ranks=``: its consumer's entry is the number of units
kept); a budget allocates the rest of the parameters among the other layers, or with
``pair_units="loss"`` allocates the pairs' units together with the other ranks on the
estimated loss (one profile per pair, :func:`layers.interpolative.pair_profile`).
``pair_multiple`` (an int, e.g. 8): the units a pair keeps of a fraction (``ratio=`` or a budget
with ``pair_units="fraction"``) are rounded to the nearest multiple of it within
``[pair_multiple, all units]``, and with ``pair_units="loss"`` the allocation only chooses
multiples of it (a pair with fewer units than ``pair_multiple`` is not restricted): CPU
conv/GEMM kernels run full vector widths on channel counts that are multiples of 8; with
``ranks=`` it raises ValueError (those units are given exactly). Every pair is
checked on the first batch to be a channel-wise producer -> consumer path whose producers
feed nothing else (:func:`layers.interpolative.check_pairs`).
"""
from __future__ import annotations

import copy
import fnmatch
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from decomp_toolkit.decomp.asymmetric import asymmetric_svd, centered_statistics, sequential_objective
from decomp_toolkit.decomp.whitened import whitened_svd

from ._accounting import CONV_TYPES, count_params, layer_macs
from ._modules import (FUSED_READER_REASON, carry_marks, check_patterns, eval_mode, fused_fast_path_off,
                       fused_weight_readers, is_kv_cache, kv_cache_off, note_fused_fast_path_off, owners_of_parameters,
                       tied_names, tied_reason, weight_readers)
from ._modules import set_submodule as _set_submodule
from .batchnorm import prepare_batchnorm
from .kinds import is_candidate, registered_kind, standard_layer, unfactorizable_note
from .calibrate import (attention_mask, drop_padding, gram_and_sum, gram_signature, iter_batches,
                        model_call, pad_input, shrunk_alike, unfold_patches)
from .errors import UnsupportedLayerError
from .distributed import is_distributed as _distributed
from .fisher import fisher_weighted_spectrum, output_fisher
from .fit import Fit
from .interpolative import (Pair, as_pairs, check_pairs, fit_pair, paired_params, pair_profile, slice_producer, units,
                            slice_per_unit, units_for_ratio)
from .lowrank import LowRankConv, LowRankLinear
from .report import LayerRecord, Report
from .speed import round_ranks

SEQUENTIAL_NOTE = ("sequential (asymmetric) fit: rel_error_bound is the certified relative error "
                   "||W X^T - W' X'^T||_F / ||W X^T||_F of each layer's output on the calibration data, X its "
                   "inputs in the original model, X' its inputs in the partly compressed model (centered with the "
                   "bias absorbing the mean shift for layers with a bias); rel_error is the relative weight error")


class _StopBlock(Exception):
    """Raised by a hook to end a block's forward early (the statistics needed are collected)."""


@dataclass
class SequentialReport(Report):
    """:class:`~layers.report.Report` plus each replaced layer's :class:`~layers.fit.Fit` (``fits[name]``,
    the module's ``fit``: output errors, ``diagnostics`` with ``nonsequential``, ``refit_floor``,
    ``jitter``) and wall-clock ``timings`` (s): ``allocate`` (the budget's loss profiles),
    ``compress`` (the whole sequential pass), of which ``stage passes`` (forwards collecting the
    statistics) and ``fits`` (the decompositions). ``masked[name]``: the padding rows (attention
    mask 0) left out of the layer's fit statistics, for the layers the mask applied to (as
    :attr:`layers.calibrate.Calibration.masked`). ``units[name]``: ``(kept, before)`` hidden units of
    each layer of a pair compressed by hidden-unit selection (``pairs=``) and of the BatchNorms and
    depthwise convs sliced with them (a chain link, consumer of one pair and producer of the next,
    holds the entry of the pair it consumes)."""

    fits: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    masked: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)

    def rank_table(self) -> str:
        """``name  shape  rank  kept params`` of every targeted layer, one per line."""
        lines = []
        for r in self.layers:
            rank = "dense" if not r.replaced else r.rank
            lines.append(f"{r.name:<40} {'x'.join(map(str, r.shape)):>10} {rank!s:>6} "
                         f"{r.params_after / max(r.params_before, 1):6.1%}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- statistics

def input_rows(layer, x) -> torch.Tensor:
    """``(rows, P)``: the rows ``layer``'s weight matrix ``(out, P)`` multiplies (tokens, or im2col patches)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    dims = len(layer.kernel_size)
    if x.ndim == dims + 1:
        x = x[None]
    patches = unfold_patches(layer, pad_input(layer, x))               # (B, C, *O, *K)
    perm = [0] + list(range(2, 2 + dims)) + [1] + list(range(2 + dims, 2 + 2 * dims))
    return patches.permute(perm).reshape(-1, weight_matrix(layer).shape[1])


def masked_input_rows(layer, x, mask=None) -> tuple:
    """``(rows, masked)``: :func:`input_rows` of ``x`` without the padding tokens of the attention ``mask``
    ``(B, T)`` (the rule of :func:`layers.calibrate.drop_padding`: a Linear whose input starts with the
    mask's dims), and how many rows were left out (None when the rule does not apply)."""
    x, masked = drop_padding(layer, x, mask)
    return input_rows(layer, x), masked


def weight_matrix(layer) -> torch.Tensor:
    """The ``(out, P)`` matrix of a Linear or (ungrouped) conv."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


@dataclass
class FitStatistics:
    """Sums over the calibration rows of one input: ``gram = X^T X``, ``gram_in = X'^T X'``,
    ``cross = X'^T X``, ``mean``/``mean_in`` sums and ``count`` (float64). ``same``: X' == X so far.
    ``masked``: padding rows left out before :meth:`add` (None when no attention mask applied)."""

    gram: torch.Tensor
    gram_in: torch.Tensor
    cross: torch.Tensor
    total: torch.Tensor
    total_in: torch.Tensor
    count: int = 0
    same: bool = True
    masked: int | None = None

    @classmethod
    def empty(cls, n, device=None):
        def z(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)
        return cls(z(n, n), z(n, n), z(n, n), z(n), z(n))

    def add(self, x, x_in):
        """Accumulate original rows ``x (N, n)`` and received rows ``x_in (N, n)`` (same samples).

        Products are formed in the rows' dtype (float32 rows: float32 products of one microbatch)
        and summed over microbatches in float64."""
        if x.shape != x_in.shape:
            raise ValueError(f"sequential fit: original inputs {tuple(x.shape)} and compressed-model inputs "
                             f"{tuple(x_in.shape)} differ in shape; the calibration batches must be the same")
        gram = (x.T @ x).double()
        self.gram += gram
        self.total += x.double().sum(0)
        self.count += x.shape[0]
        if self.same and torch.equal(x, x_in):
            return
        if self.same:   # the streams split here: the earlier rows had X' == X
            self.gram_in.copy_(self.gram - gram)
            self.cross.copy_(self.gram_in)
            self.total_in.copy_(self.total - x.double().sum(0))
            self.same = False
        self.gram_in += (x_in.T @ x_in).double()
        self.cross += (x_in.T @ x).double()
        self.total_in += x_in.double().sum(0)

    def resolved(self):
        """``(gram, gram_in, cross, mean, mean_in)`` with the shared entries filled in when X' == X."""
        if self.same:
            mean = self.total / max(self.count, 1)
            return self.gram, self.gram, self.gram, mean, mean
        return (self.gram, self.gram_in, self.cross, self.total / max(self.count, 1),
                self.total_in / max(self.count, 1))

    def all_reduce(self):
        """Sum the statistics over the ranks of ``torch.distributed`` (no-op without it)."""
        if not _distributed():
            return
        import torch.distributed as dist
        same = torch.tensor([1.0 if self.same else 0.0], dtype=torch.float64, device=self.gram.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if self.same and float(same) == 0.0:   # another rank's streams differ: materialize ours
            self.gram_in.copy_(self.gram)
            self.cross.copy_(self.gram)
            self.total_in.copy_(self.total)
            self.same = False
        tensors = [self.gram, self.total] + ([] if self.same else [self.gram_in, self.cross, self.total_in])
        for t in tensors:
            dist.all_reduce(t)
        counts = torch.tensor([float(self.count), float(self.masked or 0), float(self.masked is not None)],
                              dtype=torch.float64, device=self.gram.device)
        dist.all_reduce(counts)
        self.count = int(counts[0].item())
        self.masked = int(counts[1].item()) if counts[2].item() > 0 else None


def _world():
    if not _distributed():
        return 0, 1
    import torch.distributed as dist
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------- the fit of one layer

@dataclass(frozen=True)
class PairPlan:
    """The plan of a pair's consumer: keep ``kept`` of the hidden units of ``pair`` (:mod:`layers.interpolative`)."""

    pair: Pair
    kept: int


@torch.no_grad()
def fit_layer(layer, stats: FitStatistics, rank: int, context: str = "", compare: bool = True, shrinkage=None):
    """``(module, Fit)``: the low-rank replacement of ``layer`` fitted on ``stats`` at ``rank``.

    ``compare``: also evaluate the non-sequential (whitened) fit of the same rank on the same
    objective (``fit.diagnostics["nonsequential"]``; NaN when not compared). ``shrinkage``: the rule of
    :func:`layers.calibrate.shrinkage_weight` (``"auto"``: OAS when the rows are fewer than the inputs, from
    ``X'^T X'``) for a weight ``w``; the fit then runs on the three statistics shrunk alike, ``(1 - w) S + w
    tr(S)/p I`` for ``S`` in ``X^T X, X'^T X', X'^T X`` (with ``w = 1``: the plain truncated SVD of the weight,
    rescaled), so that directions the data never excited keep their weight error in the objective
    (``fit.diagnostics["shrinkage"]``). ``error`` is always the output error on the calibration data
    measured from the unshrunk statistics; ``error_bound`` is (2) of :mod:`decomp.asymmetric` without
    shrinkage and, with it, that same measured error."""
    gram, gram_in, cross, mean, mean_in = stats.resolved()
    centered = layer.bias is not None
    if centered:
        gram, gram_in, cross = centered_statistics(gram, gram_in, cross, mean, mean_in, stats.count)
    W = weight_matrix(layer).detach()
    w, shrunk = shrunk_alike((gram, gram_in, cross), stats.count, shrinkage)
    fit = asymmetric_svd(W.double(), *shrunk, rank, context=context)
    if w:   # (2) holds for the shrunk statistics only: report the error measured on the calibration data
        error = error_bound = sequential_objective(W.double(), fit.to_tensor(), gram, gram_in, cross)
    else:
        error, error_bound = fit.error, fit.error_bound
    nonsequential = math.nan
    if compare:
        plain = whitened_svd(W.double(), gram, rank=rank, context=context).to_tensor()
        nonsequential = sequential_objective(W, plain, gram, gram_in, cross)
    module = _lowrank_module(layer, fit.A, fit.B, rank)
    if centered:
        shift = W.double() @ mean - fit.to_tensor() @ mean_in
        module.expand.bias.copy_(layer.bias.detach() + shift.to(layer.bias.dtype).reshape(module.expand.bias.shape))
    weight_error = float((W.double() - fit.to_tensor()).norm())
    module.fit = Fit(method="svd-sequential", ranks=rank, error=error, error_bound=error_bound, error_kind="output",
                     norm=fit.norm, weight_error=weight_error, weight_norm=float(W.double().norm()),
                     diagnostics=dict(nonsequential=nonsequential, refit_floor=fit.refit_floor, jitter=fit.jitter,
                                      whitening=fit.whitening, shrinkage=w, rows=stats.count, inputs=W.shape[1]))
    return module, module.fit


def _lowrank_module(layer, A, B, rank):
    kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    if isinstance(layer, nn.Linear):
        module = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None, **kw)
    else:
        module = LowRankConv(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), rank,
                             stride=tuple(layer.stride), dilation=tuple(layer.dilation),
                             padding=layer.padding if isinstance(layer.padding, str) else tuple(layer.padding),
                             padding_mode=layer.padding_mode, bias=layer.bias is not None,
                             dim=len(layer.kernel_size), **kw)
    with torch.no_grad():
        module.reduce.weight.copy_(B.reshape(module.reduce.weight.shape))
        module.expand.weight.copy_(A.reshape(module.expand.weight.shape))
    return carry_marks(layer, module)


def rank_for_ratio(layer, ratio: float, name: str = "") -> int | None:
    """Largest rank whose factors hold ``<= ratio`` of the layer's weight parameters; None if even rank 1 does not."""
    m, n = weight_matrix(layer).shape
    rank = int(math.floor(ratio * m * n / (m + n)))
    return min(rank, min(m, n)) if rank >= 1 else None


def lowrank_params(layer, rank: int) -> int:
    """Parameters of the rank-``rank`` replacement of ``layer`` (bias included)."""
    m, n = weight_matrix(layer).shape
    return rank * (m + n) + (m if layer.bias is not None else 0)


# --------------------------------------------------------------------------- blocks and targets

def find_blocks(model, targets) -> list:
    """Default blocks: the children of the ``nn.ModuleList`` holding the most targets (else the whole model)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{name}." if name else ""
            count = sum(1 for t in targets if t.startswith(prefix))
            if count > best_count:
                best, best_count = [f"{prefix}{i}" for i in range(len(module))], count
    return best or [""]


def select_targets(model, include=("*",), exclude=()) -> list:
    """Names of the Linear / ConvNd layers (and registered kinds, e.g. transformers' ``Conv1D``; unsupported kinds
    such as transposed convs are returned too, and kept dense with their reason) matching ``include`` and not
    ``exclude`` (fnmatch; a pattern that matches no such layer is a ValueError naming it; ``include=None``: every
    layer)."""
    include = ("*",) if include is None else include
    if isinstance(include, str):
        include = (include,)
    if isinstance(exclude, str):
        exclude = (exclude,)
    candidates = [name for name, module in model.named_modules() if name and is_candidate(module)]
    check_patterns(candidates, "compress_sequential", include=list(include), exclude=list(exclude))
    names = [name for name in candidates if any(fnmatch.fnmatchcase(name, p) for p in include)
             and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]
    if not names:
        raise ValueError(f"compress_sequential: include={include!r} / exclude={exclude!r} select no Linear/Conv layer")
    return names


FEW_ROWS = 4   # calibration rows per input entry below which a layer's fit is flagged in the report


def _note_few_rows(report):
    """Note (and warn) the layers fitted on fewer than :data:`FEW_ROWS` calibration rows per input entry: their
    output error on the calibration data says little about new inputs."""
    counts = {name: (fit.diagnostics["rows"], fit.diagnostics["inputs"]) for name, fit in report.fits.items()
              if "rows" in fit.diagnostics}
    few = [(name, rows, rows / inputs) for name, (rows, inputs) in counts.items() if rows < FEW_ROWS * inputs]
    if not few:
        return
    listed = ", ".join(f"{name} ({rows:g} rows, {per:.1f} per input)" for name, rows, per in few[:8])
    more = f" and {len(few) - 8} more" if len(few) > 8 else ""
    text = (f"fitted on fewer than {FEW_ROWS} calibration rows per input entry: {listed}{more}; the errors on the "
            f"calibration data may not hold on new inputs: pass more data, or shrinkage='oas' (or a weight in "
            f"[0, 1]) to shrink those layers' input Grams")
    report.notes.append(text)
    warnings.warn(f"compress_sequential: {text}", stacklevel=3)


def _check_shrinkage(shrinkage):
    if shrinkage is None or shrinkage in ("auto", "oas"):
        return
    if isinstance(shrinkage, str) or isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) \
            or not 0 <= shrinkage <= 1:
        raise ValueError(f"compress_sequential: shrinkage={shrinkage!r}: pass 'auto' (OAS where a layer has fewer "
                         f"calibration rows than inputs), 'oas' (always), a weight in [0, 1] or None")


def _check_request(ratio, ranks, budget, pair_units, pair_multiple=None):
    if pair_units not in ("fraction", "loss"):
        raise ValueError(f"compress_sequential: pair_units={pair_units!r}: pass 'fraction' or 'loss'")
    if pair_multiple is not None:
        if isinstance(pair_multiple, bool) or not isinstance(pair_multiple, int) or pair_multiple < 1:
            raise ValueError(f"compress_sequential: pair_multiple={pair_multiple!r}: pass a positive int (e.g. 8) "
                             f"or None")
        if ranks is not None:
            raise ValueError("compress_sequential: pair_multiple makes the units a pair keeps multiples of it "
                             "(ratio=, or budget=); with ranks= the units are given exactly: round them yourself "
                             "or drop pair_multiple")
    given = [k for k, v in dict(ratio=ratio, ranks=ranks, budget=budget).items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"compress_sequential: pass exactly one of ratio=, ranks=, budget= (got {given or 'none'})")


def _supported_targets(model, targets) -> tuple:
    """``(supported targets, {skipped name: reason})``: unsupported kinds, grouped convs, nn.MultiheadAttention's
    out_proj and layers whose weight is tied with another module's parameter (a language model's head and its
    embeddings) are skipped."""
    skipped, owners, fused_readers = {}, owners_of_parameters(model), fused_weight_readers(model)
    for name in targets:
        layer = model.get_submodule(name)
        if id(layer) in fused_readers:
            skipped[name] = FUSED_READER_REASON
            continue
        try:
            _check_supported(name, layer)
        except UnsupportedLayerError as err:
            skipped[name] = err.reason
            continue
        tied = tied_names(layer, owners)
        if tied:
            skipped[name] = tied_reason(tied)
    return [t for t in targets if t not in skipped], skipped


def _check_supported(name, layer):
    """The layers ``compress`` refuses (:func:`layers.compress.unsupported_reason`: unsupported kinds, a subclass
    that overrides ``forward``; extra parameters or backward hooks a replacement would drop), and grouped convs."""
    from .compress import carry_over_reason, data_aware_reason

    reason = data_aware_reason(layer) or carry_over_reason(layer)
    if reason is not None:
        raise UnsupportedLayerError(name, reason)
    if isinstance(layer, CONV_TYPES) and layer.groups != 1:
        raise UnsupportedLayerError(name, f"grouped conv (groups={layer.groups}): the sequential fit handles "
                                          f"ungrouped convs only")


def _without_weight_readers(model, targets, pairs, batch, forward, skipped, report) -> list:
    """``targets`` less the layers whose ``.weight`` the model's code reads on ``batch`` (a low-rank replacement
    has none; the layers of ``pairs`` stay: they become smaller plain layers), each added to ``skipped``."""
    paired = {n for p in pairs for n in p.names}
    with torch.no_grad():
        readers = weight_readers(model, [t for t in targets if t not in paired],
                                 lambda m: _sequential_call(m, batch, forward))
    for name in readers:
        skipped[name] = "the model's code reads its .weight (a factorized layer has none)"
    if readers:
        report.notes.append(f"kept dense because the model's code reads their .weight: {', '.join(readers)}")
    return [t for t in targets if t not in readers]


def _standardize(model, targets) -> dict:
    """Replace each target of a registered kind (e.g. transformers' ``Conv1D``) by the plain Linear / ConvNd that
    computes the same (:func:`layers.kinds.standard_layer`; a module under several names is converted once and
    stays shared); returns ``{name: original module}`` so that layers kept dense get their original back."""
    converted, originals = {}, {}
    for name in targets:
        layer = model.get_submodule(name)
        if registered_kind(layer) is None:
            continue
        if id(layer) not in converted:
            converted[id(layer)] = standard_layer(layer)
        originals[name] = layer
        _set_submodule(model, name, converted[id(layer)])
    return originals


def _restore_kept(model, originals, plan) -> None:
    """Put back the original module of every standardized layer the plan kept dense (neither fitted nor a
    producer of a pair, whose rows were sliced)."""
    pruned = {n for entry in plan.values() if getattr(entry, "pair", None) is not None for n in entry.pair.names}
    for name, original in originals.items():
        if plan.get(name) is None and name not in pruned:
            _set_submodule(model, name, original)


def _assign_blocks(targets, blocks):
    owner = {}
    for t in targets:
        hits = [b for b in blocks if b == "" or t == b or t.startswith(b + ".")]
        if hits:
            owner[t] = max(hits, key=len)
    outside = [t for t in targets if t not in owner]
    if outside:
        raise ValueError(f"compress_sequential: {len(outside)} layer(s) lie in none of the blocks {blocks[:4]}"
                         f"{'...' if len(blocks) > 4 else ''}: {outside}; exclude them (exclude={tuple(outside)!r}) "
                         f"or pass blocks= covering them")
    return {b: [t for t in targets if owner[t] == b] for b in blocks}


# --------------------------------------------------------------------------- moving data

def _to(value, device):
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_block_inputs(model, first_block, batches, forward=None, check_blocks=()) -> list:
    """``[(args, kwargs)]`` the first block receives, one per microbatch (the forward stops there).

    ``check_blocks``: the following blocks, in order; their inputs are captured once to check that each is the
    previous block's output (the chain the streaming relies on).
    """
    captured = []

    def grab(module, args, kwargs):
        kept = {k: None if is_kv_cache(v) else v for k, v in kwargs.items()}   # a cache would grow at every re-run
        captured.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kept))
        raise _StopBlock

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                _run_until_stop(model, batch, forward)
    finally:
        handle.remove()
    if check_blocks and captured:
        _check_chain(model, [first_block] + list(check_blocks), batches[0], forward, captured[0])
    return captured


def _sequential_call(model, batch, forward=None):
    """``model``'s output on one calibration ``batch``: ``forward(model, batch)`` when given, else called as
    calibrate calls it (:func:`layers.calibrate.model_call`: a dict / BatchEncoding as ``model(**batch)``, float
    tensors cast to the model's dtype and moved to its device)."""
    if forward is not None:
        return forward(model, batch)
    args, kwargs = model_call(model, batch)
    return model(*args, **kwargs)


def _run_until_stop(model, batch, forward):
    try:
        _sequential_call(model, batch, forward)
    except _StopBlock:
        return
    raise RuntimeError("compress_sequential: the model's forward finished without reaching the block")


def _check_chain(model, blocks, batch, forward, first_inputs):
    """Each block's input on ``batch`` must be the previous block's output (computed from the previous block's
    own input and the first block's other arguments: the streams carry them); ValueError naming the first
    pair that is not. ``blocks``: the modules in order."""
    seen = {}

    def grab(module, args, index):
        seen.setdefault(index, args[0].detach())
        if index == len(blocks) - 1:
            raise _StopBlock

    handles = [block.register_forward_pre_hook(lambda m, a, i=i: grab(m, a, i)) for i, block in
               enumerate(blocks) if i > 0]
    try:
        with torch.no_grad():
            _run_until_stop(model, batch, forward)
            args, kwargs = first_inputs
            for i in range(1, len(blocks)):
                given = args if i == 1 else (seen.get(i - 1),) + tuple(args[1:])
                if i not in seen or given[0] is None:
                    raise ValueError(f"compress_sequential: blocks[{i}] did not run on the first batch; "
                                     f"pass blocks= naming modules the forward runs, in order")
                expected = _first(blocks[i - 1](*given, **kwargs))
                if seen[i].shape != expected.shape or not torch.allclose(seen[i], expected, rtol=1e-4, atol=1e-5):
                    raise ValueError(f"compress_sequential: the blocks do not form a chain: the input of blocks[{i}] "
                                     f"is not the output of blocks[{i - 1}] (something runs between them); pass "
                                     f"blocks= naming modules that do, or compress the two parts in two calls")
    finally:
        for h in handles:
            h.remove()


__all__ = ["compress_sequential", "SequentialReport", "FitStatistics", "fit_layer", "find_blocks",
           "select_targets", "input_rows", "rank_for_ratio", "capture_block_inputs"]


# --------------------------------------------------------------------------- block passes

def _run_stream(block, stream):
    """The block's outputs on every microbatch, as the next block's ``(args, kwargs)``."""
    out = []
    with torch.no_grad():
        for args, kwargs in stream:
            y = _first(block(*args, **kwargs))
            out.append(((y,) + tuple(args[1:]), kwargs))
    return out


def _reference_pass(original, stream, names):
    """``(inputs, next_stream)``: each named layer's input per microbatch in the original block, and its outputs.

    Layers called on the same tensor get the same recorded object (``inputs[a][j] is inputs[b][j]``),
    so their statistics can be computed once."""
    inputs = {name: [] for name in names}
    hooks, detached = [], {}
    for name in names:
        def record(module, args, name=name):
            x = args[0]
            if id(x) not in detached or detached[id(x)][0] is not x:
                detached[id(x)] = (x, x.detach())
            inputs[name].append(detached[id(x)][1])
        hooks.append(original.get_submodule(name).register_forward_pre_hook(record))
    try:
        following = _run_stream(original, stream)
    finally:
        for h in hooks:
            h.remove()
    for name, seen in inputs.items():
        if len(seen) != len(stream):
            raise UnsupportedLayerError(name, f"it ran {len(seen)} times for {len(stream)} microbatches; the "
                                              f"sequential fit needs every layer to run once per forward (a "
                                              f"layer shared by several blocks, as in ALBERT, or run in a loop: "
                                              f"exclude it, or compress the model with compress())")
    return inputs, following


def _collect_stage(block, unfitted, stream, reference, device, masks=None):
    """``(members, stats, key_of)``: the next group of unfitted layers reading the same tensor, and its statistics.

    ``masks``: the attention mask ``(B, T)`` (or None) of each microbatch; its padding rows are left
    out (:func:`masked_input_rows`)."""
    stats, key_of, members = {}, {}, None
    for j, (args, kwargs) in enumerate(stream):
        mask = masks[j] if masks else None
        state = {"input": None, "names": [], "added": set()}

        def pre(module, inputs, name):
            x = inputs[0]
            if state["input"] is None:
                state["input"] = x
            elif x is not state["input"]:
                raise _StopBlock
            state["names"].append(name)
            ref = reference[name][j]
            # layers reading the same original tensor with the same row layout share their statistics
            first = next(i for i, n in enumerate(state["names"]) if reference[n][j] is ref)
            key = (first, weight_matrix(module).shape[1], gram_signature(module))
            key_of[name] = key
            if key not in state["added"]:
                rows, masked = masked_input_rows(module, ref, mask)
                rows_in, _ = masked_input_rows(module, x.detach(), mask)
                entry = stats.setdefault(key, FitStatistics.empty(rows.shape[1], device=rows.device))
                entry.add(rows, rows_in)
                if masked is not None:
                    entry.masked = (entry.masked or 0) + masked
                state["added"].add(key)

        hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n in unfitted]
        try:
            with torch.no_grad():
                block(*args, **kwargs)
        except _StopBlock:
            pass
        finally:
            for h in hooks:
                h.remove()
        if members is None:
            members = list(state["names"])
        elif state["names"] != members:
            raise ValueError(f"compress_sequential: microbatch {j} reached the layers {state['names']} where the "
                             f"first reached {members}; the blocks must run the same layers on every batch")
    return members, stats, key_of


def _fit_owned(layer, stats, rank, index, name, compare, shrinkage=None):
    """Fit on the owning rank (``index % world``) and broadcast the factors to the others."""
    me, world = _world()
    owner = index % world
    if me == owner:
        module, record = fit_layer(layer, stats, rank, context=name, compare=compare, shrinkage=shrinkage)
    else:
        module = _lowrank_module(layer, torch.zeros(weight_matrix(layer).shape[0], rank),
                                 torch.zeros(rank, weight_matrix(layer).shape[1]), rank)
        record = None
    if world > 1:
        import torch.distributed as dist
        for p in module.parameters():
            dist.broadcast(p.data, src=owner)
        box = [record]
        dist.broadcast_object_list(box, src=owner)
        record = module.fit = box[0]
    return module, record


def _compress_block(block, block_name, ranks, stream, reference, device, report, counter, compare=False, masks=None,
                    shrinkage=None):
    """Fit every layer of ``block`` with a rank, stage by stage (see module docstring); ``masks``: the
    attention mask ``(B, T)`` (or None) of each microbatch of ``stream``."""
    local = [n for n in reference if ranks.get(_full(block_name, n)) is not None]
    unfitted = list(local)
    while unfitted:
        started = time.perf_counter()
        members, stats, key_of = _collect_stage(block, unfitted, stream, reference, device, masks)
        report.timings["stage passes"] = report.timings.get("stage passes", 0.0) + time.perf_counter() - started
        if not members:
            raise RuntimeError(f"compress_sequential: block {block_name!r} never reached {unfitted}")
        for s in stats.values():
            s.all_reduce()
        for name in members:
            full = _full(block_name, name)
            layer = block.get_submodule(name)
            started = time.perf_counter()
            if isinstance(ranks[full], PairPlan):
                module, fit = _fit_pair_in_block(block, block_name, ranks[full], stats[key_of[name]], report,
                                                 shrinkage)
            else:
                module, fit = _fit_owned(layer, stats[key_of[name]], ranks[full], counter[0], full, compare,
                                         shrinkage)
            report.timings["fits"] = report.timings.get("fits", 0.0) + time.perf_counter() - started
            counter[0] += 1
            _set_submodule(block, name, module)
            report.fits[full] = fit
            if stats[key_of[name]].masked is not None:
                report.masked[full] = stats[key_of[name]].masked
        unfitted = [n for n in unfitted if n not in members]


def _fit_pair_in_block(block, block_name, plan, stats, report, shrinkage=None):
    """Fit a pair's consumer (every rank fits it from the same all-reduced statistics) and slice its producers."""
    consumer = block.get_submodule(_local(block_name, plan.pair.consumer))
    # "auto" leaves the pairs to their ridge: OAS on CRAFT's pairs (fewer rows than inputs) cost 2 points of F1
    rule = None if shrinkage == "auto" else shrinkage
    indices, module, fit = fit_pair(consumer, stats, plan.kept, context=plan.pair.consumer, shrinkage=rule)
    for name in plan.pair.producers:
        local = _local(block_name, name)
        _set_submodule(block, local, slice_producer(block.get_submodule(local), indices))
    for name in plan.pair.between:
        local = _local(block_name, name)
        between = block.get_submodule(local)
        _set_submodule(block, local, slice_per_unit(between, indices))
        report.units[name] = (plan.kept, consumer.weight.shape[1])   # a depthwise conv gets a record too
    for name in plan.pair.names:
        report.units[name] = (plan.kept, consumer.weight.shape[1])
    return module, fit


def _local(block_name, name):
    return name[len(block_name) + 1:] if block_name else name


def _full(block_name, name):
    return f"{block_name}.{name}" if block_name else name


def stream_blocks(model, blocks, batches, per_block, forward=None, device=None):
    """Run ``model`` block by block on ``batches``; ``per_block(name, block, reference, original, compressed)``
    may change ``block`` and returns ``(next original stream, changed)``.

    ``reference`` is a copy of the block taken before ``per_block`` runs (the original weights),
    ``original`` / ``compressed`` the streams (``[(args, kwargs)]`` per microbatch) of the original
    and of the compressed model at the block's input, on ``device``. Only this block's streams,
    its copy and what ``per_block`` keeps are alive at a time.
    """
    modules = [model.get_submodule(b) if b else model for b in blocks]
    original = capture_block_inputs(model, modules[0], batches, forward, check_blocks=modules[1:])
    compressed, shared = original, True
    for name, block in zip(blocks, modules):
        home = next((p.device for p in block.parameters()), None)
        if device is not None:
            block.to(device)
        reference = copy.deepcopy(block)
        original_here = _to(original, device)
        compressed_here = original_here if shared else _to(compressed, device)
        following, changed = per_block(name, block, reference, original_here, compressed_here)
        del reference
        if shared and not changed:
            compressed_next = following
        else:
            compressed_next, shared = _run_stream(block, compressed_here), False
        original = _to(following, home) if device is not None else following
        compressed = original if shared else (_to(compressed_next, home) if device is not None else compressed_next)
        del original_here, compressed_here, following, compressed_next
        if device is not None and home is not None:
            block.to(home)
    return original, compressed


def compress_sequential(model, data, *, ratio=None, ranks=None, budget=None, include=("*",), exclude=(),
                        blocks=None, batch_size=8, forward=None, loss=None, min_rank=None, device=None,
                        compare=False, bn_aware=True, fold_bn=False, inplace=False, progress=True, pairs=None,
                        pair_units="fraction", pair_multiple=None, example_input=None, shrinkage="auto"):
    """Sequential (asymmetric) low-rank compression of ``model``; returns ``(model, SequentialReport)``.

    ``data``: calibration batches (a tensor split into ``batch_size`` rows, or an iterable
    of batches; a dict / ``BatchEncoding`` batch runs as ``model(**batch)``, as in
    :func:`layers.calibrate.calibrate`; ``forward(model, batch)`` runs one when that or
    ``model(batch)`` does not). Padding: when a dict batch holds an ``attention_mask`` (B, T),
    the rows of its padding tokens (mask 0) are left out of every statistic of a Linear whose
    input starts with those (B, T) dims (the rule of :func:`layers.calibrate.drop_padding`, as
    in ``calibrate``): the Grams ``X^T X`` / ``X'^T X'``, the cross-Gram ``X'^T X``, the means
    and row counts of its fit (so ``rel_error_bound`` is over the real tokens) and the input
    Gram of its loss profile (``budget=``; the output Fisher is not masked: padding rows of a
    model that masks them get no gradient). ``report.masked[name]`` counts the rows left out,
    as ``Calibration.masked``; the mask is read from the batch, with or without ``forward``. Exactly
    one of ``ratio`` (kept fraction of each layer's parameters), ``ranks`` ({name: k or None},
    or the report of a :func:`layers.compress.compress` call: its ranks, dense layers kept dense)
    or ``budget`` (``dict(params=f)`` for the whole model, ``dict(layer_params=f)`` for the
    targeted layers; ``loss(model, batch) -> scalar`` defaults to a causal LM's cross-entropy,
    or for other models the sensitivity of their outputs: :func:`layers.fisher.default_sensitivity_loss`,
    see :func:`layer_loss_profiles`). ``min_rank``: ``{pattern: int or
    fraction of full rank}`` floors for the allocation. ``blocks``: dotted names of the chained
    blocks (default :func:`find_blocks`). ``device``: where each block is compressed (see the
    module docstring). ``compare``: also fit each layer non-sequentially (whitened SVD of the
    same rank) and record its error on the same objective in ``report.fits`` (costs one more
    SVD per layer). ``bn_aware`` (default) fits each conv followed by a BatchNorm in that BN's
    output scale (|gamma| / sqrt(var + eps) moved into the conv, exact in eval mode, as
    ``compress``'s ``bn_aware``), so its error counts what the next layer sees; ``fold_bn``
    folds the BN into the conv instead; the report's notes list the BNs. The input model is
    unchanged unless ``inplace`` (then it also carries the BN rescaling or folding).

    ``pairs`` / ``pair_units``: MLPs and conv chains compressed by keeping hidden units instead of by
    rank (module docstring, "Pairs"; UnsupportedLayerError naming a pair that is not channel-wise).
    ``pair_multiple``: kept units rounded to a multiple of it (module docstring, "Pairs").
    ``example_input``: one input (as for
    ``compress``); the report's records then hold each layer's MACs before and after
    (``report.totals()["flops_before"/"flops_after"]``). ``shrinkage``: how each rank fit's statistics are
    shrunk towards their scaled identity (:func:`fit_layer`; ``"auto"``: OAS for a layer with fewer
    calibration rows than input entries, ``"oas"``: always, a weight in [0, 1], None: never); a pair's refit
    (:func:`layers.interpolative.fit_pair`) is shrunk by ``"oas"`` or a weight, while ``"auto"`` leaves it to
    its ridge (CRAFT at ``ratio=0.25, pairs="auto"``: word F1 0.975 so, 0.956 with OAS on its pairs; MobileNetV2,
    whose pairs overfit 20 calibration images, gains from ``"oas"``); a layer fitted on fewer than
    :data:`FEW_ROWS` rows per input entry is named in a note and a warning either way.
    """
    _check_request(ratio, ranks, budget, pair_units, pair_multiple)
    _check_shrinkage(shrinkage)
    target = model if inplace else copy.deepcopy(model)
    report = SequentialReport(model_params_before=count_params(model), notes=[SEQUENTIAL_NOTE])
    report.notes.extend(note for note in [unfactorizable_note(model)] if note)
    # fits on the running statistics (a train-mode model's BNs are not updated), blocks re-run without a cache
    with eval_mode(target), kv_cache_off(target), fused_fast_path_off():
        selected = select_targets(target, include, exclude)
        targets, skipped = _supported_targets(target, selected)
        originals = _standardize(target, targets)
        if any(isinstance(target.get_submodule(t), CONV_TYPES) for t in targets):
            report.notes.extend(prepare_batchnorm(target, targets, fold_bn=fold_bn, bn_aware=bn_aware))
        pair_list = as_pairs(pairs, target, targets, sliceable=selected)
        ranks = planned_ranks(ranks) if ranks is not None else None
        batches = _batch_list(data, batch_size)
        targets = _without_weight_readers(target, targets, pair_list, batches[0], forward, skipped, report)
        before = _dense_summaries(target, targets + sorted(skipped), example_input)
        masks = [attention_mask(b) for b in batches]
        blocks = list(blocks) if blocks is not None else find_blocks(target, targets)
        per_block = _assign_blocks(targets, blocks)
        _check_pair_blocks(target, pair_list, per_block, batches[0], forward)
        start = time.perf_counter()
        plan = _planned_with_pairs(target, targets, pair_list, ratio, ranks, budget, batches, blocks, per_block,
                                   forward, loss, min_rank, device, report, pair_units, pair_multiple)
        report.timings["allocate"] = time.perf_counter() - start
        _fit_blocks(target, blocks, batches, per_block, plan, report, forward=forward, device=device,
                    compare=compare, masks=masks, shrinkage=shrinkage, progress=progress)
        _restore_kept(target, originals, plan)
        _fill_report(report, before, target, targets, plan, skipped, example_input)
        _note_few_rows(report)
    note_fused_fast_path_off(target, report)
    return target, report


def _fit_blocks(target, blocks, batches, per_block, plan, report, *, forward, device, compare, masks, shrinkage,
                progress):
    """Stream the calibration batches through ``blocks``, fitting each block's planned layers in turn (timed as
    ``report.timings["compress"]``)."""
    start = time.perf_counter()
    counter, bar = [0], _progress(len(blocks), progress)

    def per_block_fn(name, block, reference, original, compressed):
        local = [t[len(name) + 1:] if name else t for t in per_block[name] if plan.get(t) is not None]
        inputs, following = _reference_pass(reference, original, local)
        if local:
            _compress_block(block, name, plan, compressed, inputs, device, report, counter, compare, masks,
                            shrinkage)
        del inputs
        bar.update(1)
        return following, bool(local)

    stream_blocks(target, blocks, batches, per_block_fn, forward, device)
    bar.close()
    report.timings["compress"] = time.perf_counter() - start


def _batch_list(data, batch_size) -> list:
    batches = list(iter_batches(data, batch_size))
    if not batches:
        raise ValueError("compress_sequential: data yielded no batches")
    return batches


def _input_shapes(model, example_input, names) -> dict:
    from .compress import record_input_shapes
    return {} if example_input is None else record_input_shapes(model, example_input, names)


def _fill_macs(report, model, example_input):
    """``flops_after`` of every record from one forward of the compressed ``model`` (input shapes change
    where pairs dropped units)."""
    shapes = _input_shapes(model, example_input, [r.name for r in report.layers])
    for record in report.layers:
        if record.flops_before is not None and record.name in shapes:
            record.flops_after = layer_macs(model.get_submodule(record.name), shapes[record.name])[0]


def planned_ranks(ranks) -> dict:
    """``{name: k or None}`` from a ``{name: k or None}`` mapping or a ``compress`` report
    (its replaced layers' ranks; layers it kept dense -> None)."""
    if hasattr(ranks, "layers"):
        return {r.name: (r.rank if r.replaced else None) for r in ranks.layers}
    if not isinstance(ranks, dict):
        raise TypeError(f"compress_sequential: ranks= must be a dict {{name: rank or None}} or the report of "
                        f"compress(), got {type(ranks).__name__}")
    return ranks


def _check_pair_blocks(model, pairs, per_block, batch, forward):
    """Every pair lies in one block and is a channel-wise path (:func:`layers.interpolative.check_pairs`)."""
    owner = {t: b for b, names in per_block.items() for t in names}
    for pair in pairs:
        homes = {owner[n] for n in pair.names}
        if len(homes) != 1:
            raise ValueError(f"compress_sequential: pair {pair.producers} -> {pair.consumer!r} spans the blocks "
                             f"{sorted(homes)}; a pair must lie in one block (pass blocks= accordingly)")
    check_pairs(model, pairs, lambda m: _sequential_call(m, batch, forward), blocks=sorted({owner[p.consumer] for p in pairs}))


def _planned_with_pairs(model, targets, pairs, ratio, ranks, budget, batches, blocks, per_block, forward, loss,
                        min_rank, device, report, pair_units="fraction", pair_multiple=None) -> dict:
    """The plan ``{name: rank, PairPlan (a pair's consumer) or None}``. ``ratio`` / ``ranks`` give the
    pairs' units directly (:func:`_pair_plan`); under a budget each pair keeps the budget's fraction of
    its units and the other layers share the rest (``pair_units="fraction"``), or the pairs' units are
    allocated with the other layers' ranks on the estimated loss (``"loss"``, each pair profiled as one
    layer by :func:`layers.interpolative.pair_profile`)."""
    producers = {n for p in pairs for n in p.producers}
    paired = producers | {p.consumer for p in pairs}
    if budget is not None and pair_units == "loss":
        chained = sorted(producers & {p.consumer for p in pairs})
        if chained:
            raise ValueError(f"compress_sequential: pair_units='loss' allocates each pair alone; {chained[:3]} link "
                             f"two pairs (consumer of one, producer of the next): use pair_units='fraction'")
        plan = _rank_plan(model, [t for t in targets if t not in producers], None, None, budget, batches, blocks,
                          per_block, forward, loss, min_rank, device, report, pairs, pair_multiple=pair_multiple)
        return dict(plan, **_pair_plan(model, pairs, ranks={p.consumer: plan[p.consumer] for p in pairs}))
    pair_plan = _pair_plan(model, pairs, ratio if budget is None else _budget_fraction(budget), ranks,
                           pair_multiple)
    reserved = paired_params(model, pairs, {p.consumer: pair_plan[p.consumer].kept for p in pairs
                                            if pair_plan[p.consumer] is not None})
    plan = _rank_plan(model, [t for t in targets if t not in paired], ratio,
                      None if ranks is None else {t: k for t, k in ranks.items() if t not in paired}, budget,
                      batches, blocks, per_block, forward, loss, min_rank, device, report, reserved=reserved)
    return dict(plan, **pair_plan)


def _pair_plan(model, pairs, ratio=None, ranks=None, multiple=None) -> dict:
    """``{consumer: PairPlan or None, producer: None}``: each pair keeps ``ranks[consumer]`` hidden units
    (None: dense), or the fraction ``ratio`` of them (rounded to the nearest multiple of ``multiple``
    within ``[multiple, units]`` when given and the pair has at least ``multiple`` units)."""
    plan = {}
    for pair in pairs:
        n = units(model, pair)
        if ranks is not None:
            kept = ranks.get(pair.consumer)
            if kept is not None and (isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= n):
                raise ValueError(f"compress_sequential: ranks[{pair.consumer!r}]={kept!r}: a pair's consumer "
                                 f"entry is the number of hidden units kept, an int in [1, {n}] or None")
        else:
            kept = units_for_ratio(model, pair, ratio)
            kept = round_ranks(kept, n, multiple) if multiple is not None else kept
        for name in pair.producers:
            plan.setdefault(name, None)   # a chain link: the consumer entry of the previous pair wins
        plan[pair.consumer] = PairPlan(pair, kept) if kept is not None and kept < n else None
    return plan


def _budget_fraction(budget):
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("params", "layer_params"):
        raise ValueError(f"compress_sequential: budget={budget!r}: pass dict(params=f) or dict(layer_params=f)")
    fraction = next(iter(budget.values()))
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"compress_sequential: budget={budget!r}: the fraction must be in (0, 1]")
    return fraction


def _rank_plan(model, targets, ratio, ranks, budget, batches, blocks, per_block, forward, loss, min_rank, device,
               report, pairs=(), reserved=(0, 0), pair_multiple=None):
    layers = {t: model.get_submodule(t) for t in targets}
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"compress_sequential: ratio={ratio!r} must be in (0, 1]")
        return {t: rank_for_ratio(layer, ratio, t) for t, layer in layers.items()}
    if ranks is not None:
        unknown = sorted(set(ranks) - set(targets))
        if unknown:
            raise ValueError(f"compress_sequential: ranks= names layers that are not targeted: {unknown[:5]}")
        for t, k in ranks.items():
            full = min(weight_matrix(layers[t]).shape)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= full):
                raise ValueError(f"compress_sequential: ranks[{t!r}]={k!r} must be an int in [1, {full}] or None")
        return {t: ranks.get(t) for t in targets}
    return _budget_plan(model, layers, budget, batches, blocks, forward, loss, min_rank, device, report, pairs,
                        reserved, pair_multiple)


def _budget_plan(model, layers, budget, batches, blocks, forward, loss, min_rank, device, report, pairs=(),
                 reserved=(0, 0), pair_multiple=None):
    """Ranks of ``layers`` on the estimated loss (a pair's consumer in ``layers``: its hidden units, the pair's
    parameters counted in its profile, only multiples of ``pair_multiple`` available when given);
    ``reserved = (dense, kept)``: parameters of pairs planned outside the allocation, which count in the
    budget's total and spend ``kept`` of it."""
    from .budget import allocate_by_loss

    fraction, kind = _budget_fraction(budget), next(iter(budget))
    profiles = layer_loss_profiles(model, layers, batches, blocks, forward=forward, loss=loss, min_rank=min_rank,
                                   device=device, pairs=pairs, pair_multiple=pair_multiple) if layers else {}
    dense = sum(p.dense_cost for p in profiles.values()) + reserved[0]
    total = dense if kind == "layer_params" else count_params(model)
    allocation = allocate_by_loss(profiles, fraction * total - (total - dense) - reserved[1])
    report.budget = allocation
    reached = allocation.cost + reserved[1] + total - dense
    what = "targeted layers' parameters" if kind == "layer_params" else "model parameters"
    state = "met" if reached <= fraction * total + 0.5 else "NOT met"
    report.notes.append(f"budget {state}: {what} <= {fraction:.2%} of {total:,}; reached {reached:,.0f} "
                        f"({reached / total:.2%}); ranks allocated on the estimated loss increase (Fisher-weighted "
                        f"whitened spectra" + ("; MLP pairs: hidden units on the estimated loss of the units "
                                               "dropped" if pairs else "") + ")" +
                        (f"; the MLP pairs keep {fraction:.0%} of their hidden units ({reserved[1]:,} of "
                         f"{reserved[0]:,} parameters)" if reserved[0] else ""))
    return {t: (r[0] if r is not None else None) for t, r in allocation.ranks.items()}


def _dense_summaries(model, names, example_input=None) -> dict:
    """``{name: _dense_summary}`` of the targeted layers, with their MACs on ``example_input`` when given."""
    shapes = _input_shapes(model, example_input, names)
    return {name: _dense_summary(model.get_submodule(name), shapes.get(name)) for name in names}


def _dense_summary(layer, input_shape=None) -> tuple:
    """``(type name, weight shape, parameter count, MACs or None)`` of a targeted layer before it is replaced."""
    macs = layer_macs(layer, input_shape)[0] if input_shape is not None else None
    return type(layer).__name__, tuple(layer.weight.shape), count_params(layer), macs


def _fill_report(report, before, target, targets, plan, skipped, example_input=None):
    """One LayerRecord per targeted / skipped layer; ``before``: :func:`_dense_summary` of each, taken
    before compression (with ``inplace=True`` the original layers are gone by now)."""
    for name in targets + sorted(skipped):
        kind, shape, params, macs = before[name]
        record = LayerRecord(name=name, type=kind, shape=shape, method="svd-sequential", params_before=params,
                             flops_before=macs, flops_after=macs)
        record.params_after = record.params_before
        fit = report.fits.get(name)
        if name in report.units:   # a pair's layer (a depthwise conv between is skipped by the rank fits)
            record.method, record.rank = "interpolative-sequential", report.units[name][0]
            record.params_after = count_params(target.get_submodule(name))
            if fit is not None:
                record.rel_error_bound = fit.relative_error_bound
        elif name in skipped:
            record.status = f"skipped: {skipped[name]}"
        elif fit is None:
            record.status = "skipped: kept dense (no rank below the dense cost was asked or allocated)"
        else:
            new = target.get_submodule(name)
            record.rank, record.params_after = fit.ranks, count_params(new)
            record.rel_error, record.rel_error_bound = fit.relative_weight_error, fit.relative_error_bound
        report.layers.append(record)
    report.model_params_after = count_params(target)
    if example_input is not None:
        _fill_macs(report, target, example_input)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="compress_sequential", unit="block", leave=False)


# --------------------------------------------------------------------------- loss profiles for the allocator

def component_losses(layer, gram, fisher, rows=1) -> torch.Tensor:
    """Estimated loss increase of dropping each component of the whitened SVD of ``layer`` (descending).

    With ``W L = U S V^T`` (``L L^T = X^T X`` over ``rows`` calibration rows), dropping component
    ``i`` changes the outputs by ``s_i u_i v_i^T L^{-1} x_t``, whose energy on output channel ``j``
    is ``s_i^2 u_ij^2`` in total over the rows, ``s_i^2 u_ij^2 / rows`` per row; weighting each
    channel by its diagonal Fisher ``F_j`` (:func:`output_fisher`: the squared loss gradient summed
    over the same data's rows) gives the second-order loss estimate
    ``s_i^2 sum_j F_j u_ij^2 / rows`` (up to a constant common to all layers of a model). Dividing
    by ``rows`` matters when layers see different numbers of rows (a CNN's high-resolution convs
    see many more patches per image than its deep ones): without it, both factors count the rows
    and such layers would look ``rows`` times more sensitive. Computed by
    :func:`layers.fisher.fisher_weighted_spectrum`.
    """
    from decomp_toolkit.decomp.whitened import whitening_factor

    W = weight_matrix(layer).detach().double().to(gram.device)
    L, _, _ = whitening_factor(gram.double())
    weights = fisher if fisher is not None else torch.ones(W.shape[0], dtype=torch.float64)
    return fisher_weighted_spectrum(W @ L, weights) / max(rows, 1)


def layer_loss_profiles(model, layers, batches, blocks, *, forward=None, loss=None, min_rank=None, device=None,
                        pairs=(), pair_multiple=None):
    """``{name: layers.budget.LossProfile}`` of the targeted ``layers`` ({name: module}).

    One pass of ``loss`` with gradients (:func:`output_fisher`), then one streamed block-by-block
    pass of the original model accumulating each layer's input Gram (only one block's at a
    time) for :func:`component_losses`. ``pairs``: MLP pairs whose consumer is in ``layers``; the
    consumer's profile is then the pair's, over the hidden units it keeps
    (:func:`layers.interpolative.pair_profile`; only multiples of ``pair_multiple`` when given).
    """
    from .budget import LossProfile

    names = list(layers)
    fisher = output_fisher(model, names, batches, loss)
    per_block = _assign_blocks(names, blocks)
    masks = [attention_mask(b) for b in batches]
    profiles, pair_of = {}, {p.consumer: p for p in pairs}

    def per_block_fn(name, block, reference, original, compressed):
        local = [t[len(name) + 1:] if name else t for t in per_block[name]]
        inputs, following = _reference_pass(reference, original, local)
        grams = {}   # layers reading the same tensors (q/k/v, gate/up) share one Gram
        for short in local:
            full = _full(name, short)
            module = reference.get_submodule(short)
            key = (tuple(id(x) for x in inputs[short]), gram_signature(module))
            if key not in grams:
                grams[key] = _summed_gram(module, inputs[short], masks)
            gram, rows, total = grams[key]
            if full in pair_of:
                profiles[full] = pair_profile(model, pair_of[full], gram, total, rows, fisher.get(full), min_rank,
                                              pair_multiple)
                continue
            losses = component_losses(module, gram, fisher.get(full), rows=rows)
            profiles[full] = _profile(layers[full], full, losses, min_rank, LossProfile)
        return following, False

    stream_blocks(model, blocks, batches, per_block_fn, forward, device)
    return profiles


def _summed_gram(module, inputs, masks=None):
    """``(X^T X, rows, X^T 1)``: the float64 Gram of ``module``'s rows over the microbatch ``inputs``, their
    number and their sum (all summed over the ranks); ``masks``: each microbatch's attention mask
    ``(B, T)`` or None, whose padding rows are left out (:func:`masked_input_rows`)."""
    gram, count, total = 0, torch.zeros(1, dtype=torch.float64), 0
    for j, x in enumerate(inputs):   # one microbatch's rows at a time (a conv's patches are large)
        rows, _ = masked_input_rows(module, x, masks[j] if masks else None)
        rows_gram, rows_sum = gram_and_sum(rows)
        gram, count, total = gram + rows_gram, count + rows.shape[0], total + rows_sum
    if _distributed():
        import torch.distributed as dist
        for value in (gram, count, total):
            dist.all_reduce(value)
    return gram, float(count), total


def _profile(layer, name, losses, min_rank, profile_type):
    from .budget import rank_floor

    m, n = weight_matrix(layer).shape
    bias = m if layer.bias is not None else 0
    return profile_type(losses=losses.numpy(), step=m + n, fixed_cost=bias, dense_cost=count_params(layer),
                        min_rank=rank_floor(name, min(m, n), min_rank))
