"""Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky 2015, "Speeding-up Convolutional Neural Networks
Using Fine-tuned CP-Decomposition" (ICLR): the 4-stage CP layer's cost R(C + 2D + N) against our
CPConv for AlexNet's conv2, and accuracy vs CP rank on the ccexam MNIST CNN.

Run: ``python -m papers.lebedev2015.run``.

The CP layer (REFERENCES.md [V code]): 1x1 conv C -> R, D x 1 depthwise (groups=R), 1 x D
depthwise, 1x1 conv R -> N with the original bias; R(C + 2D + N) weights, and R(C + 2D + N)
MACs per output pixel when every stage runs at the output resolution (stride 1, 'same'
padding, as AlexNet's conv2: 5x5, pad 2, 27x27). Caffe's conv2 is grouped (2 groups of
48 -> 128); Lebedev et al. expand it block-diagonally to one 96 -> 256 kernel before the CP.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from decomp_toolkit.layers import decompose  # noqa: E402
from decomp_toolkit.layers._accounting import count_params, layer_macs  # noqa: E402
from decomp_toolkit.layers.cp import CPConv  # noqa: E402
from papers._common import Check, run_paper, table  # noqa: E402
from papers._shapes import ALEXNET_CONVS  # noqa: E402

CONV2 = ALEXNET_CONVS[1]            # 96 -> 256, 5x5, pad 2, groups 2, 27x27 input
RANKS = (25, 50, 100, 150, 200, 250)


def cp_layer(rank, groups=1) -> CPConv:
    """Our CPConv for conv2's shape on the meta device; groups=1 is Lebedev's block-diagonal expansion."""
    return CPConv(CONV2.in_channels, CONV2.out_channels, CONV2.kernel, rank, padding=CONV2.padding, groups=groups,
                  bias=False, device="meta")


def lebedev_cost(rank) -> int:
    """The paper's R(C + 2D + N) (weights; MACs per output pixel)."""
    return rank * (CONV2.in_channels + 2 * CONV2.kernel + CONV2.out_channels)


def rows() -> list:
    grouped_dense = CONV2.module(bias=False)
    dense_w, dense_macs = count_params(grouped_dense), layer_macs(grouped_dense, CONV2.input_shape)[0]
    out_pixels = CONV2.size * CONV2.size     # stride 1, pad 2: 27x27 -> 27x27
    result = []
    for rank in RANKS:
        layer = cp_layer(rank)
        per_group = cp_layer(rank // 2, groups=2)  # our default for a grouped conv: CP per group, R/2 each
        result.append(dict(R=rank, paper_cost=lebedev_cost(rank), weights=layer.num_params,
                           MACs=layer.flops(CONV2.input_shape), MACs_per_pixel=layer.flops(CONV2.input_shape)
                           / out_pixels, speedup=dense_macs / layer.flops(CONV2.input_shape),
                           compression=dense_w / layer.num_params, grouped_weights=per_group.num_params,
                           grouped_speedup=dense_macs / per_group.flops(CONV2.input_shape)))
    return result


def checks() -> list:
    result = []
    for row in rows():
        result.append(Check(f"conv2 R={row['R']}: weights", row["paper_cost"], row["weights"], "exact",
                            "CPConv.num_params, 96->256 expanded"))
        result.append(Check(f"conv2 R={row['R']}: MACs", row["paper_cost"] * CONV2.size ** 2, row["MACs"],
                            "exact", "CPConv.flops; paper: R(C+2D+N) x 27^2"))
    return result


def cost_table():
    data = [dict(R=r["R"], weights=r["weights"], MACs=r["MACs"], speedup=f"{r['speedup']:.2f}",
                 compression=f"{r['compression']:.2f}", per_group_R=f"2 x {r['R'] // 2}",
                 per_group_weights=r["grouped_weights"], per_group_speedup=f"{r['grouped_speedup']:.2f}")
            for r in rows()]
    return table(data, title="AlexNet conv2 (Caffe: 2 groups of 48->128, 5x5, 27x27) as CPConv; speedup and "
                             "compression against the grouped dense conv (224.0M MACs, 307,200 weights)")


# ----------------------------------------------------------------------------- MNIST CNN

MNIST_RANKS = (4, 8, 16, 32, 64, 128)


def mnist_cp_experiment(ranks=MNIST_RANKS, n_images=None):
    """features.3 (64x32x3x3) as CPConv at several ranks (CP-ALS, seed 0), no fine-tuning."""
    from decomp_toolkit.analysis.zoo import accuracy, load_mnist_cnn, load_mnist_images

    model = load_mnist_cnn()
    images, labels = load_mnist_images(n_images)
    conv, shape = model.features[3], (32, 14, 14)
    rows = [dict(R="dense", weights=count_params(conv), MACs=layer_macs(conv, shape)[0], speedup="1.00",
                 rel_error="0", accuracy=accuracy(model, images, labels))]
    for rank in ranks:
        layer = decompose(conv, method="cp", rank=rank, random_state=0, name="features.3")
        small = copy.deepcopy(model)
        small.features[3] = layer
        rows.append(dict(R=rank, weights=layer.num_params, MACs=layer.flops(shape),
                         speedup=f"{layer.dense_flops(shape) / layer.flops(shape):.2f}",
                         rel_error=f"{layer.fit.relative_error:.4f}",
                         accuracy=accuracy(small, images, labels)))
    return table(rows, title=f"ccexam MNIST CNN, features.3 as CPConv, no fine-tuning ({len(images):,} images; "
                             f"rel_error = measured ||K - K_cp|| / ||K||)")


def main(argv=None) -> int:
    return run_paper("lebedev2015", checks, [cost_table], [mnist_cp_experiment], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
