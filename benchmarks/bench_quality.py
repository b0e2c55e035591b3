"""Accuracy at size on real models: CRAFT (word-box F1) and MiniLM (Lee Pearson, polarity, held-out cosine).

Every row of a model is measured in the same run, on one torch thread:
metric(s), parameters, MACs of the Linear/Conv layers, realized end-to-end speedup
(median of interleaved forwards against the dense model), compress time (wall and
``time.thread_time``, calibration included).

    python benchmarks/bench_quality.py --model craft --pages 20 --out /tmp/quality.jsonl
    python benchmarks/bench_quality.py --model minilm
    python benchmarks/bench_quality.py --model craft --rows dense,svd@0.125   # a subset of rows

Calibration data never overlaps the evaluation data: CRAFT calibrates on pages rendered from
the Wikipedia *calibration* split and is evaluated on pages of the *test* split; MiniLM
calibrates on Wikipedia calibration sentences and is evaluated on Lee / Pang & Lee texts (and
held-out Wikipedia test sentences for the cosine). Rows with recovery distil on pages of the
*train* split. tensorly-torch rows need ``pip install tensorly-torch``.

CRAFT rows: ``svd@f`` is ``compress(method="svd", budget=dict(flops=f), calibration=...)`` (BN-aware,
whitened, the energy allocator); ``svd-seq@f`` takes that row's ranks and refits every conv in execution
order on the inputs the compressed upstream produces (``compress_sequential(ranks=report)``, BN-aware);
``svd-seq@f +distill`` adds ``layers.distill`` on train pages for ``--distill-seconds`` of CPU (starting from
the ``svd-seq@f`` row's model when that row ran too); ``svd@f fisher min_rank=0.05`` allocates on the estimated
loss (the output Fisher of one pass over the calibration pages, ``budget=dict(flops=f, min_rank=0.05)``);
``svd-seq@f fisher ...`` refits on that row's ranks; ``svd@f fisher ... +distill`` distils that row's model;
``svd@latency=f fisher ...`` allocates on the estimated loss under ``budget=dict(latency=f)`` (the convs' time
measured on the example page, layers.latency);
``tltorch-tucker`` / ``tltorch-cp`` are tensorly-torch's ``FactorizedConv.from_conv`` on every conv at the
conv-parameter fraction of the ``svd-seq@ablation`` row (Tucker with ``fixed_rank_modes="spatial"``).
The markdown table goes to ``benchmarks/results/bench_quality_<model>.md`` (``--no-write``: not).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Bench, warm_up_process  # noqa: E402

from decomp_toolkit.analysis.zoo import ZOO  # noqa: E402
from decomp_toolkit.layers import calibrate, compress  # noqa: E402
from decomp_toolkit.layers.timing import compare, paired_ratio  # noqa: E402


def _timed(fn):
    wall, cpu = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - wall, time.thread_time() - cpu


def realized_speedup(dense, model, example, repeats=7):
    """``(wall, cpu)``: median over interleaved rounds of dense time / model time on ``example``, wall clock and
    the measuring thread's CPU time (:func:`layers.timing.compare`; the CPU ratio is the one a shared machine
    does not distort)."""
    warm_up_process()
    timings = compare({"dense": lambda: dense(*example), "model": lambda: model(*example)}, repeats=repeats,
                      warmup=1)
    return (paired_ratio(timings["dense"], timings["model"]).median,
            paired_ratio(timings["dense"], timings["model"], cpu=True).median)


def _row(name, metrics, model, dense, report, example, timing, seconds=None):
    params = sum(p.numel() for p in model.parameters())
    dense_params = sum(p.numel() for p in dense.parameters())
    row = dict(row=name, **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
               params=params, params_frac=round(params / dense_params, 4))
    if report is not None:
        totals = report.totals()
        if "flops_after" in totals:
            row["macs_frac"] = round(totals["flops_after"] / totals["flops_before"], 4)
            row["gmacs"] = round(totals["flops_after"] / 1e9, 3)
    wall, cpu = realized_speedup(dense, model, timing) if model is not dense else (1.0, 1.0)
    row["speedup"], row["speedup_cpu"] = round(wall, 3), round(cpu, 3)
    if "macs_frac" in row:  # realized (CPU-time) speedup over the MAC reduction
        row["speed_vs_macs"] = round(cpu * row["macs_frac"], 3)
    if seconds is not None:
        row["compress_s"], row["compress_cpu_s"] = round(seconds[0], 1), round(seconds[1], 1)
    return row


# --------------------------------------------------------------------------- CRAFT

def craft_rows(args, emit):
    from decomp_toolkit.analysis.zoo import craft

    entry, wanted = ZOO["craft"], args.rows
    dense, example = entry.load_model(), entry.example_input()
    pages = craft.load_pages(args.pages, split="test")
    timing = (craft.load_pages(1, split="calibration", size=(320, 240), seed=7)[0],)
    calibration, cal_time, loss_calibrations, fisher_time = craft_calibrations(dense, args)
    reached, allocations, fits = {}, {}, {}  # [fraction, kind]: svd@f (report, wall, cpu, model), svd-seq@f fit

    def run(name, build, extra=lambda: (0.0, 0.0), calibrated=True):  # extra(): (wall, cpu) of reused work
        if wanted and name not in wanted:
            return
        (model, report), wall, cpu = _timed(build)
        reached[name] = _conv_params(model) / _conv_params(dense)
        metrics = entry.evaluate(model, pages)
        counted = cal_time if report is not None and calibrated else (0, 0)
        seconds = [t + e + c for t, e, c in zip((wall, cpu), extra(), counted)]
        emit("craft", _row(name, metrics, model, dense, report, example if report else None, timing, seconds))

    def ours(fraction, kind="energy", **kw):  # kind "fisher...": ranks allocated on the estimated loss
        spent = (0.0, 0.0) if kind == "energy" else fisher_time  # the Fisher pass counts in the row's time

        def build():
            (model, report), wall, cpu = _timed(lambda: craft_svd(
                dense, loss_calibrations.get(kind, calibration), fraction, example, kind != "energy", **kw))
            if not kw:
                allocations[fraction, kind] = (report, wall + spent[0], cpu + spent[1], model)
            return model, report
        return build, lambda: spent

    def recovered(fraction, kind, seconds, loss=None, lr=None):  # the svd@f row's model (run first), distilled
        def build():
            report, *_, model = allocations[fraction, kind]
            return craft_distill(model, dense, args, seconds, loss, lr), report
        return build, lambda: allocations[fraction, kind][1:3]

    def sequential(fraction, seconds=None, kind="energy"):
        reused = []  # (wall, cpu) of the allocation or fit this row reuses: it counts in the row's compress time

        def build():
            key = fraction, kind
            if key in fits:  # the +distill row starts from a copy of the svd-seq row's model
                reused.append(fits[key][2:])
            else:
                known = allocations.get(key, (None, 0.0, 0.0, None))
                if known[0] is None and kind != "energy":  # its ranks come from that row's allocation
                    raise SystemExit(f"svd-seq@{fraction:g} {kind} needs the svd@{fraction:g} {kind} row in --rows")
                (model, report), wall, cpu = _timed(lambda: craft_sequential(dense, fraction, calibration, example,
                                                                             args, allocation=known[0]))
                fits[key] = (model, report, wall + known[1], cpu + known[2])
                reused.append(known[1:3])
            model, report = fits[key][:2]
            return (craft_distill(model, dense, args, seconds) if seconds else model), report
        return build, lambda: reused[0]

    run("dense", lambda: (dense, None))
    for fraction in args.fractions:
        run(f"svd@{fraction:g}", *ours(fraction))
        run(f"svd-seq@{fraction:g}", *sequential(fraction))
    run(f"svd@{args.ablation:g} bn_aware=False", *ours(args.ablation, bn_aware=False))
    run(f"svd@{args.ablation:g} fold_bn", *ours(args.ablation, fold_bn=True))
    run(f"svd@{args.ablation:g} uncalibrated", lambda: craft_svd(dense, None, args.ablation, example))
    for row in ("svd", "svd-seq"):  # ranks allocated on the estimated loss
        build = ours(args.ablation, "fisher") if row == "svd" else sequential(args.ablation, kind="fisher")
        run(f"{row}@{args.ablation:g} fisher min_rank={FISHER_MIN_RANK:g}", *build)
    for fraction in args.latency_fractions:  # ranks allocated on measured conv times and the estimated loss
        run(f"svd@latency={fraction:g} fisher min_rank={FISHER_MIN_RANK:g}",
            *ours(fraction, "fisher", budget_kind="latency"))
    tltorch_rows(args, run, reached, dense)
    prune_rows(args, run, dense, example)
    for fraction in args.recover_fractions:
        run(f"svd-seq@{fraction:g} +distill", *sequential(fraction, args.distill_seconds))
        run(f"svd@{fraction:g} fisher min_rank={FISHER_MIN_RANK:g} +distill",
            *recovered(fraction, "fisher", args.distill_seconds))
        run(f"svd@{fraction:g} fisher min_rank={FISHER_MIN_RANK:g} +distill score-map lr=3e-4",
            *recovered(fraction, "fisher", args.distill_seconds, "score-map", 3e-4))


def craft_calibrations(dense, args) -> tuple:
    """``(calibration, (wall, cpu), {kind: Fisher calibration}, (wall, cpu))``, each computed only when a
    wanted row needs it."""
    wanted = args.rows
    calibration, *cal_time = (_timed(lambda: craft_calibration(dense, args.calibration_pages))
                              if not wanted or any(not r.startswith(("dense", "tltorch", "prune")) for r in wanted)
                              else (None, 0.0, 0.0))
    loss_calibrations, *fisher_time = (_timed(lambda: craft_fisher(dense, calibration, args.calibration_pages))
                                       if not wanted or any("fisher" in r for r in wanted) else ({}, 0.0, 0.0))
    return calibration, cal_time, loss_calibrations, fisher_time


def craft_svd(dense, calibration, fraction, example, loss_aware=False, budget_kind="flops", **options):
    """``compress(method="svd", budget=dict(flops=fraction), calibration=calibration)``; ``loss_aware``: with
    ``min_rank=FISHER_MIN_RANK`` (the calibration then holds a Fisher: ranks allocated on the estimated loss).
    ``budget_kind="latency"``: the fraction is of the convs' time measured on ``example`` (layers.latency), and
    every built conv is timed again (one slower than dense is kept dense)."""
    budget = {budget_kind: fraction, **(dict(min_rank=FISHER_MIN_RANK) if loss_aware else {})}
    return compress(dense, method="svd", budget=budget, example_input=example, calibration=calibration,
                    **{"progress": False, "time_layers": budget_kind == "latency", **options})


def craft_sequential(dense, fraction, calibration, example, args, allocation=None):
    """Calibrated MAC allocation (``compress(budget=dict(flops=fraction))``, or the report ``allocation`` of that
    call), then every conv refit in execution order on the outputs of the already compressed upstream
    (``compress_sequential(ranks=report)``, BN-aware: each fit targets what the next layer sees).

    Returns ``(model, report)``: the report is the allocation's (its MACs are the sequential model's: same ranks).
    """
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.sequential import compress_sequential

    report = allocation or craft_svd(dense, calibration, fraction, example)[1]
    images, _ = craft.load_pages(args.sequential_pages, split="calibration", size=(320, 240))
    model, _ = compress_sequential(dense, images, ranks=report, batch_size=2, progress=False)
    return model, report


# the prune-seq rows: plain; every BN folded into its conv first; each chain's kept channels rounded to multiples of 8 or 16
PRUNE_VARIANTS = {"": {}, " fold_bn": dict(fold_bn=True), " pair_multiple=8": dict(pair_multiple=8),
                  " pair_multiple=16": dict(pair_multiple=16)}


def prune_rows(args, run, dense, example):
    """The dense model with its BNs folded (its speed without them), and the ``prune-seq`` rows of every
    ``--prune-ratios`` value in each of :data:`PRUNE_VARIANTS`."""
    run("dense fold_bn", lambda: (folded_copy(dense), None))
    for ratio in args.prune_ratios:
        for suffix, options in PRUNE_VARIANTS.items():
            run(f"prune-seq ratio={ratio:g} pairs=auto{suffix}",
                lambda ratio=ratio, options=options: craft_pruned(dense, ratio, example, args, **options),
                calibrated=False)


def folded_copy(model):
    """A copy of ``model`` with every conv -> BatchNorm folded into the conv (exact in eval mode)."""
    from decomp_toolkit.layers.batchnorm import fold_batchnorm

    folded = copy.deepcopy(model).eval()
    with torch.no_grad():
        fold_batchnorm(folded)
    return folded


def craft_pruned(dense, ratio, example, args, fold_bn=False, pair_multiple=None):
    """Hidden-channel selection of every conv chain (``compress_sequential(ratio=ratio, pairs="auto")``): each
    conv -> BN -> ReLU -> conv pair keeps ``ratio`` of its hidden channels, the consumer refitted in execution
    order on the pages of the sequential fit; ``(model, report)`` with the report's MACs on ``example``.
    ``fold_bn``: every BN is folded into its conv first (exact in eval mode), so the pruned model runs no BN;
    ``pair_multiple``: each chain's kept channels rounded to the nearest multiple of it."""
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.sequential import compress_sequential

    images, _ = craft.load_pages(args.sequential_pages, split="calibration", size=(320, 240))
    return compress_sequential(dense, images, ratio=ratio, pairs="auto", batch_size=2, progress=False,
                               example_input=example, fold_bn=fold_bn, pair_multiple=pair_multiple)


