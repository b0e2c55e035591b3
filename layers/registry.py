"""The method registry: one entry per decomposition method, carrying what it accepts.

A method module registers one builder per layer kind (``"linear"``, or 1/2/3 for
Conv1d/2d/3d, see :mod:`layers.kinds`)::

    @register("svd", ["linear"], "truncated SVD: two matmuls", spec_kinds=("rank", "energy", "tol", "ratio",
              "vbmf"), data_aware=True)
    def _svd_linear(layer, spec, *, context, algorithm="exact", random_state=None, gram=None, input_mean=None):
        \"\"\"Options:
            algorithm: "exact" (LAPACK) or "randomized" (Halko et al.)
            random_state: seed of the randomized algorithm
        \"\"\"

A builder is called as ``builder(layer, spec, context=..., **options)`` under
``torch.no_grad()`` with ``layer`` a validated standard ``nn.Linear``/``nn.ConvNd``
and ``spec`` the ONE :class:`~decomp.rank.RankSpec` :func:`~layers.decompose` parsed
against the entry (None when the method takes no rank spec, or none was given and
``spec_required=False``); it returns a :class:`~layers.base.FactorizedLayer` with a
``fit`` record and must not modify ``layer``. Its keyword-only parameters (after
``context``) are the method's public options, documented in the builder docstring's
``Options:`` block (``name: meaning`` lines); ``gram``/``input_mean`` are the resolved
statistics of a data-aware method (:mod:`layers.data_aware`).

Capabilities checked once, before any work, by ``decompose`` and ``compress``:
``spec_kinds`` (subset of rank/energy/tol/ratio/vbmf), ``rank_tuples`` (per-mode tuple
ranks), ``spec_required``, ``data_aware``, the layer kinds with a builder, and
``unsupported={kind: reason}`` (a kind the method refuses on purpose: raises
:class:`~layers.errors.UnsupportedLayerError` with that reason), and ``conv_chain=True`` (its
conv builders return a :class:`~layers.base.FactorizedChain` of plain convs, which makes
transposed convs factorizable by it, :mod:`layers.transposed`).
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Callable

from .data_aware import DATA_AWARE_DOCS, DATA_AWARE_OPTIONS
from .kinds import kind_name
from .speed import SPEED_DOCS, SPEED_OPTIONS

SPEC_KINDS = ("rank", "energy", "tol", "ratio", "vbmf")
RESERVED = {"layer", "spec", "context", "gram", "input_mean"}


@dataclass
class MethodEntry:
    """One method: its builders per layer kind and what it accepts (see the module docstring)."""

    name: str
    description: str = ""
    builders: dict = field(default_factory=dict)
    spec_kinds: tuple = ("rank", "energy", "tol", "ratio", "vbmf")
    rank_tuples: bool = False
    spec_required: bool = True
    spec_refusal: str = ""          # sentence for a refused spec kind; "{kind}" becomes e.g. "energy=" or "rank='vbmf'"
    data_aware: bool = False
    no_data_aware_reason: str = ""  # why a method without a data-aware variant has none
    unsupported: dict = field(default_factory=dict)
    budget_profile: Callable | None = None  # layer, **options -> layers.budget.BudgetProfile
    from_factors: dict = field(default_factory=dict)  # kind -> fn(layer, factors, *, context) -> FactorizedLayer
    conv_chain: bool = False  # its conv layers are chains of plain convs, so it factorizes transposed convs too

    @property
    def kinds(self) -> tuple:
        return tuple(self.builders)

    def options(self, kind) -> list:
        """Names of the public keyword options of the builder for ``kind`` (data-aware ones included)."""
        builder = self.builders.get(kind) or next(iter(self.builders.values()))
        params = inspect.signature(builder).parameters.values()
        names = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in RESERVED]
        names += [o for o in SPEED_OPTIONS if o not in names]  # every method: layers.speed
        return names + (list(DATA_AWARE_OPTIONS) if self.data_aware else [])

    def all_options(self) -> list:
        """The options of every kind (what ``compress`` may pass to every layer)."""
        seen = []
        for kind in self.builders:
            seen += [o for o in self.options(kind) if o not in seen]
        return seen

    def option_docs(self) -> dict:
        """``{option: meaning}`` from the builders' ``Options:`` blocks (and the data-aware options)."""
        docs = {}
        for builder in self.builders.values():
            docs.update(_parse_options(inspect.getdoc(builder) or ""))
        if self.data_aware:
            docs.update(DATA_AWARE_DOCS)
        return {**docs, **SPEED_DOCS}


