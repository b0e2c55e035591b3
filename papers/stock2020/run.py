"""Stock, Joulin, Gribonval, Graham, Jégou 2020, "And the Bit Goes Down: Revisiting the
Quantization of Neural Networks" (ICLR): the compressed ResNet-18 / ResNet-50 sizes and
ratios of their README, from our PQ layers' size accounting; PQ accuracy vs size on the
ccexam MNIST CNN.

Run: ``python -m papers.stock2020.run``.

Size accounting (REFERENCES.md; it reproduces all four sizes exactly): every conv except
``conv1`` and the FC are product-quantized with one shared codebook per layer; conv codes
8 bits (256 centroids), FC codes ``log2(k)`` bits; 3x3 convs use the 3x3 block size, all
1x1 convs (bottleneck 1x1s and downsample convs) the 1x1 block size, the FC block size 4;
codebooks in fp16; ``conv1``, the BatchNorm affine parameters (running statistics are
buffers, not counted) and the FC bias in fp32. MB = MiB = 2**20 bytes (with 10**6 bytes the
uncompressed ResNet-18 would be 46.76 MB, not 44.59). Ratio = fp32 size of all parameters
/ compressed size. Every number is read off :class:`layers.PQConv` / :class:`layers.PQLinear`
built on the meta device (``size_bits``) and ``count_params`` of meta modules.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from decomp_toolkit.layers import PQConv, PQLinear  # noqa: E402
from decomp_toolkit.layers._accounting import count_params  # noqa: E402
from papers._common import Check, run_paper, table  # noqa: E402
from papers._shapes import RESNETS, resnet_modules, resnet_param_count  # noqa: E402

MIB = 2 ** 20

# The README of facebookresearch/kill-the-bits: block sizes, FC centroids, size (MB), ratio, top-1
STOCK_RESULTS = {
    ("resnet18", "small"): dict(block_3x3=9, block_1x1=4, fc_centroids=2048, mb=1.54, ratio=29, top1=65.81),
    ("resnet18", "large"): dict(block_3x3=18, block_1x1=4, fc_centroids=2048, mb=1.03, ratio=43, top1=61.18),
    ("resnet50", "small"): dict(block_3x3=9, block_1x1=4, fc_centroids=1024, mb=5.09, ratio=19, top1=73.79),
    ("resnet50", "large"): dict(block_3x3=18, block_1x1=8, fc_centroids=1024, mb=3.19, ratio=31, top1=68.21),
}
UNCOMPRESSED_MB = {"resnet18": 44.59, "resnet50": 97.49}


def quantized_modules(net: str, block_3x3: int, block_1x1: int, fc_centroids: int, *, fc_block: int = 4,
                      conv_centroids: int = 256, codebook_bits: int = 16) -> dict:
    """``{name: module}``: the network under Stock et al.'s scheme, PQ layers on the meta device.

    ``conv1`` and the BatchNorms stay dense (fp32); every other conv is a PQConv, the fc a PQLinear.
    """
    convs, (out, inp) = RESNETS[net]
    modules = resnet_modules(net)
    for name, (n, c, k, _) in convs:
        if name == "conv1":
            continue
        block = block_3x3 if k == 3 else block_1x1
        modules[name] = PQConv(c, n, k, block, conv_centroids, bias=False, codebook_bits=codebook_bits,
                               device="meta")
    modules["fc"] = PQLinear(inp, out, fc_block, fc_centroids, codebook_bits=codebook_bits, device="meta")
    return modules


def size_bits(modules: dict) -> int:
    """PQ layers: their ``size_bits`` (codes, fp16 codebooks, fp32 bias); dense modules: 32 bits a parameter."""
    return sum(m.size_bits if hasattr(m, "size_bits") else 32 * count_params(m) for m in modules.values())


def stock_size_bits(net: str, block_3x3: int, block_1x1: int, fc_centroids: int, **kw) -> int:
    """Compressed size in bits of ``net`` under Stock et al.'s accounting (module docstring)."""
    return size_bits(quantized_modules(net, block_3x3, block_1x1, fc_centroids, **kw))


