"""Save and load compressed models without pickles: safetensors weights + a JSON manifest.

A folder written by :func:`save_compressed` holds

* ``model.safetensors``: the whole state dict of the compressed model (tensors that share
  storage, e.g. tied embeddings or one module reachable under two names, are stored once;
  the manifest lists each removed name and the name it shares with);
* ``compressed.json``: the manifest: every factorized module (its dotted name, other names
  of the same module object, class name and ``config``: the constructor keywords that
  rebuild it), the tied names, what the base model is, and the compression report if given;
* ``config.json`` for a ``transformers`` model (``model.config.save_pretrained``), so that
  the folder is also a ``save_pretrained`` folder.

:func:`load_compressed` rebuilds the base architecture (or takes ``model=``), puts a module
of each listed class at each listed name, and loads the weights strictly. Classes are
looked up by NAME among the :class:`~layers.base.FactorizedLayer` subclasses already
imported (the built-in methods and any the user imported); the manifest never makes
Python import anything. A manifest that does not parse, names an unknown class, a module
the base model does not have, or weights that do not fit raises
:class:`CompressedModelError` before the model is changed.

Base models rebuilt without ``model=``: ``transformers`` models (class from the folder's
``config.json``, which must be a ``transformers.PreTrainedModel``), and any kind provided
by an installed plugin in the ``decomp_toolkit.base_models`` entry-point group (the zoo
provides ``zoo``: ``save_compressed(m, d, base={"zoo": "mnist-cnn"})``).
"""
from __future__ import annotations

import copy
import json
import sys
from importlib import metadata
from pathlib import Path

import torch
import torch.nn as nn

from ._modules import set_submodule as _set_module
from .base import FactorizedLayer
from .kinds import dense_config, kind_of, standard_layer

MANIFEST = "compressed.json"
WEIGHTS = "model.safetensors"
FORMAT = "decomp-toolkit/compressed"
VERSION = 1
ENTRY_POINT_GROUP = "decomp_toolkit.base_models"
SHAPE_KEYS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "groups")


class CompressedModelError(ValueError):
    """A compressed-model folder that cannot be read, or does not fit the base model; the message says why."""


# --------------------------------------------------------------------------- config <-> JSON