def craft_distill(student, teacher, args, seconds, loss=None, lr=None):
    """A copy of ``student`` distilled on rendered pages of the *train* split (320x240), the best checkpoint on
    held-out train pages (``student`` is left as it was)."""
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.distill import distill, relative_mse, score_map_mse

    images, _ = craft.load_pages(args.distill_pages + 4, split="train", size=(320, 240), seed=3)
    student = copy.deepcopy(student)
    losses = {"score-map": score_map_mse, "relative": relative_mse}
    log = distill(student, teacher, images[:-4], images[-4:], seconds=seconds, lr=lr or args.distill_lr, batch_size=2,
                  eval_every=20, params="all", loss=losses[loss or args.distill_loss])
    print(log.summary(), flush=True)
    return student


def craft_fisher(dense, calibration, pages):
    """``{"fisher": c}``, ``c`` a copy of ``calibration`` holding the
    output Fisher of every calibrated conv (:func:`layers.fisher.layer_fisher`, no labels: the sensitivity of the
    model's outputs) from one pass over ``pages`` calibration pages (320x240). The Fisher is a sum over pages and
    positions: one set of pages for every layer keeps the layers comparable."""
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.fisher import layer_fisher

    images, _ = craft.load_pages(pages, split="calibration", size=(320, 240))
    result = dataclasses.replace(calibration, fisher=layer_fisher(dense, list(calibration.grams), images, batch_size=2))
    return {"fisher": result}


