"""Realized vs theoretical speedup of factorized transposed convs (``TransposedChain``), as built and under
``optimize="speed"``.

Run: .venv/bin/python benchmarks/bench_transposed.py [--quick] [--threads 1] [--device cuda --dtype float16]

Grid: the upsampling layers of a U-Net decoder (ConvTranspose2d 2x2 stride 2: 512->256 on 30x40,
256->128 on 60x80, 128->64 on 120x160, batch 1) and of a DCGAN generator (4x4 stride 2 padding 1:
512->256 on 8x8 and 256->128 on 16x16, batch 16); methods svd (channel scheme) and tucker
(Tucker-2, equal ranks); targets 2x and 4x fewer MACs. The rank is the largest whose module's own
``flops(shape)`` is at most dense / target (meta-device modules asked); modules carry random
weights (time does not depend on the values). ``speed`` is what ``optimize_for_speed`` picks
(ranks near it, timed against dense). ``theoretical`` = dense MACs / the module's MACs; ``eff`` =
realized CPU-time ratio / theoretical. Times: median of interleaved rounds (``±`` IQR/median),
measuring-thread CPU beside.
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

from decomp_toolkit.layers import decompose  # noqa: E402
from decomp_toolkit.layers.speed import SlowerThanDenseWarning, optimize_for_speed  # noqa: E402
from decomp_toolkit.layers.transposed import TransposedChain, transposed_config  # noqa: E402

REDUCTIONS = (2, 4)


def shapes(quick):
    """(label, transposed conv, input shape) of the grid."""
    def unet(c, h, w):
        return f"U-Net up {c}->{c // 2} 2x2 s2 {h}x{w} b1", nn.ConvTranspose2d(c, c // 2, 2, stride=2), (1, c, h, w)

    def gan(c, h, batch):
        return (f"DCGAN {c}->{c // 2} 4x4 s2 p1 {h}x{h} b{batch}", nn.ConvTranspose2d(c, c // 2, 4, stride=2,
                                                                                      padding=1), (batch, c, h, h))
    if quick:
        return [unet(256, 30, 40), gan(256, 8, 4)]
    return [unet(512, 30, 40), unet(256, 60, 80), unet(128, 120, 160), gan(512, 8, 16), gan(256, 16, 16)]


def builders(conv):
    """method -> (make(rank, **kw) of a random-weight TransposedChain, largest rank)."""
    table = {}
    for method, limit in (("svd", min(conv.in_channels, conv.out_channels * 4)),
                          ("tucker", min(conv.in_channels, conv.out_channels))):
        template = decompose(conv, method, rank=1 if method == "svd" else (1, 1))
        ranks = (lambda r: r) if method == "svd" else (lambda r: (r, r))

        def make(r, template=template, ranks=ranks, **kw):
            return TransposedChain(**transposed_config(conv), adjoint_class=template.adjoint_class,
                                   adjoint_config=template.adjoint_config, rank=ranks(r), **kw)
        table[method] = (make, limit)
    return table


def measure(bench, dense, module, shape):
    """Timings of dense, the module as built and the optimize='speed' pick, in one interleaved run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowerThanDenseWarning)
        picked = optimize_for_speed(module, dense, optimize="speed", input_shape=shape,
                                    rebuild=lambda r: bench.place(TransposedChain(**{**module.config, "rank": r})))
    x = torch.randn(shape, device=bench.device, dtype=bench.dtype)
    with torch.no_grad():
        t = bench.compare({"dense": lambda: dense(x), "built": lambda: module(x), "speed": lambda: picked(x)},
                          tag=f"{shape} {module.adjoint_class} {module.rank}")
    return picked, t


def run(bench, quick):
    rows, effs = [], []
    for label, conv, shape in shapes(quick):
        dense = bench.place(conv)
        for method, (make, limit) in builders(conv).items():
            dense_macs = make(1, device="meta").dense_flops(shape)
            for f in REDUCTIONS:
                rank = largest_rank(make, limit, shape, dense_macs / f)
                module = bench.place(make(rank))
                picked, t = measure(bench, dense, module, shape)
                row = [label, method, f"{f}x", ms(t["dense"]), cpu_ms(t["dense"])]
                for name, mod in (("built", module), ("speed", picked)):
                    theory = dense_macs / mod.flops(shape)
                    cpu = bench.ratio(t["dense"], t[name], cpu=True)
                    row += [rank_label(mod.rank), ms(t[name]), f"{theory:.2f}x", str(cpu), f"{cpu.median / theory:.2f}"]
                effs.append((cpu.median / (dense_macs / picked.flops(shape)), label, method, f))
                rows.append(row)
                print("  " + " | ".join(row), file=sys.stderr, flush=True)
    header = ["layer", "method", "target", "dense ms", "dense cpu"]
    for name in ("built", "speed"):
        header += [f"{name} rank", f"{name} ms", f"{name} theoretical", f"{name} realized cpu", f"{name} eff"]
    bench.section("Factorized transposed convs: realized vs theoretical speedup", header, rows,
                  note="realized = dense / factorized measuring-thread CPU time (median of per-round ratios, "
                       "spread); eff = realized / theoretical. 'speed' = optimize='speed'.")
    worst = min(effs)
    bench.note(f"Worst eff (optimize='speed'): {worst[0]:.2f} at {worst[1]} {worst[2]} {worst[3]}x; "
               f"eff >= 0.9 in {sum(e[0] >= 0.9 for e in effs)}/{len(effs)} cells.")


def main():
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--quick", action="store_true", help="two small layers")
    args = parser.parse_args()
    bench = Bench("bench_transposed" + ("_quick" if args.quick else ""), args)
    bench.place = lambda m: m.to(bench.device, bench.dtype).eval()
    run(bench, args.quick)
    bench.write()


if __name__ == "__main__":
    main()
