"""Dense vs SVD-factorized layer speed, next to the FLOP-theoretical ratio.

Run: .venv/bin/python benchmarks/bench_layers.py [--threads 2] [--quick]
Reports dense time / factorized time ("realized") and dense MACs / factorized MACs
("theoretical") for the same layers in the same run, and the time and error of an
exact vs randomized truncated SVD of a 4096 x 4096 weight.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import markdown_table, median_time  # noqa: E402

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


def run_layers(quick, device="cpu"):
    rows = []
    for label, layer, spec, shape in layer_cases(quick):
        layer = layer.to(device)
        small = decompose(layer, **spec).to(device)
        x = torch.randn(*shape, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def run(module):
            module(x)
            sync()

        dense_t, fact_t = median_time(run, layer), median_time(run, small)
        theory = small.dense_flops(shape) / small.flops(shape)
        realized = dense_t / fact_t
        extra = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
        rows.append([label, extra, f"{dense_t * 1e3:.2f}", f"{fact_t * 1e3:.2f}", f"{theory:.2f}x",
                     f"{realized:.2f}x", f"{realized / theory:.2f}"])
    header = ["layer", "spec", "dense ms", "factorized ms", "theoretical", "realized", "realized/theory"]
    return markdown_table(header, rows)


def run_svd_timing(quick):
    torch.manual_seed(0)
    n = 1024 if quick else 4096
    # a trained-like weight: decaying spectrum plus noise
    W = torch.randn(n, 256) @ torch.randn(256, n) / 16 + 0.05 * torch.randn(n, n)
    rows = []
    best = optimal_error(W, 256)
    for method in ("exact", "randomized"):
        start = time.perf_counter()
        f = svd(W, rank=256, method=method, random_state=0)
        seconds = time.perf_counter() - start
        rows.append([method, f"{n}x{n}", "256", f"{seconds:.2f}", f"{f.error_bound / best:.4f}"])
    return markdown_table(["svd method", "shape", "rank", "seconds", "error / optimum"], rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, device={args.device}\n")
    print(run_layers(args.quick, args.device))
    if args.device == "cpu":
        print()
        print(run_svd_timing(args.quick))


if __name__ == "__main__":
    main()