def _to_json(value, where):
    """JSON-safe copy of a config value; tuples are kept as ``{"__tuple__": [...]}``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: config value {value!r} ({type(value).__name__}) cannot be written to JSON; "
                    f"configs hold numbers, strings, booleans, None, tuples, lists and dicts")


def _from_json(value, where):
    if isinstance(value, list):
        return [_from_json(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_from_json(v, where) for v in value["__tuple__"])
        if any(k.startswith("__") for k in value):
            raise CompressedModelError(f"{where}: unknown marker in config {value!r}")
        return {k: _from_json(v, where) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- classes by name

def factorized_classes() -> dict:
    """``{class name: [classes]}`` of the imported, public FactorizedLayer subclasses."""
    from .registry import available_methods

    available_methods()  # imports the built-in method modules
    found, todo = {}, list(FactorizedLayer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and cls not in found.get(cls.__name__, []):
            found.setdefault(cls.__name__, []).append(cls)
    return found


def _class_named(name, module_name, where):
    candidates = factorized_classes().get(name, []) if isinstance(name, str) else []
    if len(candidates) > 1:
        candidates = [c for c in candidates if c.__module__ == module_name] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        known = ", ".join(sorted(factorized_classes()))
        raise CompressedModelError(f"{where}: class {name!r} is not a known factorized layer class (known: {known}; "
                                   f"a class of your own must be imported before loading)")
    raise CompressedModelError(f"{where}: class name {name!r} is ambiguous: "
                               f"{', '.join(c.__module__ + '.' + c.__qualname__ for c in candidates)}")


# --------------------------------------------------------------------------- saving

def _factorized_modules(model) -> list:
    """``[(names, module)]``: each top-level factorized module once, with every name it has."""
    names_of = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FactorizedLayer) and name:
            names_of.setdefault(id(module), (module, []))[1].append(name)
    top = set()
    for module, names in names_of.values():
        top.update(names)
    out = []
    for module, names in names_of.values():
        outer = [n for n in names if not any(n.startswith(t + ".") for t in top)]
        if outer:
            out.append((outer, module))
    return out


def _storage_key(tensor):
    return (tensor.device.type, tensor.untyped_storage().data_ptr())


def _deduplicated(state: dict):
    """``(tensors to write, {removed name: kept name})``; tensors sharing storage are written once."""
    kept, tied, by_storage = {}, {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() == 0:
            kept[name] = tensor.contiguous()
            continue
        key = _storage_key(tensor)
        if key in by_storage:
            first = by_storage[key]
            view = state[first]
            if (view.shape, view.stride(), view.storage_offset(), view.dtype) != (
                    tensor.shape, tensor.stride(), tensor.storage_offset(), tensor.dtype):
                raise ValueError(f"state dict entries {first!r} and {name!r} share memory but are different views "
                                 f"of it; safetensors cannot store that: make one of them its own tensor")
            tied[name] = first
            continue
        by_storage[key] = name
        kept[name] = tensor.contiguous()
    return kept, tied


def _describe_base(model, base):
    if base is not None:
        if not (isinstance(base, dict) and len(base) == 1 and all(isinstance(v, str) for v in base.values())):
            raise ValueError(f"base={base!r}: pass one {{kind: name}} pair, e.g. base={{'zoo': 'mnist-cnn'}}")
        return dict(base)
    if _is_transformers_model(model):
        return {"transformers": type(model).__name__}
    return {"module": type(model).__name__}


def _is_transformers_model(model) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def save_compressed(model: nn.Module, directory, *, report=None, base=None) -> Path:
    """Write ``model`` (compressed or not) to the folder ``directory`` (created); returns its path.

    ``report``: the :class:`~layers.report.Report` of ``compress`` (kept in the manifest and
    shown by ``decomp info``). ``base``: how :func:`load_compressed` rebuilds the base model
    without ``model=``: detected for ``transformers`` models, ``{"zoo": name}`` for a zoo
    model; otherwise loading needs ``model=`` (an instance of the original architecture).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    modules = []
    for names, module in _factorized_modules(model):
        where = f"{names[0]} ({type(module).__name__})"
        modules.append({"name": names[0], "aliases": names[1:], "class": type(module).__name__,
                        "module": type(module).__module__, "config": _to_json(dict(module.config), where)})
    tensors, tied = _deduplicated(model.state_dict())
    manifest = {"format": FORMAT, "version": VERSION, "base": _describe_base(model, base),
                "base_class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                "modules": modules, "tied": tied, "weights": WEIGHTS,
                "report": report_to_dict(report) if report is not None else None}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    if _is_transformers_model(model):
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(directory))
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


# --------------------------------------------------------------------------- reading the manifest