FISHER_MIN_RANK = 0.05  # the loss-aware rows' min_rank: no conv below 5% of its full rank

# the high-resolution layers (slice1, slice2) see many patches per page and cost the most Gram work
SHALLOW = ("basenet.slice1.*", "basenet.slice2.*", "upconv4.*", "conv_cls.*")


def craft_calibration(dense, pages):
    """Grams from pages of the calibration split (320x240): every layer on ``pages`` pages, except the
    full-resolution ones (:data:`SHALLOW`, thousands of patches per page already) on ``max(1, pages // 4)``."""
    from decomp_toolkit.analysis.zoo import craft

    images, _ = craft.load_pages(pages, split="calibration", size=(320, 240))
    shallow = calibrate(dense, images[:max(1, pages // 4)], batch_size=2, progress=False, include=SHALLOW)
    deep = calibrate(dense, images, batch_size=2, progress=False, exclude=SHALLOW)
    for store in ("grams", "sums", "samples", "correlation", "weight_shapes", "_modules"):
        getattr(deep, store).update(getattr(shallow, store))
    return deep


def _conv_params(model) -> int:
    """Parameters outside BatchNorm layers (the convs' weights and biases, factorized or not)."""
    norms = (torch.nn.BatchNorm2d,)
    return sum(p.numel() for m in model.modules() if not isinstance(m, norms) for p in m.parameters(recurse=False))


def tltorch_rows(args, run, reached, dense):
    """The tensorly-torch rows (tucker, cp) at the conv parameter fraction of the svd-seq@ablation row."""
    for factorization in ("tucker", "cp"):
        fraction = args.tltorch_rank or reached.get(f"svd-seq@{args.ablation:g}",
                                                    reached.get(f"svd@{args.ablation:g}", args.ablation))
        sweeps = f" n_iter_max={args.tltorch_cp_iters}" if factorization == "cp" and args.tltorch_cp_iters else ""
        run(f"tltorch-{factorization} (conv params as svd-seq@{args.ablation:g}){sweeps}",
            lambda f=factorization, r=fraction: tltorch_model(dense, r, f, args.tltorch_cp_iters))


def tltorch_model(dense, rank, factorization, cp_iters=None):
    """tensorly-torch's FactorizedConv.from_conv on every conv with ``rank`` = the fraction of conv parameters
    our row kept (tensorly-torch reads a float rank as that fraction of each layer's parameters); ``cp_iters``:
    the CP sweep budget (tensorly's ``parafac(n_iter_max=)``, its default 100 when None)."""
    try:
        import tltorch
    except ImportError as err:
        raise SystemExit(f"tensorly-torch is not installed ({err}); pip install tensorly-torch") from None
    model = copy.deepcopy(dense)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels > 2]
    for name, conv in convs:
        parent, _, child = name.rpartition(".")
        # Tucker: the spatial modes keep their full size (fixed_rank_modes="spatial", the usual Tucker-2 of a
        # conv); with the default, a float rank also shrinks the 3x3 modes to 1 and every conv collapses
        fixed = "spatial" if factorization == "tucker" else None
        sweeps = dict(n_iter_max=cp_iters) if factorization == "cp" and cp_iters else {}
        setattr(model.get_submodule(parent), child,
                tltorch.FactorizedConv.from_conv(conv, rank=rank, factorization=factorization, decompose_weights=True,
                                                 fixed_rank_modes=fixed, decomposition_kwargs=sweeps))
    return model.eval(), None


# --------------------------------------------------------------------------- MiniLM

class MiniLMCalibrations:
    """MiniLM calibrations on the calibration ``batches`` ((ids, mask) tuples), each computed when a row first
    needs it: ``get(use_mask, fisher)``; ``use_mask`` passes the batches as dicts, so calibrate sees the
    attention mask and leaves the padding rows out of every Gram. ``spent``: the (wall, cpu) seconds of the
    last one asked for (counted in the row's compress time)."""

    def __init__(self, dense, batches, forward):
        self.dense, self.batches, self.forward = dense, batches, forward
        self.done, self.spent = {}, (0.0, 0.0)

    def get(self, use_mask=False, fisher=False):
        if (use_mask, fisher) not in self.done:
            data = [dict(input_ids=ids, attention_mask=mask) for ids, mask in self.batches] if use_mask \
                else self.batches
            self.done[use_mask, fisher] = _timed(lambda: calibrate(
                self.dense, data, forward=None if use_mask else self.forward, progress=False, fisher=fisher))
        calibration, *self.spent = self.done[use_mask, fisher]
        return calibration


def minilm_sequential(dense, batches, forward, fraction, min_rank=0.1, allocation=None, use_mask=False, pairs=None,
                      pair_units="fraction", pair_multiple=None, shrinkage="auto"):
    """``compress_sequential`` of MiniLM: its own loss-aware budget (``layer_params=fraction``, ``min_rank``
    floors), or the ranks of ``allocation()`` (a ``compress`` call returning ``(model, report)``). ``use_mask``:
    the ``(ids, mask)`` batches go as dicts (``model(**batch)``), so the fit sees the attention mask and leaves
    the padding rows out of its statistics. ``pairs``, ``pair_units``, ``pair_multiple``, ``shrinkage``: passed on (``"auto"``: the MLPs are
    compressed by keeping hidden units, :mod:`layers.interpolative`; ``"fraction"``: each keeps ``fraction``
    of them, ``"loss"``: their units are allocated with the other ranks)."""
    from decomp_toolkit.layers.sequential import compress_sequential

    if use_mask:
        batches, forward = [dict(input_ids=ids, attention_mask=mask) for ids, mask in batches], None
    if allocation is None:
        return compress_sequential(dense, batches, budget=dict(layer_params=fraction), min_rank={"*": min_rank},
                                   forward=forward, progress=False, pairs=pairs, pair_units=pair_units,
                                   pair_multiple=pair_multiple, shrinkage=shrinkage)
    return compress_sequential(dense, batches, ranks=allocation()[1], forward=forward, progress=False)


def minilm_probe(dense, args) -> tuple:
    """``(held_out, held_out_masked, probe_cosine)``: held_out= of the held-out shrinkage rows (as tuples and as
    dicts) and the eval_fn of the eval-driven rows, on 64 Wikipedia sentences of the calibration split that
    calibration does not use (never the evaluation texts)."""
    from decomp_toolkit.analysis.zoo import tokenize
    from decomp_toolkit.analysis.zoo.wiki import wiki_sentences

    probe = tokenize(wiki_sentences("calibration", limit=args.calibration_sentences + 64)[-64:])
    with torch.no_grad():
        probe_reference = dense(*probe)

    def probe_cosine(model):
        return float(torch.nn.functional.cosine_similarity(model(*probe), probe_reference, dim=1).mean())
    # one batch of 64 (ids, mask): model(*batch), padding rows included like the calibration
    return [probe], [dict(input_ids=probe[0], attention_mask=probe[1])], probe_cosine


def minilm_rows(args, emit):
    """MiniLM rows: ``svd@f`` / ``svd ratio=f`` as for CRAFT, on the Linear parameters; ``fisher loss-budget``:
    ``calibrate(..., fisher=True)`` + ``budget=dict(params=f, min_rank=0.1)``; ``masked``: the calibration batches
    passed as dicts, so calibrate (or compress_sequential) sees the attention mask and leaves the padding rows out
    of the Grams (the other rows keep them: tuples run as ``model(*batch)``); ``shrinkage=held_out``: each layer's
    shrinkage weight chosen by its output error on 64 calibration-split sentences the calibration does not use;
    ``svd-seq@f layer_params``: ``compress_sequential(budget=dict(layer_params=f), min_rank={"*": 0.1})``."""
    from decomp_toolkit.analysis.zoo import tokenize
    from decomp_toolkit.analysis.zoo.wiki import wiki_sentences

    entry = ZOO["minilm-text"]
    dense, data, example = entry.load_model(), entry.load_eval_data(), entry.example_input()
    sentences = wiki_sentences("calibration", limit=args.calibration_sentences)
    batches = [tokenize(sentences[i:i + 32]) for i in range(0, len(sentences), 32)]
    forward = lambda m, b: m(*b)  # noqa: E731
    calibrations = MiniLMCalibrations(dense, batches, forward)
    calibrated_with = calibrations.get
    wanted = args.rows

    def run(name, build, calibrated=True):
        if wanted and name not in wanted:
            return
        (model, report), wall, cpu = _timed(build)
        metrics = entry.evaluate(model, data, reference=dense)
        extra = calibrations.spent if calibrated and report is not None else (0, 0)
        calibrations.spent = (0.0, 0.0)
        emit("minilm", _row(name, metrics, model, dense, report, example, example, (wall + extra[0], cpu + extra[1])))

    def ours(fraction, calibrated=True, **kw):
        return lambda: compress(dense, method="svd", budget=dict(params=fraction), example_input=example,
                                calibration=calibrated_with() if calibrated else None, progress=False, **kw)

    def uniform(fraction, calibrated=True):
        return lambda: compress(dense, method="svd", ratio=fraction, example_input=example,
                                calibration=calibrated_with() if calibrated else None, progress=False)

    def loss_budget(fraction, min_rank=0.1, use_mask=False, **kw):
        return lambda: compress(dense, method="svd", budget=dict(params=fraction, min_rank=min_rank),
                                example_input=example, calibration=calibrated_with(use_mask, fisher=True),
                                progress=False, **kw)

    def sequential(fraction, allocation=None, **options):   # use_mask, pairs, pair_units, pair_multiple, shrinkage
        return lambda: minilm_sequential(dense, batches, forward, fraction, allocation=allocation, **options)

    held_out, held_out_masked, probe_cosine = minilm_probe(dense, args)

    cache = {}
    run("dense", lambda: (dense, None), calibrated=False)
    for fraction in args.linear_fractions:
        run(f"svd ratio={fraction:g} uncalibrated", uniform(fraction, calibrated=False), calibrated=False)
        run(f"svd ratio={fraction:g} calibrated", uniform(fraction))
        run(f"svd@{fraction:g} calibrated fisher loss-budget min_rank=0.1", loss_budget(fraction))
        run(f"svd@{fraction:g} calibrated fisher loss-budget min_rank=0.1 shrinkage=held_out",
            loss_budget(fraction, held_out=held_out, shrinkage="held_out"))
        run(f"svd@{fraction:g} masked fisher loss-budget min_rank=0.1", loss_budget(fraction, use_mask=True))
        run(f"svd@{fraction:g} masked fisher loss-budget min_rank=0.1 shrinkage=None",
            loss_budget(fraction, use_mask=True, shrinkage=None))
        run(f"svd@{fraction:g} masked fisher loss-budget min_rank=0.1 shrinkage=held_out",
            loss_budget(fraction, use_mask=True, held_out=held_out_masked, shrinkage="held_out"))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1", sequential(fraction))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1 masked", sequential(fraction, use_mask=True))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1 masked pairs=auto",
            sequential(fraction, use_mask=True, pairs="auto"))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1 masked pairs=auto shrinkage=oas",
            sequential(fraction, use_mask=True, pairs="auto", shrinkage="oas"))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1 masked pairs=auto pair_units=loss",
            sequential(fraction, use_mask=True, pairs="auto", pair_units="loss"))
        run(f"svd-seq@{fraction:g} layer_params min_rank=0.1 masked pairs=auto pair_units=loss pair_multiple=8",
            sequential(fraction, use_mask=True, pairs="auto", pair_units="loss", pair_multiple=8))
        run(f"svd-seq@{fraction:g} on the masked fisher loss-budget ranks",
            sequential(fraction, allocation=loss_budget(fraction, use_mask=True)))
        run(f"svd-seq@{fraction:g} masked on the masked fisher loss-budget ranks",
            sequential(fraction, allocation=loss_budget(fraction, use_mask=True), use_mask=True))
        run(f"svd@{fraction:g} uncalibrated", ours(fraction, calibrated=False), calibrated=False)
        run(f"svd@{fraction:g} calibrated", ours(fraction))
        run(f"svd@{fraction:g} calibrated shrinkage=None", ours(fraction, shrinkage=None))
        run(f"svd@{fraction:g} uncalibrated eval_fn", ours(fraction, calibrated=False, eval_fn=probe_cosine,
                                                           eval_cache=cache), calibrated=False)
        run(f"svd@{fraction:g} calibrated eval_fn", ours(fraction, eval_fn=probe_cosine, eval_cache={}))


