"""Layer shapes of the papers' networks, as data, and meta-device modules built from them.

Nothing here counts parameters or FLOPs by formula: :func:`meta_layers` builds the real
``nn.Conv2d`` / ``nn.Linear`` modules on the ``meta`` device (no memory, no weights) and
the counts come from :mod:`layers._accounting` (``count_params``, ``layer_macs``), the
same code that ``compress`` reports with.

* VGG-16 (Simonyan & Zisserman; Zhang et al. 2016, Novikov et al. 2015): 13 3x3 convs
  (padding 1) on a 224x224 input, FC 25088-4096-4096-1000; 138,357,544 parameters.
* AlexNet, Caffe's BVLC version (Kim et al. 2016, Lebedev et al. 2015): 227x227 input,
  conv2/4/5 grouped (groups=2), 60,954,656 weights (60,965,224 with biases),
  724,406,816 MACs.
* ResNet-18 / ResNet-50, torchvision layout (Stock et al. 2020): 11,689,512 and
  25,557,032 parameters (convs without bias, BatchNorm affine pairs, FC with bias).
* Jaderberg et al. 2014's text network conv2 / conv3 (with the maxout widths).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from decomp_toolkit.layers._accounting import count_params, layer_macs


@dataclass(frozen=True)
class ConvSpec:
    """A Conv2d and its input: ``in_channels -> out_channels``, ``k x k``, input ``size x size``."""

    name: str
    in_channels: int
    out_channels: int
    kernel: int
    size: int            # input height = width
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def module(self, bias=True, device="meta") -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel, stride=self.stride,
                         padding=self.padding, groups=self.groups, bias=bias, device=device)

    @property
    def input_shape(self) -> tuple:
        return (self.in_channels, self.size, self.size)


@dataclass(frozen=True)
class LinearSpec:
    name: str
    in_features: int
    out_features: int

    def module(self, bias=True, device="meta") -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=bias, device=device)

    @property
    def input_shape(self) -> tuple:
        return (self.in_features,)


# ----------------------------------------------------------------------------- VGG-16

_VGG16_CONVS = [  # (name, in, out, input size); all 3x3, stride 1, padding 1
    ("C11", 3, 64, 224), ("C12", 64, 64, 224),
    ("C21", 64, 128, 112), ("C22", 128, 128, 112),
    ("C31", 128, 256, 56), ("C32", 256, 256, 56), ("C33", 256, 256, 56),
    ("C41", 256, 512, 28), ("C42", 512, 512, 28), ("C43", 512, 512, 28),
    ("C51", 512, 512, 14), ("C52", 512, 512, 14), ("C53", 512, 512, 14),
]
VGG16_CONVS = [ConvSpec(n, c, d, 3, s, padding=1) for n, c, d, s in _VGG16_CONVS]
VGG16_FCS = [LinearSpec("FC6", 25088, 4096), LinearSpec("FC7", 4096, 4096), LinearSpec("FC8", 4096, 1000)]
VGG16 = VGG16_CONVS + VGG16_FCS

# ----------------------------------------------------------------------------- AlexNet (Caffe)

ALEXNET_CONVS = [
    ConvSpec("conv1", 3, 96, 11, 227, stride=4),
    ConvSpec("conv2", 96, 256, 5, 27, padding=2, groups=2),     # after pool1 (3x3/2): 55 -> 27
    ConvSpec("conv3", 256, 384, 3, 13, padding=1),              # after pool2: 27 -> 13
    ConvSpec("conv4", 384, 384, 3, 13, padding=1, groups=2),
    ConvSpec("conv5", 384, 256, 3, 13, padding=1, groups=2),
]
ALEXNET_FCS = [LinearSpec("fc6", 9216, 4096), LinearSpec("fc7", 4096, 4096), LinearSpec("fc8", 4096, 1000)]
ALEXNET = ALEXNET_CONVS + ALEXNET_FCS

# ----------------------------------------------------------------------------- Jaderberg et al. text net

# 24x24 input; conv1 9x9 -> 16x16; conv2 9x9 (48 -> 128 filters, maxout 2 -> 64) -> 8x8;
# conv3 8x8 (64 -> 512 filters, maxout 4 -> 128) -> 1x1. Valid convolutions.
TEXTNET_CONV2 = ConvSpec("conv2", 48, 128, 9, 16)
TEXTNET_CONV3 = ConvSpec("conv3", 64, 512, 8, 8)

# ----------------------------------------------------------------------------- ResNet-18 / 50

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


RESNETS = {"resnet18": (RESNET18_CONVS, RESNET18_FC), "resnet50": (resnet50_convs(), RESNET50_FC)}


def resnet_modules(net: str, device="meta") -> dict:
    """``{name: module}``: every conv (no bias), its BatchNorm (``name + '.bn'``) and the fc."""
    convs, (out, inp) = RESNETS[net]
    modules = {}
    for name, (n, c, k, _) in convs:
        modules[name] = nn.Conv2d(c, n, k, bias=False, device=device)
        modules[name + ".bn"] = nn.BatchNorm2d(n, device=device)
    modules["fc"] = nn.Linear(inp, out, device=device)
    return modules


def resnet_param_count(net: str) -> int:
    """Parameters of ResNet-18/50 counted on meta modules (BatchNorm running stats are buffers)."""
    return sum(count_params(m) for m in resnet_modules(net).values())


# ----------------------------------------------------------------------------- counting

def meta_layers(specs, bias=True) -> list:
    """``[(spec, module)]`` with each module built on the meta device."""
    return [(s, s.module(bias=bias)) for s in specs]


def network_totals(specs, bias=True) -> dict:
    """Parameters and MACs of a network's Linear/Conv layers (meta modules, our accounting)."""
    params = macs = 0
    for spec, module in meta_layers(specs, bias=bias):
        params += count_params(module)
        macs += layer_macs(module, spec.input_shape)[0]
    return dict(params=params, macs=macs)


__all__ = ["ConvSpec", "LinearSpec", "VGG16", "VGG16_CONVS", "VGG16_FCS", "ALEXNET", "ALEXNET_CONVS",
           "ALEXNET_FCS", "TEXTNET_CONV2", "TEXTNET_CONV3", "RESNET18_CONVS", "RESNET18_FC", "RESNET50_FC",
           "resnet50_convs", "RESNETS", "resnet_modules", "resnet_param_count", "meta_layers", "network_totals"]
