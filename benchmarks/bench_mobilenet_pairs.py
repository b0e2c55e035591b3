"""MobileNetV2 by hidden channels: ``compress_sequential(pairs="auto")`` on the 1x1 -> depthwise -> 1x1 chains.

Protocol (zoo entry ``mobilenet-v2``: torchvision's ImageNet weights, foolbox's 20 ImageNet
images): calibration on ``--crops`` random crops (scale 0.5-1, every other one mirrored) of
images 0-9, evaluation on images 10-19, which no row has seen. Per row: relative error of the
logits against the dense model, top-1 / top-5 agreement with its classes (10 images: one
image is 0.1), MACs and parameters kept (counted from the model), realized speedup on one
224x224 image (1 thread, thread CPU, median of interleaved rounds) and compress time.

Rows: ``prune r``: ``compress_sequential(ratio=r, pairs="auto")`` (each inverted-residual block keeps
the fraction ``r`` of its expanded channels: expand rows, depthwise filters and BatchNorms,
project columns refitted; the other convs low rank at ``ratio=r``); ``prune r oas``: the same with
``shrinkage="oas"`` (every fit shrunk, the pairs' included); ``low-rank r``: the same call without
pairs (the depthwise convs stay dense); ``prune r oas +distill S s``: that model distilled
(``layers.distill``, every parameter, BatchNorms frozen) for ``S`` seconds of CPU on other crops of
images 0-9 (seed 1), the best state on a third set of crops (seed 2) kept: images 10-19 stay unseen.
The classifier is excluded (1000 outputs, its own row).

Run: ``python benchmarks/bench_mobilenet_pairs.py [--ratios 0.9 0.8] [--crops 80] [--distill-seconds 300]``
(about 20 minutes).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args  # noqa: E402
from bench_quality import realized_speedup  # noqa: E402

from decomp_toolkit.analysis import zoo  # noqa: E402
from decomp_toolkit.layers.distill import distill  # noqa: E402
from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402


def random_crops(images, count, seed=0):
    """``count`` crops of ``images`` (cycled), side 0.5-1 of the image, resized back, every other one mirrored."""
    generator = torch.Generator().manual_seed(seed)
    side = images.shape[-1]
    crops = []
    for i in range(count):
        size = int(side * float(torch.empty(1).uniform_(0.5, 1.0, generator=generator)))
        top, left = (int(torch.randint(0, side - size + 1, (1,), generator=generator)) for _ in range(2))
        crop = F.interpolate(images[i % len(images)][None, :, top:top + size, left:left + size], size=side,
                             mode="bilinear", align_corners=False)[0]
        crops.append(crop.flip(-1) if i % 2 else crop)
    return torch.stack(crops)


def row(label, model, small, report, evaluation, seconds):
    images, labels = evaluation
    with torch.no_grad():
        reference, output = model(images), small(images)
    agreement = zoo.evaluate_imagenet(small, evaluation, model)
    totals = report.totals() if report is not None else None
    macs = totals["flops_after"] / totals["flops_before"] if totals else 1.0
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    speed = realized_speedup(model, small, (images[:1],))[1] if small is not model else 1.0
    return [label, f"{float((output - reference).norm() / reference.norm()):.3f}",
            f"{agreement['top1_agreement']:.1f} / {agreement['top5_agreement']:.1f}", f"{macs:.3f}", f"{params:.3f}",
            f"{speed:.2f}", f"{speed / (1 / macs):.2f}", f"{seconds:.0f}" if seconds else ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser, repeats=7)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8])
    parser.add_argument("--crops", type=int, default=80, help="calibration crops of images 0-9")
    parser.add_argument("--distill-seconds", type=float, default=300.0, help="CPU seconds of the distilled rows "
                        "(0: none)")
    args = parser.parse_args(argv)
    bench = Bench("bench_mobilenet_pairs", args)
    model = zoo.load_mobilenet_v2()
    images, labels = zoo.load_imagenet_images()
    calibration, evaluation = random_crops(images[:10], args.crops), (images[10:], labels[10:])
    rows = [row("dense", model, model, None, evaluation, None)]
    print(" | ".join(rows[-1]), flush=True)
    for ratio in args.ratios:
        for label, options in ((f"prune {ratio}", dict(pairs="auto")),
                               (f"prune {ratio} oas", dict(pairs="auto", shrinkage="oas")),
                               (f"low-rank {ratio}", {})):
            start = time.thread_time()
            with warnings.catch_warnings():   # the few-rows note is in the report; the table says the rest
                warnings.simplefilter("ignore")
                small, report = compress_sequential(model, calibration, ratio=ratio, batch_size=8, progress=False,
                                                    exclude=["classifier.1"], example_input=images[:1], **options)
            rows.append(row(label, model, small, report, evaluation, time.thread_time() - start))
            print(" | ".join(rows[-1]), flush=True)
            if label.endswith("oas") and args.distill_seconds > 0:
                log = distill(small, model, random_crops(images[:10], 2 * args.crops, seed=1),
                              random_crops(images[:10], 16, seed=2), seconds=args.distill_seconds, params="all",
                              batch_size=8)
                rows.append(row(f"{label} +distill {args.distill_seconds:.0f} s", model, small, report, evaluation,
                                time.thread_time() - start))
                print(" | ".join(rows[-1]), "|", log.summary(), flush=True)
    bench.section(f"MobileNetV2, {args.crops} calibration crops of images 0-9, evaluated on images 10-19",
                  ["row", "logit rel. error", "top-1 / top-5 agreement", "MACs kept", "params kept",
                   "realized speedup (thread CPU)", "of the MAC ratio", "compress CPU s"], rows)
    bench.write()


if __name__ == "__main__":
    main()
