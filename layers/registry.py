"""The method registry: one entry per decomposition method.

A method registers one builder per layer kind (``"linear"``, or 1/2/3 for
Conv1d/2d/3d). A builder is called as
``builder(layer, rank=, energy=, tol=, ratio=, context=..., **options)`` under
``torch.no_grad()`` and returns a FactorizedLayer; it must not modify ``layer``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

KIND_NAMES = {"linear": "Linear", 1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}


@dataclass
class MethodEntry:
    name: str
    description: str
    builders: dict = field(default_factory=dict)
    spec_kinds: tuple = ("rank", "energy", "tol", "ratio")
    budget_profile: Callable | None = None  # layer, **options -> layers.budget.BudgetProfile

    def options(self, kind) -> list:
        """Names of the method-specific keyword options of the builder for ``kind``."""
        params = inspect.signature(self.builders[kind]).parameters.values()
        reserved = {"layer", "rank", "energy", "tol", "ratio", "context"}
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in reserved]


_REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, kinds, description: str = "", spec_kinds=("rank", "energy", "tol", "ratio")):
    """Decorator: register ``builder`` for method ``name`` and layer ``kinds``."""
    def wrap(builder: Callable):
        entry = _REGISTRY.setdefault(name, MethodEntry(name, description, spec_kinds=spec_kinds))
        if description and not entry.description:
            entry.description = description
        for kind in kinds:
            entry.builders[kind] = builder
        return builder
    return wrap


def register_budget_profile(name: str):
    """Decorator: ``fn(layer, **options) -> BudgetProfile`` lets ``compress(budget=...)`` use method ``name``."""
    def wrap(fn: Callable):
        _REGISTRY.setdefault(name, MethodEntry(name, "")).budget_profile = fn
        return fn
    return wrap


def available_methods() -> dict:
    """``{method name: MethodEntry}`` of every registered method."""
    _load_builtin_methods()
    return dict(_REGISTRY)


def get_builder(method: str, kind, context: str):
    """The builder for ``method`` on a layer of ``kind``; ValueError naming alternatives."""
    methods = available_methods()
    if method not in methods:
        raise ValueError(f"{context}: unknown method={method!r}; available: {sorted(methods)}")
    entry = methods[method]
    if kind not in entry.builders:
        able = sorted(m for m, e in methods.items() if kind in e.builders)
        raise ValueError(f"{context}: method={method!r} does not support {KIND_NAMES[kind]} layers; "
                         f"methods that do: {able}")
    return entry


def _load_builtin_methods():
    from . import lowrank  # noqa: F401  (registers "svd")
    from importlib import import_module
    for module in ("tucker", "cp", "tt", "btd", "pq", "structured"):
        try:
            import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{module}":
                raise
