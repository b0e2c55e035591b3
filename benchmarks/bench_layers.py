"""Dense vs SVD-factorized layer speed, next to the FLOP-theoretical ratio.

Run: .venv/bin/python benchmarks/bench_layers.py [--threads 1] [--quick] [--device cuda --dtype float16]
Reports dense time / factorized time ("realized", the median of per-round ratios of
interleaved dense/factorized rounds, on wall and on measuring-thread CPU time) and dense
MACs / factorized MACs ("theoretical") for the same layers in the same run, and the time
and error of an exact vs randomized truncated SVD of a 4096 x 4096 weight. Writes
benchmarks/results/bench_layers.md (harness: benchmarks/_timing.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args, cpu_ms, ms  # noqa: E402

from decomp_toolkit.decomp import svd  # noqa: E402
from decomp_toolkit.decomp.svd import optimal_error  # noqa: E402
from decomp_toolkit.layers import decompose  # noqa: E402


def layer_cases(quick):
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4096)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1)
    cases = []
    for batch in (64, 512):
        for rank in (256, 512, 1024):
            cases.append((f"Linear(4096,4096) b{batch}", linear, dict(method="svd", rank=rank), (batch, 4096)))
    conv_input = (8, 256, 28, 28) if not quick else (2, 256, 28, 28)
    # 4x fewer MACs: channel rank r = N*C*9 / (4*(9C + N)) = 57; spatial K = N*C*9 / (4*(3C + 3N)) = 96
    cases.append(("Conv2d(256,256,3) channel", conv, dict(method="svd", rank=57), conv_input))
    cases.append(("Conv2d(256,256,3) spatial", conv, dict(method="svd", rank=96, scheme="spatial"), conv_input))
    return cases


def run_layers(bench, quick):
    rows = []
    for label, layer, spec, shape in layer_cases(quick):
        small = decompose(layer, **spec)
        dense, x = bench.prepare(layer, *shape)
        small, _ = bench.prepare(small, *shape)
        t = bench.compare({"dense": lambda: dense(x), "factorized": lambda: small(x)}, tag=label)
        theory = small.dense_flops(shape) / small.flops(shape)
        wall, cpu = bench.ratio(t["dense"], t["factorized"]), bench.ratio(t["dense"], t["factorized"], cpu=True)
        extra = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
        rows.append([label, extra, ms(t["dense"]), cpu_ms(t["dense"]), ms(t["factorized"]), cpu_ms(t["factorized"]),
                     f"{theory:.2f}x", str(wall), str(cpu), f"{cpu.median / theory:.2f}"])
    header = ["layer", "spec", "dense ms", "dense cpu ms", "factorized ms", "factorized cpu ms", "theoretical",
              "realized wall", "realized cpu", "realized cpu / theory"]
    bench.section("Dense vs SVD-factorized layers", header, rows)


def run_svd_timing(bench, quick):
    torch.manual_seed(0)
    n = 1024 if quick else 4096
    # a trained-like weight: decaying spectrum plus noise
    W = torch.randn(n, 256) @ torch.randn(256, n) / 16 + 0.05 * torch.randn(n, n)
    rows = []
    best = optimal_error(W, 256)
    for algorithm in ("exact", "randomized"):
        f, wall, cpu = bench.time_once(lambda: svd(W, rank=256, algorithm=algorithm, random_state=0))
        rows.append([algorithm, f"{n}x{n}", "256", f"{wall:.2f}", f"{cpu:.2f}", f"{f.error_bound / best:.4f}"])
    bench.section("Exact vs randomized truncated SVD", ["svd algorithm", "shape", "rank", "wall s", "cpu s",
                                                         "error / optimum"], rows)


def main():
    parser = add_bench_args(argparse.ArgumentParser())
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    bench = Bench("bench_layers" + ("_quick" if args.quick else ""), args)
    bench.note(bench.environment())
    run_layers(bench, args.quick)
    if bench.device.type == "cpu":
        run_svd_timing(bench, args.quick)
    bench.write()


if __name__ == "__main__":
    main()
