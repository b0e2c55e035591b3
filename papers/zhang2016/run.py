"""Zhang, Zou, He, Sun 2016, "Accelerating Very Deep Convolutional Networks for Classification
and Detection" (TPAMI): whole-network speedups of VGG-16 under the channel-SVD cost model,
and our global budget allocation (their greedy rank selection) on a real trained CNN.

Run: ``python -m papers.zhang2016.run`` (or ``python papers/zhang2016/run.py``).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from decomp_toolkit.layers import LowRankConv, LowRankLinear, compress, decompose  # noqa: E402
from decomp_toolkit.layers._accounting import layer_macs  # noqa: E402
from papers._common import Check, run_paper, table  # noqa: E402
from papers._shapes import VGG16_CONVS, VGG16_FCS  # noqa: E402

# Table 6 of Zhang et al.: ranks d' of C12 .. C53 (C11 is never accelerated).
RANKS = {
    "2x no-sel": (28, 52, 57, 104, 115, 115, 209, 230, 230, 230, 230, 230),
    "2x sel": (18, 41, 50, 94, 96, 116, 207, 213, 260, 467, 455, 442),
    "3x no-sel": (19, 34, 38, 69, 76, 76, 139, 153, 153, 153, 153, 153),
    "3x sel": (15, 31, 34, 68, 64, 75, 134, 126, 146, 312, 307, 294),
    "4x no-sel": (14, 26, 28, 52, 57, 57, 104, 115, 115, 115, 115, 115),
    "4x sel": (11, 25, 28, 52, 46, 56, 104, 92, 100, 232, 224, 214),
}
NOMINAL = {name: float(name[0]) for name in RANKS}   # the columns' nominal speedups 2x / 3x / 4x
TOLERANCE = 0.01   # integer ranks cannot hit 2x/3x/4x exactly; the paper's columns are nominal

# Which layers and pixels are counted (the accounting variants we compare):
VARIANTS = {
    "13 convs, C11 dense": dict(c11=True, fcs=False),      # the paper's model (reproduces)
    "C12-C53 only": dict(c11=False, fcs=False),
    "13 convs + FC6-8 dense": dict(c11=True, fcs=True),
}


def layer_costs(ranks) -> list:
    """Per VGG-16 conv: dense MACs and our LowRankConv's MACs at Table 6's rank (224x224 input).

    Both from the toolkit: ``layer_macs`` of the meta nn.Conv2d and ``LowRankConv.flops`` of
    the channel-scheme layer (k x k conv C -> d', 1x1 conv d' -> d) built on the meta device.
    """
    rows = []
    for spec, rank in zip(VGG16_CONVS, (None,) + tuple(ranks)):
        dense = layer_macs(spec.module(), spec.input_shape)[0]
        if rank is None:
            low = dense
        else:
            layer = LowRankConv(spec.in_channels, spec.out_channels, spec.kernel, rank, padding=spec.padding,
                                device="meta")
            low = layer.flops(spec.input_shape)
        pixels = spec.size * spec.size
        rows.append(dict(layer=spec.name, rank=rank, dense=dense, lowrank=low, pixels=pixels,
                         per_pixel=low // pixels))
    return rows


def whole_network_speedup(ranks, c11=True, fcs=False) -> float:
    """Dense MACs / low-rank MACs summed over the counted layers."""
    rows = layer_costs(ranks)
    if not c11:
        rows = rows[1:]
    dense = sum(r["dense"] for r in rows)
    low = sum(r["lowrank"] for r in rows)
    if fcs:
        fc = sum(layer_macs(s.module(), s.input_shape)[0] for s in VGG16_FCS)
        dense, low = dense + fc, low + fc
    return dense / low


def checks() -> list:
    result = []
    for name, ranks in RANKS.items():
        result.append(Check(f"VGG-16 speedup, {name}", NOMINAL[name], whole_network_speedup(ranks),
                            f"rel={TOLERANCE}", "13 convs at 224x224, C11 dense"))
    return result


def variants_table():
    rows = []
    for name in RANKS:
        row = {"ranks": name, "paper": f"{NOMINAL[name]:.0f}x"}
        for label, kw in VARIANTS.items():
            row[label] = f"{whole_network_speedup(RANKS[name], **kw):.4f}"
        rows.append(row)
    return table(rows, title="Whole-network speedup under the channel-SVD cost model, by what is counted")


def per_layer_table(name="4x sel"):
    rows = [dict(layer=r["layer"], rank=r["rank"] if r["rank"] is not None else "dense", dense_MACs=r["dense"],
                 lowrank_MACs=r["lowrank"], speedup=f"{r['dense'] / r['lowrank']:.2f}",
                 MACs_per_pixel=r["per_pixel"]) for r in layer_costs(RANKS[name])]
    return table(rows, title=f"Per layer, Table 6 '{name}' ranks (LowRankConv.flops on a 224x224 input)")


# ----------------------------------------------------------------------------- MNIST CNN

def _lowrank_module(layer, rank):
    if isinstance(layer, torch.nn.Linear):
        return LowRankLinear(layer.in_features, layer.out_features, rank, device="meta")
    return LowRankConv(layer.in_channels, layer.out_channels, layer.kernel_size, rank, padding=layer.padding,
                       stride=layer.stride, device="meta")


def _targets(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def uniform_ranks(model, shapes, fraction) -> dict:
    """Zhang's 'no selection' analogue: each layer at the largest rank whose MACs are <= fraction of its own.

    A layer for which even rank 1 is above that stays dense (None).
    """
    ranks = {}
    for name, layer in _targets(model):
        dense = layer_macs(layer, shapes[name])[0]
        full = min(layer.weight.shape[0], layer.weight[0].numel())
        fits = [r for r in range(1, full + 1) if _lowrank_module(layer, r).flops(shapes[name]) <= fraction * dense]
        ranks[name] = max(fits) if fits else None
    return ranks


def kept_energy(layer, rank) -> float:
    """Fraction of ||W||_F^2 kept by the rank-``rank`` channel-scheme SVD (1 when dense)."""
    if rank is None:
        return 1.0
    s2 = torch.linalg.svdvals(layer.weight.detach().double().reshape(layer.weight.shape[0], -1)) ** 2
    return float(s2[:rank].sum() / s2.sum())


def apply_ranks(model, ranks):
    out = copy.deepcopy(model)
    for name, rank in ranks.items():
        if rank is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, decompose(model.get_submodule(name), "svd", rank=rank))
    return out


def total_macs(model, shapes) -> int:
    mods = dict(model.named_modules())
    return sum(layer_macs(mods[n], s)[0] for n, s in shapes.items())


def allocations(model, example_input, fraction) -> dict:
    """Uniform and selected ranks at equal MACs for one budget ``fraction`` (no accuracy).

    Uniform ranks come first; the selected allocation (``compress(..., budget=dict(flops=f))``)
    then gets exactly the uniform model's MAC fraction as its budget, so the two are compared
    at equal (or lower) cost. Returns ``{label: dict(ranks, model, MACs, energy)}`` with
    ``energy`` the product over layers of the kept energy fractions (Zhang's objective).
    """
    from decomp_toolkit.layers.compress import record_input_shapes

    names = [n for n, _ in _targets(model)]
    shapes = record_input_shapes(model, example_input, names)
    dense_macs = total_macs(model, shapes)
    uniform = uniform_ranks(model, shapes, fraction)
    uni_model = apply_ranks(model, uniform)
    sel_model, report = compress(model, method="svd", budget=dict(flops=total_macs(uni_model, shapes) / dense_macs),
                                 example_input=example_input, progress=False)
    selected = {r.name: (r.rank if r.replaced else None) for r in report.layers}
    out = {}
    for label, ranks, net in (("uniform", uniform, uni_model), ("selected (budget)", selected, sel_model)):
        energy = math.prod(kept_energy(model.get_submodule(n), r) for n, r in ranks.items())
        out[label] = dict(ranks=ranks, model=net, MACs=total_macs(net, shapes), energy=energy,
                          dense_MACs=dense_macs)
    return out


def mnist_budget_experiment(fractions=(0.5, 0.3, 0.2, 0.1), n_images=None):
    """Selected vs uniform ranks at equal MACs on the ccexam MNIST CNN, with accuracy (see ``allocations``)."""
    from decomp_toolkit.analysis.zoo import accuracy, load_mnist_cnn, load_mnist_images

    model = load_mnist_cnn()
    images, labels = load_mnist_images(n_images)
    rows = []
    for fraction in fractions:
        for label, result in allocations(model, images[:1], fraction).items():
            if not rows:
                rows.append(dict(fraction="dense", allocation="-", ranks="dense", MACs=result["dense_MACs"],
                                 energy_product="1.0000", accuracy=accuracy(model, images, labels)))
            rows.append(dict(fraction=f"{fraction:.2f}", allocation=label,
                             ranks=" / ".join("dense" if r is None else str(r) for r in result["ranks"].values()),
                             MACs=result["MACs"], energy_product=f"{result['energy']:.4f}",
                             accuracy=accuracy(result["model"], images, labels)))
    return table(rows, ["fraction", "allocation", "ranks", "MACs", "energy_product", "accuracy"],
                 title="ccexam MNIST CNN: ranks of features.0 / features.3 / classifier.0 / classifier.2 "
                       f"at equal MACs ({len(images):,} MNIST images)")


def main(argv=None) -> int:
    return run_paper("zhang2016", checks, [per_layer_table, variants_table], [mnist_budget_experiment], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