def checks() -> list:
    result = []
    for net, mb in UNCOMPRESSED_MB.items():
        result.append(Check(f"{net} uncompressed MB", mb, resnet_param_count(net) * 4 / MIB, "decimals=2",
                            "fp32, MiB"))
    for (net, variant), cfg in STOCK_RESULTS.items():
        bits = stock_size_bits(net, cfg["block_3x3"], cfg["block_1x1"], cfg["fc_centroids"])
        result.append(Check(f"{net} {variant} blocks: MB", cfg["mb"], bits / 8 / MIB, "decimals=2"))
        result.append(Check(f"{net} {variant} blocks: ratio", cfg["ratio"], resnet_param_count(net) * 32 / bits,
                            "decimals=0"))
    return result


def breakdown_table():
    rows = []
    for (net, variant), cfg in STOCK_RESULTS.items():
        mods = quantized_modules(net, cfg["block_3x3"], cfg["block_1x1"], cfg["fc_centroids"])
        pq = [m for m in mods.values() if hasattr(m, "size_bits")]
        codes = sum(m.codes.numel() * m.code_bits for m in pq)
        books = sum(m.codebooks.numel() * m.codebook_bits for m in pq)
        dense = sum(32 * count_params(m) for m in mods.values() if not hasattr(m, "size_bits"))
        dense += sum(32 * m.bias.numel() for m in pq if m.bias is not None)
        total = codes + books + dense
        rows.append(dict(net=net, blocks=variant, codes_MiB=f"{codes / 8 / MIB:.3f}",
                         codebooks_MiB=f"{books / 8 / MIB:.3f}", fp32_MiB=f"{dense / 8 / MIB:.3f}",
                         total_MiB=f"{total / 8 / MIB:.3f}", paper_MB=str(cfg["mb"]),
                         ratio=f"{resnet_param_count(net) * 32 / total:.2f}", paper_ratio=cfg["ratio"],
                         paper_top1=str(cfg["top1"])))
    return table(rows, title="Where the bytes go (our PQConv/PQLinear size_bits, meta device)")


# ----------------------------------------------------------------------------- MNIST CNN

# (label, (block, centroids) of features.3, of classifier.0, of classifier.2); one shared fp16
# codebook per layer. features.0 (32 filters of 9 weights: fewer sub-vectors than 256
# centroids) stays fp32 like Stock et al.'s conv1.
MNIST_CONFIGS = [
    ("9x256 / 8x256 / 4x64", (9, 256), (8, 256), (4, 64)),
    ("18x256 / 16x256 / 8x64", (18, 256), (16, 256), (8, 64)),
    ("36x256 / 32x64 / 16x64", (36, 256), (32, 64), (16, 64)),
    ("36x64 / 64x64 / 32x16", (36, 64), (64, 64), (32, 16)),
]


def mnist_pq_experiment(n_images=None, n_iter=20):
    """PQ the ccexam MNIST CNN (conv 256 centroids; shared codebook per layer, fp16) and measure accuracy."""
    from decomp_toolkit.analysis.zoo import accuracy, load_mnist_cnn, load_mnist_images
    from decomp_toolkit.layers import compress

    model = load_mnist_cnn()
    images, labels = load_mnist_images(n_images)
    dense_bits = 32 * count_params(model)
    rows = [dict(config="dense fp32", size_KiB=f"{dense_bits / 8 / 1024:.1f}", ratio="1.00",
                 accuracy=accuracy(model, images, labels))]
    for label, *settings in MNIST_CONFIGS:
        policy = {name: dict(method="pq", block_size=block, n_centroids=k, n_iter=n_iter, random_state=0)
                  for name, (block, k) in zip(("features.3", "classifier.0", "classifier.2"), settings)}
        small, _ = compress(model, policy=policy, exclude=["features.0"], progress=False)
        bits = sum(m.size_bits for m in small.modules() if hasattr(m, "size_bits"))
        bits += 32 * sum(p.numel() for n, m in small.named_modules() if not hasattr(m, "size_bits")
                         for p in m.parameters(recurse=False))
        rows.append(dict(config=label, size_KiB=f"{bits / 8 / 1024:.1f}", ratio=f"{dense_bits / bits:.2f}",
                         accuracy=accuracy(small, images, labels)))
    return table(rows, title=f"ccexam MNIST CNN, product-quantized: block x centroids of features.3 / classifier.0 / "
                 f"classifier.2 (features.0 fp32; {len(images):,} images)")


def main(argv=None) -> int:
    return run_paper("stock2020", checks, [breakdown_table], [mnist_pq_experiment], argv=argv)


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
