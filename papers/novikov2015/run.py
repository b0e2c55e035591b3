"""Novikov, Podoprikhin, Osokin, Vetrov 2015, "Tensorizing Neural Networks" (NeurIPS): TT-layer
parameter counts of VGG-16's FC6 and the network-level compression; a TT-layer of the ccexam
MNIST CNN's Linear(3136 -> 128) with its accuracy.

Run: ``python -m papers.novikov2015.run``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from decomp_toolkit.layers import decompose  # noqa: E402
from decomp_toolkit.layers._accounting import count_params, layer_macs  # noqa: E402
from decomp_toolkit.layers.tt import TTLinear  # noqa: E402
from papers._common import Check, run_paper, table  # noqa: E402
from papers._shapes import VGG16, network_totals  # noqa: E402

# FC6 25088 = 2*7*8*8*7*4 -> 4096 = 4^6 (the shapes of a public reproduction, REFERENCES [U]);
# FC7 4096 = 4^6 -> 4096 = 4^6 (our choice for the FC6+FC7 network figure).
FC6 = dict(in_features=25088, out_features=4096, in_shape=(2, 7, 8, 8, 7, 4), out_shape=(4,) * 6)
FC7 = dict(in_features=4096, out_features=4096, in_shape=(4,) * 6, out_shape=(4,) * 6)
VGG16_PARAMS = 138_357_544

# TT-rank -> (params, single-layer compression) as derived in REFERENCES.md [D]
FC6_PAPER = {1: (144, None), 2: (528, 194_622), 4: (2_016, 50_972), 8: (7_872, 13_054)}
NETWORK_PAPER = {"FC6": 3.89, "FC6+FC7": 7.35}
NETWORK_RANK = 8   # any TT-rank 1..8 gives the same two decimals


def tt_layer(spec, rank, bias=False) -> TTLinear:
    """Our TTLinear for ``spec`` at a uniform TT-rank, on the meta device (no memory)."""
    return TTLinear(**spec, rank=rank, bias=bias, device="meta")


def fc6_rows() -> list:
    dense = count_params(VGG16[13].module(bias=False))  # FC6 weight, 25088 x 4096
    rows = []
    for rank in FC6_PAPER:
        layer = tt_layer(FC6, rank)
        rows.append(dict(rank=rank, params=layer.num_params, compression=dense / layer.num_params,
                         MACs=layer.flops((1, FC6["in_features"])), dense_MACs=layer.dense_flops((1, 25088))))
    return rows


def network_compression(layers=("FC6",), rank=NETWORK_RANK) -> float:
    """VGG-16 parameters / parameters with the given FC layers' weights replaced by TT-matrices (biases kept)."""
    total = network_totals(VGG16)["params"]
    after = total
    for name in layers:
        spec = FC6 if name == "FC6" else FC7
        dense = tt_layer(spec, rank, bias=False)
        after += dense.num_params - dense.dense_weight_numel()
    return total / after


def checks() -> list:
    result = [Check("VGG-16 parameters", VGG16_PARAMS, network_totals(VGG16)["params"], "exact",
                    "meta modules, count_params")]
    for row in fc6_rows():
        params, compression = FC6_PAPER[row["rank"]]
        result.append(Check(f"FC6 TT-rank {row['rank']}: params", params, row["params"], "exact",
                            "TTLinear.num_params (no bias)"))
        if compression is not None:
            result.append(Check(f"FC6 TT-rank {row['rank']}: compression", compression, row["compression"],
                                "decimals=0", "25088*4096 / params"))
    for label, paper in NETWORK_PAPER.items():
        result.append(Check(f"VGG-16 compression, {label} as TT (rank {NETWORK_RANK})", paper,
                            network_compression(tuple(label.split("+"))), "decimals=2"))
    return result


def fc6_table():
    rows = [dict(rank=r["rank"], params=r["params"], compression=f"{r['compression']:,.1f}",
                 MACs=r["MACs"], dense_MACs=r["dense_MACs"]) for r in fc6_rows()]
    return table(rows, title="VGG-16 FC6 as a TTLinear (2*7*8*8*7*4 -> 4^6), meta device")


# ----------------------------------------------------------------------------- MNIST CNN

MNIST_RANKS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def relative_error(layer, dense) -> float:
    """Measured ``||W - W_tt||_F / ||W||_F``."""
    return float((layer.dense_weight() - dense.weight).norm() / dense.weight.norm())


def mnist_tt_experiment(ranks=MNIST_RANKS, n_images=None):
    """classifier.0 (3136 -> 128) as a TTLinear (automatic balanced shapes) at several TT-ranks."""
    from decomp_toolkit.analysis.zoo import accuracy, load_mnist_cnn, load_mnist_images

    model = load_mnist_cnn()
    images, labels = load_mnist_images(n_images)
    dense = model.classifier[0]
    rows = [dict(rank="dense", shapes="-", params=count_params(dense), compression="1.0",
                 MACs=layer_macs(dense, (1, dense.in_features))[0], rel_error="0", bound="0",
                 accuracy=accuracy(model, images, labels))]
    for rank in ranks:
        layer = decompose(dense, method="tt", rank=rank, name="classifier.0")
        small = copy.deepcopy(model)
        small.classifier[0] = layer
        rows.append(dict(rank=rank, shapes=f"{layer.in_shape} -> {layer.out_shape}", params=layer.num_params,
                         compression=f"{count_params(dense) / layer.num_params:.1f}",
                         MACs=layer.flops((1, dense.in_features)),
                         rel_error=f"{relative_error(layer, dense):.4f}",
                         bound=f"{layer.fit.relative_error_bound:.4f}",
                         accuracy=accuracy(small, images, labels)))
    return table(rows, title=f"ccexam MNIST CNN, classifier.0 as TTLinear ({len(images):,} images; "
                             f"rel_error = measured ||W - W_tt|| / ||W||, bound = certified TT-SVD bound)")


def main(argv=None) -> int:
    return run_paper("novikov2015", checks, [fc6_table], [mnist_tt_experiment], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
