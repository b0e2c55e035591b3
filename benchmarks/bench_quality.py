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
order on the inputs the compressed upstream produces (``compress_sequential`` on the BN-scaled model);
``svd-seq@f +distill`` adds ``layers.distill`` on train pages for ``--distill-seconds`` of CPU;
``tltorch-tucker`` / ``tltorch-cp`` are tensorly-torch's ``FactorizedConv.from_conv`` on every conv at the
conv-parameter fraction of the ``svd-seq@ablation`` row (Tucker with ``fixed_rank_modes="spatial"``).
The markdown table goes to ``benchmarks/results/bench_quality_<model>.md`` (``--no-write``: not).
"""
from __future__ import annotations

import argparse
import copy
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

    entry = ZOO["craft"]
    dense = entry.load_model()
    pages = craft.load_pages(args.pages, split="test")
    timing = (craft.load_pages(1, split="calibration", size=(320, 240), seed=7)[0],)
    example = entry.example_input()
    wanted = args.rows
    needs_calibration = not wanted or any(not r.startswith(("dense", "tltorch")) for r in wanted)
    calibration, cal_wall, cal_cpu = (_timed(lambda: craft_calibration(dense, args.calibration_pages))
                                      if needs_calibration else (None, 0.0, 0.0))
    reached, allocations = {}, {}  # allocations[fraction]: (report, wall, cpu) of the plain calibrated row

    def run(name, build, extra=(0.0, 0.0)):
        if wanted and name not in wanted:
            return
        (model, report), wall, cpu = _timed(build)
        reached[name] = _conv_params(model) / _conv_params(dense)
        metrics = entry.evaluate(model, pages)
        wall, cpu = wall + extra[0], cpu + extra[1]
        emit("craft", _row(name, metrics, model, dense, report, example if report else None, timing,
                           (wall + cal_wall, cpu + cal_cpu) if report is not None else (wall, cpu)))

    def ours(fraction, **kw):
        def build():
            (model, report), wall, cpu = _timed(lambda: compress(
                dense, method="svd", budget=dict(flops=fraction), example_input=example, calibration=calibration,
                progress=False, time_layers=False, **kw))
            if not kw:
                allocations[fraction] = (report, wall, cpu)
            return model, report
        return build

    def sequential(fraction, seconds=None):
        known = allocations.get(fraction, (None, 0.0, 0.0))
        build = lambda: craft_sequential(dense, fraction, calibration, example, args,  # noqa: E731
                                         recover_seconds=seconds, allocation=known[0])
        return build, known[1:]  # a reused allocation's time counts in the row's compress time

    run("dense", lambda: (dense, None))
    for fraction in args.fractions:
        run(f"svd@{fraction:g}", ours(fraction))
        run(f"svd-seq@{fraction:g}", *sequential(fraction))
    run(f"svd@{args.ablation:g} bn_aware=False", ours(args.ablation, bn_aware=False))
    run(f"svd@{args.ablation:g} fold_bn", ours(args.ablation, fold_bn=True))
    run(f"svd@{args.ablation:g} uncalibrated", lambda: compress(dense, method="svd", budget=dict(
        flops=args.ablation), example_input=example, progress=False, time_layers=False))
    for factorization in ("tucker", "cp"):
        fraction = args.tltorch_rank or reached.get(f"svd-seq@{args.ablation:g}",
                                                    reached.get(f"svd@{args.ablation:g}", args.ablation))
        run(f"tltorch-{factorization} (conv params as svd-seq@{args.ablation:g})",
            lambda f=factorization, r=fraction: tltorch_model(dense, r, f))
    for fraction in args.recover_fractions:
        run(f"svd-seq@{fraction:g} +distill", *sequential(fraction, args.distill_seconds))


def craft_sequential(dense, fraction, calibration, example, args, recover_seconds=None, allocation=None):
    """Calibrated MAC allocation (``compress(budget=dict(flops=fraction))``, or the report ``allocation`` of that
    call), then every conv refit in execution order on the outputs of the already compressed upstream
    (``compress_sequential`` with those ranks, on the BN-scaled model: each fit targets what the next layer
    sees), then optionally ``distill`` on train pages.

    Returns ``(model, report)``: the report is the allocation's (its MACs are the sequential model's: same ranks).
    """
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.batchnorm import scale_for_batchnorm
    from decomp_toolkit.layers.sequential import compress_sequential

    report = allocation or compress(dense, method="svd", budget=dict(flops=fraction), example_input=example,
                                    calibration=calibration, progress=False, time_layers=False)[1]
    ranks = {r.name: (r.rank if r.replaced else None) for r in report.layers}
    base = copy.deepcopy(dense)
    scale_for_batchnorm(base)
    images, _ = craft.load_pages(args.sequential_pages, split="calibration", size=(320, 240))
    model, _ = compress_sequential(base, images, ranks=ranks, batch_size=2, progress=False)
    if recover_seconds:
        craft_distill(model, dense, args, recover_seconds)
    return model, report


def craft_distill(student, teacher, args, seconds):
    """Recovery on rendered pages of the *train* split (320x240); the best checkpoint on held-out train pages."""
    from decomp_toolkit.analysis.zoo import craft
    from decomp_toolkit.layers.distill import distill

    images, _ = craft.load_pages(args.distill_pages + 4, split="train", size=(320, 240), seed=3)
    log = distill(student, teacher, images[:-4], images[-4:], seconds=seconds, lr=args.distill_lr, batch_size=2,
                  eval_every=20, params="all")
    print(log.summary(), flush=True)
    return log


# the high-resolution layers (slice1, slice2) see many patches per page and cost the most Gram work
SHALLOW = ("basenet.slice1.*", "basenet.slice2.*", "upconv4.*", "conv_cls.*")


def craft_calibration(dense, pages):
    """Grams from pages of the calibration split (320x240): every layer on ``pages`` pages, except the
    full-resolution ones (:data:`SHALLOW`, thousands of patches per page already) on ``max(1, pages // 4)``."""
    from decomp_toolkit.analysis.zoo import craft

    images, _ = craft.load_pages(pages, split="calibration", size=(320, 240))
    shallow = calibrate(dense, images[:max(1, pages // 4)], batch_size=2, progress=False, include=SHALLOW)
    deep = calibrate(dense, images, batch_size=2, progress=False, exclude=SHALLOW)
    for store in ("grams", "sums", "samples", "weight_shapes", "_modules"):
        getattr(deep, store).update(getattr(shallow, store))
    return deep


def _conv_params(model) -> int:
    """Parameters outside BatchNorm layers (the convs' weights and biases, factorized or not)."""
    norms = (torch.nn.BatchNorm2d,)
    return sum(p.numel() for m in model.modules() if not isinstance(m, norms) for p in m.parameters(recurse=False))


def tltorch_model(dense, rank, factorization):
    """tensorly-torch's FactorizedConv.from_conv on every conv with ``rank`` = the fraction of conv parameters
    our row kept (tensorly-torch reads a float rank as that fraction of each layer's parameters)."""
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
        setattr(model.get_submodule(parent), child,
                tltorch.FactorizedConv.from_conv(conv, rank=rank, factorization=factorization, decompose_weights=True,
                                                 fixed_rank_modes=fixed))
    return model.eval(), None


# --------------------------------------------------------------------------- MiniLM

def minilm_rows(args, emit):
    from decomp_toolkit.analysis.zoo import tokenize
    from decomp_toolkit.analysis.zoo.wiki import wiki_sentences

    entry = ZOO["minilm-text"]
    dense = entry.load_model()
    data = entry.load_eval_data()
    example = entry.example_input()
    timing = example
    sentences = wiki_sentences("calibration", limit=args.calibration_sentences)
    batches = [tokenize(sentences[i:i + 32]) for i in range(0, len(sentences), 32)]
    forward = lambda m, b: m(*b)  # noqa: E731
    calibration, cal_wall, cal_cpu = _timed(lambda: calibrate(dense, batches, forward=forward, progress=False))
    with_fisher, fisher_wall, fisher_cpu = _timed(lambda: calibrate(dense, batches, forward=forward, progress=False,
                                                                    fisher=True))
    wanted = args.rows

    def run(name, build, calibrated=True):
        if wanted and name not in wanted:
            return
        (model, report), wall, cpu = _timed(build)
        metrics = entry.evaluate(model, data, reference=dense)
        extra = ((fisher_wall, fisher_cpu) if calibrated == "fisher" else (cal_wall, cal_cpu)) \
            if calibrated and report is not None else (0, 0)
        emit("minilm", _row(name, metrics, model, dense, report, example, timing, (wall + extra[0], cpu + extra[1])))

    def ours(fraction, calibrated=True, **kw):
        return lambda: compress(dense, method="svd", budget=dict(params=fraction), example_input=example,
                                calibration=calibration if calibrated else None, progress=False, **kw)

    def uniform(fraction, calibrated=True):
        return lambda: compress(dense, method="svd", ratio=fraction, example_input=example,
                                calibration=calibration if calibrated else None, progress=False)

    def loss_budget(fraction, min_rank=0.1):
        return lambda: compress(dense, method="svd", budget=dict(params=fraction, min_rank=min_rank),
                                example_input=example, calibration=with_fisher, progress=False)

    # eval_fn for the eval-driven rows: mean cosine to the dense embeddings on Wikipedia sentences of the
    # calibration split that calibration does not use (never the evaluation texts)
    probe = tokenize(wiki_sentences("calibration", limit=args.calibration_sentences + 64)[-64:])
    with torch.no_grad():
        probe_reference = dense(*probe)

    def probe_cosine(model):
        return float(torch.nn.functional.cosine_similarity(model(*probe), probe_reference, dim=1).mean())

    cache = {}
    run("dense", lambda: (dense, None), calibrated=False)
    for fraction in args.linear_fractions:
        run(f"svd ratio={fraction:g} uncalibrated", uniform(fraction, calibrated=False), calibrated=False)
        run(f"svd ratio={fraction:g} calibrated", uniform(fraction))
        run(f"svd@{fraction:g} calibrated fisher loss-budget min_rank=0.1", loss_budget(fraction), "fisher")
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
    parser.add_argument("--ablation", type=float, default=0.125, help="CRAFT MAC fraction of the ablation rows")
    parser.add_argument("--linear-fractions", type=float, nargs="+", default=(0.5,),
                        help="MiniLM fractions of the Linear parameters")
    parser.add_argument("--tltorch-rank", type=float, default=None,
                        help="tensorly-torch rank (fraction of conv params) when the svd@ablation row is not run")
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