def read_manifest(directory) -> dict:
    """The manifest of a folder written by :func:`save_compressed`, checked for structure."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressedModelError(f"{str(directory)!r} holds no {MANIFEST}: not a folder written by "
                                   f"save_compressed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompressedModelError(f"cannot read {str(path)!r}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompressedModelError(f"{str(path)!r} is not a decomp-toolkit manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CompressedModelError(f"{str(path)!r} has version {manifest.get('version')!r}; this toolkit reads "
                                   f"version {VERSION}")
    _check_entries(manifest, path)
    return manifest


def _check_entries(manifest, path):
    modules, tied = manifest.get("modules"), manifest.get("tied", {})
    if not isinstance(modules, list) or not isinstance(tied, dict):
        raise CompressedModelError(f"{str(path)!r}: 'modules' must be a list and 'tied' a mapping")
    for i, entry in enumerate(modules):
        ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]
              and isinstance(entry.get("class"), str) and isinstance(entry.get("config"), dict)
              and isinstance(entry.get("aliases", []), list)
              and all(isinstance(a, str) and a for a in entry.get("aliases", [])))
        if not ok:
            raise CompressedModelError(f"{str(path)!r}: modules[{i}] must have a non-empty 'name', a 'class' name, "
                                       f"a 'config' mapping and a list of 'aliases'; got {entry!r}"[:400])
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CompressedModelError(f"{str(path)!r}: 'tied' must map names to names")
    base = manifest.get("base")
    if not (isinstance(base, dict) and len(base) == 1 and all(isinstance(v, str) for v in base.values())):
        raise CompressedModelError(f"{str(path)!r}: 'base' must be one {{kind: name}} pair; got {base!r}")


# --------------------------------------------------------------------------- base models

def _transformers_base(name, directory):
    try:
        import transformers
    except ImportError:
        raise CompressedModelError(f"{str(directory)!r} holds a transformers model ({name}); install "
                                   f"transformers, or pass model=") from None
    config = transformers.AutoConfig.from_pretrained(str(directory))
    architectures = list(getattr(config, "architectures", None) or [name])
    cls = getattr(transformers, architectures[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CompressedModelError(f"{str(directory)!r}: config.json names the architecture {architectures[0]!r}, "
                                   f"which is not a transformers model class; pass model=")
    return cls(config)


def _plugin_base(kind, name, directory):
    found = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
    if not found:
        raise CompressedModelError(f"{str(directory)!r} was saved from a {kind} model ({name!r}) that this "
                                   f"installation cannot rebuild; pass model= (an instance of that architecture)")
    return found[0].load()(name)


def build_base(manifest: dict, directory) -> nn.Module:
    """The base model the manifest describes (transformers config, zoo entry, ...), before replacement."""
    (kind, name), = manifest["base"].items()
    if kind == "transformers":
        return _transformers_base(name, directory)
    if kind == "module":
        raise CompressedModelError(f"{str(directory)!r} was saved from a {name} (a plain nn.Module): pass "
                                   f"model= (an instance of {name}) to load_compressed")
    return _plugin_base(kind, name, directory)


# --------------------------------------------------------------------------- loading

def _check_fits(base_module, replacement, where):
    """The base model's module at this name must be the dense layer the replacement stands for."""
    if isinstance(base_module, FactorizedLayer):
        if type(base_module) is type(replacement):
            return
        raise CompressedModelError(f"{where}: the base model already has a {type(base_module).__name__} here")
    if kind_of(base_module) is None:
        _check_unregistered(base_module, replacement, where)
        return
    have = dense_config(standard_layer(base_module))
    want = replacement.dense_config
    diff = [k for k in SHAPE_KEYS if k in want and _norm(have.get(k)) != _norm(want[k])]
    if diff:
        raise CompressedModelError(f"{where}: the base model's layer has " + ", ".join(
            f"{k}={have.get(k)!r}" for k in diff) + " but the saved one has " + ", ".join(
            f"{k}={want[k]!r}" for k in diff) + ": a different architecture or size")


