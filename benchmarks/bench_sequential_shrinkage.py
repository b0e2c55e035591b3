"""Sequential fits on few calibration rows: held-out error without and with ``shrinkage=``.

Run:  .venv/bin/python benchmarks/bench_sequential_shrinkage.py [--no-write]

A two-block residual MLP (``x + fc2(relu(fc1(x)))``, 32 -> 64 -> 32, seed 0) compressed by
``compress_sequential(ratio=0.9)`` on 64 / 96 / 256 / 2048 Gaussian calibration rows, for
``shrinkage=None``, ``"auto"`` (the default) and ``"oas"``; the relative output error of the
whole model on the calibration rows and on 512 held-out rows, and the layers the report flags
(fewer than 4 rows per input entry). Writes benchmarks/results/bench_sequential_shrinkage.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _timing import Bench, add_bench_args  # noqa: E402

from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402

ROWS = (64, 96, 256, 2048)
RULES = (None, "auto", "oas")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _relative(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def rows_table():
    torch.manual_seed(0)
    net = nn.Sequential(_Block(), _Block()).eval()
    gen = torch.Generator().manual_seed(1)
    held_out = torch.randn(512, 32, generator=gen)
    table = []
    for rows in ROWS:
        x = torch.randn(rows, 32, generator=gen)
        for rule in RULES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small, report = compress_sequential(net, [x], ratio=0.9, blocks=["0", "1"], progress=False,
                                                    shrinkage=rule)
            flagged = sum("calibration rows per input" in note for note in report.notes) > 0
            with torch.no_grad():
                table.append([str(rows), str(rule), f"{_relative(small(x), net(x)):.3f}",
                              f"{_relative(small(held_out), net(held_out)):.3f}",
                              f"{max(f.diagnostics['shrinkage'] for f in report.fits.values()):.3f}",
                              "yes" if flagged else "no"])
    return table


def main(argv=None):
    args = add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n")[0])).parse_args(argv)
    bench = Bench("bench_sequential_shrinkage", args)
    header = ["calibration rows", "shrinkage", "calibration error", "held-out error", "largest weight", "flagged"]
    bench.section("Held-out error of a sequential fit on few rows (2-block MLP, fc2 has 64 inputs)", header,
                  rows_table(), note="Relative output error of the whole model; 'largest weight': the largest "
                                     "shrinkage weight over the four fits; 'flagged': the report's note / warning.")
    bench.write()


if __name__ == "__main__":
    main()
