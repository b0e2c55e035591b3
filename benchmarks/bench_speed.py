"""Realized vs theoretical speedup of every factorized conv, as built and as ``optimize="speed"`` picks it.

Run: .venv/bin/python benchmarks/bench_speed.py [--quick] [--only WORD ...] [--threads 1] [--device cuda --dtype float16]

Grid: Conv2d(256,256,3) on 8x256x28x28, and the conv shapes of CRAFT's VGG16-BN backbone on
a 640x480 image (64/128/256/512 channels at 480x640, 240x320, 120x160, 60x80, 30x40),
batch 1 and 8 (batch 8 on the smaller maps), stride 1 and 2, 3x3 and 1x1; methods svd
(channel scheme), tucker (Tucker-2, R_out = R_in), cp and btd (4 blocks); targets 2x, 4x and
8x fewer MACs. For each, the rank is the largest whose module's own ``flops(shape)`` is at
most dense / target (modules built on the meta device and asked); time does not depend on
weight values, so modules carry random weights. ``as built``: that module; ``speed``: what
:func:`layers.speed.optimize_for_speed` picks (rank candidates near the rank x forward
implementations, timed against dense in one interleaved run). ``theoretical`` = dense MACs /
factorized MACs of that module; ``eff`` = realized / theoretical; ``vs target`` = realized /
target. Times: median wall ms of interleaved rounds (``±`` IQR/median), measuring-thread CPU
ms beside. The summary ends with the worst case of the grid.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args, cpu_ms, ms, rank_label  # noqa: E402
from bench_tensor_layers import largest_rank  # noqa: E402

from decomp_toolkit.layers import BlockTermConv, CPConv, LowRankConv, TuckerConv  # noqa: E402
from decomp_toolkit.layers.kinds import conv_config  # noqa: E402
from decomp_toolkit.layers.speed import SlowerThanDenseWarning, optimize_for_speed  # noqa: E402

REDUCTIONS = (2, 4, 8)


def builders(conv):
    cfg = conv_config(conv)
    N, C = conv.out_channels, conv.in_channels
    k = conv.kernel_size[0] * conv.kernel_size[1]
    table = {"svd": (lambda r, **kw: LowRankConv(**cfg, rank=r, **kw), min(N, C * k))}
    if k > 1:
        table["tucker"] = (lambda r, **kw: TuckerConv(**cfg, rank=(r, r), **kw), min(N, C))
        table["cp"] = (lambda r, **kw: CPConv(**cfg, rank=r, **kw), N * C)
        table["btd"] = (lambda r, **kw: BlockTermConv(**cfg, rank=(r, r), n_blocks=4, **kw), min(N, C) // 4)
    return table


def shapes(quick):
    """(label, conv, input shape) of the grid."""
    def conv(c, n, k=3, s=1):
        return nn.Conv2d(c, n, k, stride=s, padding=k // 2)
    cases = [("Conv2d(256,256,3) 28x28 b8", conv(256, 256), (8, 256, 28, 28))]
    craft = [(64, 480, 640), (128, 240, 320), (256, 120, 160), (512, 60, 80), (512, 30, 40)]
    if quick:
        cases = [("Conv2d(256,256,3) 28x28 b2", conv(256, 256), (2, 256, 28, 28))]
        craft = [(64, 120, 160), (256, 30, 40), (512, 15, 20)]
    for c, h, w in craft:
        cases.append((f"vgg {c}->{c} 3x3 {h}x{w} b1", conv(c, c), (1, c, h, w)))
    big = [(256, 120, 160), (512, 60, 80), (512, 30, 40)] if not quick else [(512, 15, 20)]
    for c, h, w in big[1:]:
        cases.append((f"vgg {c}->{c} 3x3 {h}x{w} b8", conv(c, c), (8, c, h, w)))
    c, h, w = big[0]
    cases.append((f"vgg {c // 2}->{c} 3x3 s2 {h}x{w} b1", conv(c // 2, c, s=2), (1, c // 2, h, w)))
    c, h, w = big[-1]
    cases.append((f"vgg {c}->{c} 3x3 s2 {h}x{w} b8", conv(c, c, s=2), (8, c, h, w)))
    cases.append((f"vgg {c}->{c // 2} 1x1 {h}x{w} b8", conv(c, c // 2, k=1), (8, c, h, w)))
    c, h, w = big[0]
    cases.append((f"vgg {c}->{c // 2} 1x1 {h}x{w} b1", conv(c, c // 2, k=1), (1, c, h, w)))
    return cases


def measure(bench, dense, make, rank, shape):
    """Timings of dense, the module as built, and the optimize='speed' pick, in one interleaved run.

    With ``--channels-last`` the dense and factorized modules and the input are channels-last."""
    module = bench.place(make(rank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowerThanDenseWarning)
        picked = optimize_for_speed(module, dense, optimize="speed", input_shape=shape,
                                    rebuild=lambda r: bench.place(type(module)(**{**module.config, "rank": r})))
    x = bench.place_input(torch.randn(shape, device=bench.device, dtype=bench.dtype))
    t = bench.compare({"dense": lambda: dense(x), "built": lambda: module(x), "speed": lambda: picked(x)},
                      tag=f"{shape} {type(module).__name__} {rank}")
    return module, picked, t


def run(bench, quick, only):
    rows, worst = [], []
    for label, conv, shape in shapes(quick):
        dense = bench.place(conv)
        dense_macs = None
        for method, (make, limit) in builders(conv).items():
            if only and not any(word in f"{label} {method}" for word in only):
                continue
            dense_macs = dense_macs or make(1, device="meta").dense_flops(shape)
            for f in REDUCTIONS:
                rank = largest_rank(make, limit, shape, dense_macs / f)
                if rank is None:
                    rows.append([label, method, f"{f}x", "-", "-", "-", "-", "-", "rank 1 misses the target"])
                    continue
                module, picked, t = measure(bench, dense, make, rank, shape)
                row = [label, method, f"{f}x"]
                for name, mod in (("built", module), ("speed", picked)):
                    theory = dense_macs / mod.flops(shape)
                    wall, cpu = bench.ratio(t["dense"], t[name]), bench.ratio(t["dense"], t[name], cpu=True)
                    impl = getattr(mod, "implementation", None)
                    row += [f"{rank_label(mod.rank)}{' ' + impl if impl else ''}", ms(t[name]), cpu_ms(t[name]),
                            f"{theory:.2f}x", str(wall), str(cpu), f"{cpu.median / theory:.2f}",
                            f"{cpu.median / f:.2f}"]
                    if name == "speed":
                        worst.append((cpu.median / theory, cpu.median / f, label, method, f))
                rows.insert(len(rows), row[:3] + [ms(t["dense"]), cpu_ms(t["dense"])] + row[3:])
                print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    header = ["layer", "method", "target", "dense ms", "dense cpu"]
    for name in ("built", "speed"):
        header += [f"{name} rank", f"{name} ms", f"{name} cpu", f"{name} theoretical", f"{name} realized wall",
                   f"{name} realized cpu", f"{name} eff", f"{name} vs target"]
    bench.section("Realized vs theoretical speedup per layer", header, rows,
                  note="realized = dense / factorized time, median of per-round ratios (wall, and measuring-thread "
                       "CPU time); eff = realized cpu / theoretical (the module's own MACs); vs target = realized "
                       "cpu / the MAC reduction asked. 'speed' = optimize='speed'. With 1 thread the CPU-time ratio "
                       "is the one the machine's other users cannot inflate.")
    if worst:
        eff = min(worst)
        tgt = min(worst, key=lambda w: w[1])
        bench.note(f"Worst case (optimize='speed'): eff {eff[0]:.2f} at {eff[2]} {eff[3]} {eff[4]}x; "
                   f"realized/target {tgt[1]:.2f} at {tgt[2]} {tgt[3]} {tgt[4]}x; "
                   f"eff >= 0.9 in {sum(w[0] >= 0.9 for w in worst)}/{len(worst)} cells.")


def main():
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--quick", action="store_true", help="smaller maps and batches")
    parser.add_argument("--channels-last", action="store_true", help="modules and inputs in channels-last")
    parser.add_argument("--only", nargs="*", default=(), help="rows whose 'layer method' contains a word")
    args = parser.parse_args()
    name = "bench_speed" + ("_quick" if args.quick else "") + ("_channels_last" if args.channels_last else "")
    bench = Bench(name, args)
    bench.channels_last = args.channels_last
    bench.place = lambda m: (m.to(bench.device, bench.dtype).eval().to(memory_format=torch.channels_last)
                             if bench.channels_last else m.to(bench.device, bench.dtype).eval())
    bench.place_input = lambda x: x.contiguous(memory_format=torch.channels_last) if bench.channels_last else x
    bench.note(bench.environment())
    run(bench, args.quick, args.only)
    bench.write()


if __name__ == "__main__":
    main()
