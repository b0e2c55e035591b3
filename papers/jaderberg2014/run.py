"""Jaderberg, Vedaldi, Zisserman 2014, "Speeding up Convolutional Neural Networks with Low Rank
Expansions" (BMVC), scheme 2: a D x D conv C -> N becomes a D x 1 conv C -> K then a 1 x D
conv K -> N. Per-layer speedups of their text network's conv2 / conv3 at K = 31 / 26.

Run: ``python -m papers.jaderberg2014.run``.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from decomp_toolkit.layers import SpatialLowRankConv  # noqa: E402
from decomp_toolkit.layers._accounting import layer_macs  # noqa: E402
from papers._common import Check, run_paper, table  # noqa: E402
from papers._shapes import TEXTNET_CONV2, TEXTNET_CONV3  # noqa: E402

# (layer, K, the simplified per-layer ratio derived from the paper's cost K(N+C)D H'W')
CASES = [(TEXTNET_CONV2, 31, 10.13), (TEXTNET_CONV3, 26, 17.5)]


def speedups(spec, K) -> dict:
    """Dense / separable MACs of one layer, both from our layers.

    * ``simplified``: the paper's per-output-pixel model, where both stages are counted
      at the output resolution H'W'. Our SpatialLowRankConv does exactly that with
      ``padding="same"`` (every stage then produces H x W outputs), so we measure it there
      (on the layer's own input size).
    * ``valid``: the layer as it sits in the network (valid convolutions): the D x 1 stage
      produces H' x W outputs (full width), more than H' x W', so the speedup is lower.
    """
    out = {}
    for label, padding in (("simplified", "same"), ("valid", 0)):
        dense = layer_macs(type(spec.module())(spec.in_channels, spec.out_channels, spec.kernel, padding=padding,
                                               device="meta"), spec.input_shape)[0]
        sep = SpatialLowRankConv(spec.in_channels, spec.out_channels, spec.kernel, K, padding=padding, device="meta")
        out[label] = dense / sep.flops(spec.input_shape)
        out[label + "_macs"] = (dense, sep.flops(spec.input_shape))
    return out


def checks() -> list:
    result = []
    for spec, K, paper in CASES:
        decimals = len(str(paper).split(".")[1])
        result.append(Check(f"{spec.name} ({spec.kernel}x{spec.kernel}, {spec.in_channels}->{spec.out_channels}), "
                            f"K={K}: simplified speedup", paper, speedups(spec, K)["simplified"],
                            f"decimals={decimals}", "SpatialLowRankConv.flops, per output pixel"))
    return result


def speedup_table():
    rows = []
    for spec, K, paper in CASES:
        s = speedups(spec, K)
        dense, sep = s["valid_macs"]
        rows.append(dict(layer=spec.name, shape=f"{spec.kernel}x{spec.kernel} {spec.in_channels}->{spec.out_channels}",
                         input=f"{spec.size}x{spec.size}", K=K, paper=str(paper), simplified=f"{s['simplified']:.4f}",
                         dense_MACs_valid=dense, separable_MACs_valid=sep, valid=f"{s['valid']:.4f}"))
    return table(rows, title="Scheme 2 per-layer speedups (our SpatialLowRankConv.flops)")


def main(argv=None) -> int:
    return run_paper("jaderberg2014", checks, [speedup_table], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