# --------------------------------------------------------------------------- main

ROW_NOTE = ("params: all parameters; macs_frac: MACs of the Linear/Conv layers kept; speedup / speedup_cpu: "
            "dense time / model time (median of 7 interleaved rounds, wall clock / measuring-thread CPU time, "
            "1 thread); speed_vs_macs = speedup_cpu x macs_frac (1.0: the MAC reduction fully realized); "
            "compress_s / compress_cpu_s: wall / CPU seconds of the row's build, calibration included.")

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("craft", "minilm", "all"), default="all")
    parser.add_argument("--pages", type=int, default=20, help="CRAFT evaluation pages (640x480, test split)")
    parser.add_argument("--calibration-pages", type=int, default=16, help="CRAFT calibration pages (320x240)")
    parser.add_argument("--calibration-sentences", type=int, default=512, help="MiniLM calibration sentences")
    parser.add_argument("--fractions", type=float, nargs="+", default=(0.125, 0.0625, 0.25),
                        help="CRAFT MAC fractions")
    parser.add_argument("--recover-fractions", type=float, nargs="+", default=(0.0625,),
                        help="CRAFT MAC fractions of the rows with recovery (distill)")
    parser.add_argument("--sequential-pages", type=int, default=8, help="CRAFT pages (320x240) of the sequential fit")
    parser.add_argument("--distill-pages", type=int, default=32, help="CRAFT train pages (320x240) for distill")
    parser.add_argument("--distill-seconds", type=float, default=900.0, help="CRAFT distill CPU seconds")
    parser.add_argument("--distill-lr", type=float, default=1e-4, help="CRAFT distill learning rate")
    parser.add_argument("--distill-loss", choices=("score-map", "relative"), default="relative",
                        help="CRAFT distill loss of the +distill rows: layers.distill.relative_mse or score_map_mse "
                             "(the '+distill score-map' row always uses score_map_mse at lr 3e-4)")
    parser.add_argument("--prune-ratios", type=float, nargs="*", default=(0.7, 0.5),
                        help="CRAFT rows keeping this fraction of each conv chain's hidden channels")
    parser.add_argument("--ablation", type=float, default=0.125, help="CRAFT MAC fraction of the ablation rows")
    parser.add_argument("--latency-fractions", type=float, nargs="*", default=(0.5,),
                        help="CRAFT fractions of the convs' measured time (budget=dict(latency=f) rows)")
    parser.add_argument("--linear-fractions", type=float, nargs="+", default=(0.5,),
                        help="MiniLM fractions of the Linear parameters")
    parser.add_argument("--tltorch-rank", type=float, default=None,
                        help="tensorly-torch rank (fraction of conv params) when the svd@ablation row is not run")
    parser.add_argument("--tltorch-cp-iters", type=int, default=None,
                        help="tensorly-torch CP sweep budget (parafac n_iter_max; default: tensorly's 100)")
    parser.add_argument("--rows", type=lambda s: set(s.split(",")), default=None,
                        help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", default=None, help="append every row as one JSON line to this file")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write benchmarks/results/bench_quality_<model>.md")
    args = parser.parse_args(argv)
    models = ("minilm", "craft") if args.model == "all" else (args.model,)
    benches = {m: Bench(f"bench_quality_{m}", threads=1, repeats=7, write=not args.no_write) for m in models}
    rows = {}

    def emit(model, row):
        rows.setdefault(model, []).append(row)
        print(json.dumps(dict(model=model, **row)), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(model=model, **row)) + "\n")

    if args.model in ("minilm", "all"):
        minilm_rows(args, emit)
    if args.model in ("craft", "all"):
        craft_rows(args, emit)
    for model, table in rows.items():
        header = list(dict.fromkeys(k for row in table for k in row))
        benches[model].section(model, header, [[row.get(k, "") for k in header] for row in table], note=ROW_NOTE)
        benches[model].write()


if __name__ == "__main__":
    main()