def _check_unregistered(base_module, replacement, where):
    """A layer type this process has not registered (e.g. transformers' Conv1D before ``compress`` ran):
    it must at least hold a weight of the replaced layer's size."""
    weight = getattr(base_module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise CompressedModelError(f"{where}: the base model has a {type(base_module).__name__} here, not a "
                                   f"Linear/Conv layer to replace: is it the architecture the folder was saved from?")
    if weight.numel() != replacement.dense_weight_numel():
        raise CompressedModelError(f"{where}: the base model's {type(base_module).__name__} has a weight of "
                                   f"{tuple(weight.shape)}, the saved layer replaced one of "
                                   f"{replacement.dense_weight_numel():,} entries: a different architecture or size")


def _norm(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _replacements(model, manifest, directory) -> list:
    """``[(names, module)]`` built from the manifest and checked against ``model`` (which is not changed)."""
    out = []
    for entry in manifest["modules"]:
        names = [entry["name"]] + list(entry.get("aliases", []))
        where = f"{str(directory)!r}, module {entry['name']!r}"
        cls = _class_named(entry["class"], entry.get("module"), where)
        try:
            module = cls(**_from_json(entry["config"], where))
        except (TypeError, ValueError) as err:
            raise CompressedModelError(f"{where}: cannot build {entry['class']} from its config: {err}") from None
        for name in names:
            try:
                base_module = model.get_submodule(name)
            except AttributeError:
                raise CompressedModelError(f"{where}: the base model ({type(model).__name__}) has no module "
                                           f"{name!r}: is it the architecture the folder was saved from?") from None
            _check_fits(base_module, module, f"{where} at {name!r}")
        out.append((names, module))
    return out


def _expected_state(model, replacements) -> dict:
    """``{key: shape}`` of the state dict ``model`` will have once the replacements are in."""
    replaced = [n for names, _ in replacements for n in names]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not any(k.startswith(n + ".") for n in replaced)}
    for names, module in replacements:
        for name in names:
            shapes.update({f"{name}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes


def _read_weights(directory, manifest, expected, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS
    try:
        state = load_file(str(path), device=str(device))
    except (OSError, SafetensorError) as err:
        raise CompressedModelError(f"cannot read the weights {str(path)!r}: {err}") from None
    # fresh, allocator-aligned copies: BLAS kernels chosen by alignment would round differently on file offsets
    state = {k: v.clone() for k, v in state.items()}
    for removed, kept in manifest.get("tied", {}).items():
        if kept not in state:
            raise CompressedModelError(f"{str(path)!r}: the tied name {removed!r} points at {kept!r}, which the "
                                       f"weights do not hold")
        state[removed] = state[kept]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: saved {tuple(state[k].shape)}, model {expected[k]}" for k in expected
             if k in state and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CompressedModelError(f"{str(directory)!r} does not fit the base model: "
                                   + "; ".join(f"{what} {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                                               for what, items in (("missing", missing), ("unexpected", unexpected),
                                                                   ("shape mismatch", wrong)) if items))
    return state


def _retie(model, tied):
    """Make each removed name share the kept tensor again (tied weights stay tied)."""
    for removed, kept in tied.items():
        owner_name, _, attr = removed.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        src_name, _, src_attr = kept.rpartition(".")
        src = model.get_submodule(src_name) if src_name else model
        table = "_parameters" if attr in owner._parameters else "_buffers"
        getattr(owner, table)[attr] = getattr(src, table if src_attr in getattr(src, table) else "_buffers")[src_attr]


def load_compressed(directory, model: nn.Module | None = None) -> nn.Module:
    """The compressed model saved in ``directory`` by :func:`save_compressed`, in eval mode.

    ``model``: an instance of the base architecture (its weights are replaced); it is
    modified in place and returned, and left unchanged when the folder does not fit it.
    Without it the base model is rebuilt from the folder (transformers config, zoo entry).
    Raises :class:`CompressedModelError` for a folder that is unreadable, tampered with, or
    saved from another architecture.
    """
    manifest = read_manifest(directory)
    if model is None:
        model = build_base(manifest, directory)
    replacements = _replacements(model, manifest, directory)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = _read_weights(directory, manifest, _expected_state(model, replacements), device)
    for names, module in replacements:
        for name in names:
            _set_module(model, name, module)
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest.get("tied", {}))
    return model.eval()


def report_to_dict(report) -> dict:
    """``report.to_dict()`` plus the report's own scalar fields (sizes, budget request), JSON-safe."""
    from dataclasses import fields

    own = {f.name: getattr(report, f.name) for f in fields(report) if f.name not in ("layers", "notes", "budget")}
    return json.loads(json.dumps(dict(report.to_dict(), fields=own), default=str))


def report_from_dict(saved: dict):
    """A :class:`~layers.report.Report` from its ``to_dict()`` (JSON lists back to tuples; unknown keys dropped)."""
    from dataclasses import fields

    from .report import LayerRecord, Report

    known = {f.name for f in fields(LayerRecord)}
    layers = [LayerRecord(**{k: tuple(v) if isinstance(v, list) else v for k, v in row.items() if k in known})
              for row in saved.get("layers", [])]
    report_fields = {f.name for f in fields(Report)} - {"layers", "notes", "budget"}
    own = saved.get("fields") or {k: v for k, v in saved.get("totals", {}).items() if k.startswith("model_")}
    return Report(layers=layers, notes=list(saved.get("notes", [])),
                  **{k: v for k, v in own.items() if k in report_fields})


def load_report(directory):
    """The :class:`~layers.report.Report` saved with the model (None when none was saved)."""
    saved = read_manifest(directory).get("report")
    return report_from_dict(saved) if isinstance(saved, dict) else None


__all__ = ["save_compressed", "load_compressed", "read_manifest", "load_report", "report_to_dict", "report_from_dict", "build_base", "factorized_classes",
           "CompressedModelError", "MANIFEST", "WEIGHTS"]
