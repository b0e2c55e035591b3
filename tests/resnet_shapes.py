"""ResNet-18 / ResNet-50 (torchvision layout) layer shapes as data, and Stock et al.'s size accounting.

No torchvision: the weight shapes are written out (R-18) or expanded from the standard
bottleneck stage table (R-50). Totals: 11,689,512 and 25,557,032 parameters.

Size accounting of "And the bit goes down" (Stock et al. 2020, REFERENCES.md), which
reproduces their four model sizes exactly from these shapes:

* every conv except ``conv1`` and the FC are product-quantized with one codebook per
  layer; conv codes 8 bits (256 centroids), FC codes ``log2(k)`` bits;
* 3x3 convs use the 3x3 block size, all 1x1 convs (bottleneck 1x1s and the downsample
  convs) the 1x1 block size; the FC uses block size 4;
* codebooks in fp16; ``conv1``, the BatchNorm affine parameters (weight and bias; the
  running statistics are buffers and not counted) and the FC bias in fp32;
* MB = MiB = 2**20 bytes (with 10**6 bytes the uncompressed R-18 would be 46.76 MB, not
  44.59); ratio = fp32 size of all parameters / compressed size.
"""
from __future__ import annotations

from decomp.pq import pq_size_bits

# (name, weight shape); convs (N, C, k, k), the fc (out, in)
RESNET18_CONVS = [
    ("conv1", (64, 3, 7, 7)),
    ("layer1.0.conv1", (64, 64, 3, 3)), ("layer1.0.conv2", (64, 64, 3, 3)),
    ("layer1.1.conv1", (64, 64, 3, 3)), ("layer1.1.conv2", (64, 64, 3, 3)),
    ("layer2.0.conv1", (128, 64, 3, 3)), ("layer2.0.conv2", (128, 128, 3, 3)),
    ("layer2.0.downsample.0", (128, 64, 1, 1)),
    ("layer2.1.conv1", (128, 128, 3, 3)), ("layer2.1.conv2", (128, 128, 3, 3)),
    ("layer3.0.conv1", (256, 128, 3, 3)), ("layer3.0.conv2", (256, 256, 3, 3)),
    ("layer3.0.downsample.0", (256, 128, 1, 1)),
    ("layer3.1.conv1", (256, 256, 3, 3)), ("layer3.1.conv2", (256, 256, 3, 3)),
    ("layer4.0.conv1", (512, 256, 3, 3)), ("layer4.0.conv2", (512, 512, 3, 3)),
    ("layer4.0.downsample.0", (512, 256, 1, 1)),
    ("layer4.1.conv1", (512, 512, 3, 3)), ("layer4.1.conv2", (512, 512, 3, 3)),
]
RESNET18_FC = (1000, 512)

RESNET50_STAGES = [(64, 3), (128, 4), (256, 6), (512, 3)]   # (bottleneck width, blocks); expansion 4
RESNET50_FC = (1000, 2048)


def resnet50_convs():
    """``[(name, shape)]`` of ResNet-50's convs (torchvision v1.5 layout: stride on the 3x3)."""
    convs = [("conv1", (64, 3, 7, 7))]
    inplanes = 64
    for stage, (width, blocks) in enumerate(RESNET50_STAGES, start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            cin = inplanes if block == 0 else 4 * width
            convs += [(f"{prefix}.conv1", (width, cin, 1, 1)), (f"{prefix}.conv2", (width, width, 3, 3)),
                      (f"{prefix}.conv3", (4 * width, width, 1, 1))]
            if block == 0:
                convs.append((f"{prefix}.downsample.0", (4 * width, cin, 1, 1)))
        inplanes = 4 * width
    return convs


NETS = {"resnet18": (RESNET18_CONVS, RESNET18_FC), "resnet50": (resnet50_convs(), RESNET50_FC)}


def _numel(shape):
    total = 1
    for s in shape:
        total *= s
    return total


def bn_channels(convs):
    """Every conv is followed by a BatchNorm over its output channels."""
    return [shape[0] for _, shape in convs]


def param_count(net: str) -> int:
    convs, fc = NETS[net]
    return (sum(_numel(s) for _, s in convs) + 2 * sum(bn_channels(convs)) + fc[0] * fc[1] + fc[0])


def stock_size_bits(net: str, block_3x3: int, block_1x1: int, fc_centroids: int, *, fc_block: int = 4,
                    conv_centroids: int = 256, codebook_bits: int = 16) -> int:
    """Compressed size in bits of ``net`` under Stock et al.'s accounting (module docstring)."""
    convs, fc = NETS[net]
    bits = 0
    for name, shape in convs:
        if name == "conv1":
            bits += 32 * _numel(shape)
            continue
        block = block_3x3 if shape[2] == 3 else block_1x1
        bits += pq_size_bits(shape, block, conv_centroids, codebook_bits=codebook_bits)
    bits += 32 * 2 * sum(bn_channels(convs))
    bits += pq_size_bits(fc, fc_block, fc_centroids, codebook_bits=codebook_bits) + 32 * fc[0]
    return bits


# Stock et al. 2020, README of facebookresearch/kill-the-bits: (size MB, ratio)
STOCK_RESULTS = {
    ("resnet18", "small"): dict(block_3x3=9, block_1x1=4, fc_centroids=2048, mb=1.54, ratio=29),
    ("resnet18", "large"): dict(block_3x3=18, block_1x1=4, fc_centroids=2048, mb=1.03, ratio=43),
    ("resnet50", "small"): dict(block_3x3=9, block_1x1=4, fc_centroids=1024, mb=5.09, ratio=19),
    ("resnet50", "large"): dict(block_3x3=18, block_1x1=8, fc_centroids=1024, mb=3.19, ratio=31),
}
UNCOMPRESSED_MB = {"resnet18": 44.59, "resnet50": 97.49}