def _parse_options(doc: str) -> dict:
    block = doc.split("Options:", 1)[1] if "Options:" in doc else ""
    docs, current = {}, None
    for line in block.splitlines():
        match = re.match(r"\s*([A-Za-z_][A-Za-z_0-9]*): (.*)", line)
        if match:
            current = match.group(1)
            docs[current] = match.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
        elif not line.strip() and docs:
            current = None
    return docs


_REGISTRY: dict[str, MethodEntry] = {}


def register(name: str, kinds, description: str = "", *, spec_kinds=("rank", "energy", "tol", "ratio", "vbmf"),
             rank_tuples=False, spec_required=True, spec_refusal="", data_aware=False, no_data_aware_reason="",
             unsupported=None, conv_chain=False):
    """Decorator: register ``builder`` for method ``name`` and layer ``kinds`` (see the module docstring)."""
    unknown = [k for k in spec_kinds if k not in SPEC_KINDS]
    if unknown:
        raise ValueError(f"register({name!r}): spec_kinds {unknown} are not among {SPEC_KINDS}")

    def wrap(builder: Callable):
        entry = _REGISTRY.setdefault(name, MethodEntry(name))
        entry.description = entry.description or description
        entry.spec_kinds, entry.rank_tuples, entry.spec_required = tuple(spec_kinds), rank_tuples, spec_required
        entry.spec_refusal, entry.data_aware = spec_refusal, data_aware
        entry.no_data_aware_reason = no_data_aware_reason or entry.no_data_aware_reason
        entry.unsupported.update(unsupported or {})
        entry.conv_chain = entry.conv_chain or conv_chain
        for kind in kinds:
            entry.builders[kind] = builder
        return builder
    return wrap


def register_from_factors(name: str, kinds):
    """Decorator: ``fn(layer, factors, *, context) -> FactorizedLayer`` builds method ``name``'s layer from factors
    computed elsewhere (``decompose(layer, method=name, factors=...)``; a tensorly decomposition is converted
    with :func:`decomp.from_tensorly` first). ``fn`` checks that the factors fit the layer (ValueError naming both)."""
    def wrap(fn: Callable):
        entry = _REGISTRY.setdefault(name, MethodEntry(name))
        for kind in kinds:
            entry.from_factors[kind] = fn
        return fn
    return wrap


def register_budget_profile(name: str):
    """Decorator: ``fn(layer, **options) -> BudgetProfile`` lets ``compress(budget=...)`` use method ``name``."""
    def wrap(fn: Callable):
        _REGISTRY.setdefault(name, MethodEntry(name)).budget_profile = fn
        return fn
    return wrap


def available_methods() -> dict:
    """``{method name: MethodEntry}`` of every registered method: the source of truth for what exists."""
    return dict(_REGISTRY)


def get_method(method: str, context: str = "") -> MethodEntry:
    """The entry of ``method``; ValueError naming the available ones."""
    if method not in _REGISTRY:
        prefix = f"{context}: " if context else ""
        raise ValueError(f"{prefix}unknown method={method!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[method]


def methods_for(kind) -> list:
    """Names of the methods with a builder for ``kind``."""
    return sorted(m for m, e in _REGISTRY.items() if kind in e.builders)


def method_table() -> str:
    """A Markdown table of every method: layer kinds, rank specs, data-aware, its own options and their meaning.

    The options every method takes (``optimize``/``input_shape``/``on_slower``) and those of every
    data-aware method (``gram``/``input_mean``/``calibration``/``center``) follow the table once.
    """
    shared = set(SPEED_OPTIONS) | set(DATA_AWARE_OPTIONS)
    lines = ["| method | layers | rank spec | data-aware | options |", "|---|---|---|---|---|"]
    for name in sorted(_REGISTRY):
        entry = _REGISTRY[name]
        if not entry.builders:
            continue
        kinds = ", ".join(kind_name(k) for k in entry.builders if k not in entry.unsupported)
        specs = ", ".join(k if k != "vbmf" else "rank='vbmf'" for k in entry.spec_kinds) or "none"
        if entry.spec_kinds and not entry.spec_required:
            specs += " (optional)"
        options = "; ".join(f"`{k}`: {v}" for k, v in entry.option_docs().items() if k not in shared) or "-"
        lines.append(f"| `{name}` | {kinds} | {specs} | {'yes' if entry.data_aware else 'no'} | {options} |")
    lines.append("")
    lines += [f"Every method: `{k}`: {v}" for k, v in SPEED_DOCS.items()]
    lines += [f"Data-aware methods: `{k}`: {v}" for k, v in DATA_AWARE_DOCS.items()]
    return "\n".join(lines)


__all__ = ["MethodEntry", "register", "register_budget_profile", "register_from_factors", "available_methods",
           "get_method", "methods_for", "method_table", "SPEC_KINDS"]
