"""Save and load compressed models without pickles: safetensors weights + a JSON manifest.

A folder written by :func:`save_compressed` holds

* ``model.safetensors``: the whole state dict of the compressed model (tensors that share
  storage, e.g. tied embeddings or one module reachable under two names, are stored once;
  the manifest lists each removed name and the name it shares with);
* ``compressed.json``: the manifest: every factorized module, nested ones included (a PQ
  layer inside a LowRankLinear; its dotted name, other names of the same module object,
  class name, ``config``: the constructor keywords that rebuild it, and its own buffers,
  e.g. those carried over from the layer it replaced), every plain Linear / ConvNd /
  BatchNorm (``plain``: class and constructor configuration, so that layers resized by
  hidden-unit pruning are rebuilt at their saved size), the names of its ``nn.Identity`` layers
  (``identities``: BatchNorms folded by ``fold_bn=True``), the tied names, what the base
  model is, and the compression report if given;
* ``config.json`` for a ``transformers`` model (``model.config.save_pretrained``), so that
  the folder is also a ``save_pretrained`` folder.

:func:`load_compressed` rebuilds the base architecture (or takes ``model=``), puts a module
of each listed class at each listed name (outer factorized modules before the ones nested
in them; a plain layer only where the base model's differs from the saved one: a smaller
one, never a larger one or another kind; an ``nn.Identity`` over a BatchNorm that ``fold_bn=True``
folded), carries the base model's forward hooks to the modules it puts in (as ``compress`` does),
and loads the weights strictly. Classes are
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

from ._modules import carry_hooks, keep_off_fused_fast_path
from ._modules import set_submodule as _set_module
from .base import FactorizedLayer
from .kinds import dense_config, kind_of, legacy_reparametrization, standard_layer

MANIFEST = "compressed.json"
WEIGHTS = "model.safetensors"
FORMAT = "decomp-toolkit/compressed"
VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: top-level factorized modules only, no buffers, no plain layers
ENTRY_POINT_GROUP = "decomp_toolkit.base_models"
SHAPE_KEYS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "groups")
# plain layers recorded by class and configuration (hidden-unit pruning resizes them); looked up by name here only
PLAIN_CLASSES = {cls.__name__: cls for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d,
                                               nn.BatchNorm2d, nn.BatchNorm3d)}
UNIT_KEYS = ("in_features", "out_features", "in_channels", "out_channels", "num_features")
FREE_KEYS = ("bias", "eps", "momentum")   # a pruned layer may differ from the base model's in these


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

def _module_names(model, keep) -> list:
    """``[(names, module)]``: each module that ``keep`` accepts once, with every dotted name it has, in the
    order ``named_modules`` first reaches them (a module before the ones inside it)."""
    names_of = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name and keep(module):
            names_of.setdefault(id(module), (module, []))[1].append(name)
    return [(names, module) for module, names in names_of.values()]


def _factorized_modules(model) -> list:
    """``[(names, module)]``: every factorized module once, with every name it has, nested ones included
    (e.g. a PQLinear that replaced a LowRankLinear's ``expand``), in ``named_modules`` order (loading orders
    them outer first whatever the order)."""
    return _module_names(model, lambda m: isinstance(m, FactorizedLayer))


def _plain_family(module):
    """The class of :data:`PLAIN_CLASSES` that ``module`` is an instance of (None: another kind, or a lazy
    module whose shapes are not known yet)."""
    if any(nn.parameter.is_lazy(t) for t in list(module.parameters(False)) + list(module.buffers(False))):
        return None
    return next((cls for cls in PLAIN_CLASSES.values() if isinstance(module, cls)), None)


def _plain_config(module) -> dict:
    """The constructor keywords that rebuild ``module`` (a Linear, ConvNd or BatchNorm) at its current size."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):   # the plain classes take no ``dim``
        config = {k: v for k, v in dense_config(module).items() if k != "dim"}
        return dict(config, bias=module.bias is not None)
    return {"num_features": module.num_features, "eps": module.eps, "momentum": module.momentum,
            "affine": module.affine, "track_running_stats": module.track_running_stats}


def _plain_modules(model, factorized) -> list:
    """``[(names, module)]``: the plain Linear / ConvNd / BatchNorm layers outside the factorized modules
    (``factorized``: their names; the layers inside one are rebuilt by its class from its config)."""
    inside = tuple(n + "." for names, _ in factorized for n in names)
    out = []
    for names, module in _module_names(model, lambda m: _plain_family(m) is not None):
        names = [n for n in names if not n.startswith(inside)]
        if names:
            out.append((names, module))
    return out


def _buffer_specs(module) -> list:
    """``[{name, shape, dtype, persistent}]`` of the module's own buffers (those carried over from the layer it
    replaced included): loading registers the ones its class does not build."""
    return [{"name": name, "shape": list(buffer.shape), "dtype": str(buffer.dtype).removeprefix("torch."),
             "persistent": name not in module._non_persistent_buffers_set}
            for name, buffer in module._buffers.items() if buffer is not None]


def _manifest_entries(model) -> tuple:
    """``(modules, plain, identities)``: the manifest entries of the factorized modules and of the plain layers,
    and the names of the Identity layers (:func:`_identity_names`)."""
    factorized = _factorized_modules(model)
    modules, plain = [], []
    for names, module in factorized:
        where = f"{names[0]} ({type(module).__name__})"
        modules.append({"name": names[0], "aliases": names[1:], "class": type(module).__name__,
                        "module": type(module).__module__, "config": _to_json(dict(module.config), where),
                        "buffers": _buffer_specs(module), "resized": bool(getattr(module, "resized", False))})
    for names, module in _plain_modules(model, factorized):
        where = f"{names[0]} ({type(module).__name__})"
        plain.append({"name": names[0], "aliases": names[1:], "class": type(module).__name__,
                      "family": _plain_family(module).__name__, "config": _to_json(_plain_config(module), where),
                      "buffers": _buffer_specs(module)})
    return modules, plain, _identity_names(model, factorized)


def _identity_names(model, factorized) -> list:
    """Every name of an ``nn.Identity`` outside the ``factorized`` modules (``[(names, module)]``), where
    ``fold_bn=True`` put one in place of a BatchNorm: loading puts it back over the base model's BatchNorm."""
    inside = tuple(n + "." for names, _ in factorized for n in names)
    return [n for names, _ in _module_names(model, lambda m: type(m) is nn.Identity) for n in names
            if not n.startswith(inside)]


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
    Nested factorized modules, the buffers carried over to replacements, and plain layers
    resized by hidden-unit pruning (``compress_sequential(pairs=...)``) are recorded too.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    modules, plain, identities = _manifest_entries(model)
    tensors, tied = _deduplicated(model.state_dict())
    manifest = {"format": FORMAT, "version": VERSION, "base": _describe_base(model, base),
                "base_class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                "modules": modules, "plain": plain, "identities": identities, "tied": tied,
                "weights": WEIGHTS,
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
    if manifest.get("version") not in READABLE_VERSIONS or isinstance(manifest.get("version"), bool):
        raise CompressedModelError(f"{str(path)!r} has version {manifest.get('version')!r}; this toolkit reads "
                                   f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    _check_entries(manifest, path)
    return manifest


def _check_entries(manifest, path):
    """Structure of the module lists, the tied names and the base (types only; contents are checked at load)."""
    modules, plain, tied = manifest.get("modules"), manifest.get("plain", []), manifest.get("tied", {})
    if not isinstance(modules, list) or not isinstance(tied, dict):
        raise CompressedModelError(f"{str(path)!r}: 'modules' must be a list and 'tied' a mapping")
    if not isinstance(plain, list):
        raise CompressedModelError(f"{str(path)!r}: 'plain' must be a list")
    for key, entries in (("modules", modules), ("plain", plain)):
        for i, entry in enumerate(entries):
            ok = (isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]
                  and isinstance(entry.get("class"), str) and isinstance(entry.get("config"), dict)
                  and isinstance(entry.get("aliases", []), list)
                  and all(isinstance(a, str) and a for a in entry.get("aliases", [])))
            if not ok:
                raise CompressedModelError(f"{str(path)!r}: {key}[{i}] must have a non-empty 'name', a 'class' "
                                           f"name, a 'config' mapping and a list of 'aliases'; got {entry!r}"[:400])
            if key == "plain" and entry.get("family") not in PLAIN_CLASSES:
                raise CompressedModelError(f"{str(path)!r}: plain[{i}] ({entry['name']!r}): 'family' must be one "
                                           f"of {', '.join(PLAIN_CLASSES)}; got {entry.get('family')!r}")
            _check_buffer_specs(entry.get("buffers", []), f"{str(path)!r}: {key}[{i}] ({entry['name']!r})")
    identities = manifest.get("identities", [])
    if not (isinstance(identities, list) and all(isinstance(n, str) and n for n in identities)):
        raise CompressedModelError(f"{str(path)!r}: 'identities' must be a list of module names")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise CompressedModelError(f"{str(path)!r}: 'tied' must map names to names")
    base = manifest.get("base")
    if not (isinstance(base, dict) and len(base) == 1 and all(isinstance(v, str) for v in base.values())):
        raise CompressedModelError(f"{str(path)!r}: 'base' must be one {{kind: name}} pair; got {base!r}")


def _dtype_named(name):
    """The ``torch.dtype`` called ``name`` (``"float32"``, ``"int64"``, ...), or None."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _check_buffer_specs(specs, where):
    """A module entry's ``buffers``: a list of ``{name, shape, dtype, persistent}``."""
    def ok(spec):
        """One well-formed buffer description."""
        return (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"].isidentifier()
                and isinstance(spec.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in spec["shape"])
                and _dtype_named(spec.get("dtype")) is not None and isinstance(spec.get("persistent"), bool))
    if not isinstance(specs, list) or not all(ok(s) for s in specs):
        raise CompressedModelError(f"{where}: 'buffers' must be a list of {{name, shape, dtype, persistent}}; "
                                   f"got {specs!r}"[:400])


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

def _check_fits(base_module, replacement, where, resized=False):
    """The base model's module at this name must be the dense layer the replacement stands for; ``resized`` (a
    layer pruned by hidden-unit compression, then factorized): that layer or one with more units."""
    if isinstance(base_module, FactorizedLayer):
        if type(base_module) is type(replacement):
            return
        raise CompressedModelError(f"{where}: the base model already has a {type(base_module).__name__} here")
    if kind_of(base_module) is None:
        _check_unregistered(base_module, replacement, where)
        return
    have = dense_config(standard_layer(base_module))
    want = replacement.dense_config
    diff = [k for k in SHAPE_KEYS if k in want and (
        not _fewer_units(want[k], have.get(k)) if resized and k in UNIT_KEYS else _norm(have.get(k)) != _norm(want[k]))]
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


def _entry_names(entry) -> list:
    """The entry's dotted name, then its aliases."""
    return [entry["name"]] + list(entry.get("aliases", []))


def _nesting_order(tagged, directory) -> list:
    """``tagged`` (``[(kind, entry)]``) ordered so that each entry comes after every entry it sits inside
    (a LowRankLinear before the PQLinear at its ``.expand``); a name listed twice is refused."""
    owner = {}
    for i, (_, entry) in enumerate(tagged):
        for name in _entry_names(entry):
            if owner.setdefault(name, i) != i:
                raise CompressedModelError(f"{str(directory)!r}: the module name {name!r} is listed twice")

    def outer(name):
        """The entries listed at a proper prefix of ``name`` (the modules it sits inside)."""
        parts = name.split(".")
        return {owner[p] for p in (".".join(parts[:k]) for k in range(1, len(parts))) if p in owner}

    after = [set().union(*(outer(n) for n in _entry_names(entry))) - {i} for i, (_, entry) in enumerate(tagged)]
    order, done = [], set()
    while len(order) < len(tagged):
        ready = [i for i in range(len(tagged)) if i not in done and after[i] <= done]
        if not ready:
            raise CompressedModelError(f"{str(directory)!r}: the listed modules sit inside each other in a cycle")
        order += ready
        done.update(ready)
    return [tagged[i] for i in order]


def _locate(model, built, name, where) -> tuple:
    """``(container, relative name, the module there now)``: ``container`` is the module already rebuilt from the
    manifest that ``name`` sits inside (a nested replacement goes into it), or None for the base model's own."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        container = built.get(".".join(parts[:k]))
        if container is not None:
            relative = ".".join(parts[k:])
            try:
                return container, relative, container.get_submodule(relative)
            except AttributeError:
                raise CompressedModelError(f"{where}: the rebuilt {type(container).__name__} at "
                                           f"{'.'.join(parts[:k])!r} has no module {relative!r}") from None
    try:
        return None, name, model.get_submodule(name)
    except AttributeError:
        raise CompressedModelError(f"{where}: the base model ({type(model).__name__}) has no module "
                                   f"{name!r}: is it the architecture the folder was saved from?") from None


def _built_factorized(entry, where):
    """A module of the entry's (known, factorized) class built from its config."""
    cls = _class_named(entry["class"], entry.get("module"), where)
    try:
        return cls(**_from_json(entry["config"], where))
    except (TypeError, ValueError) as err:
        raise CompressedModelError(f"{where}: cannot build {entry['class']} from its config: {err}") from None


def _replacements(model, manifest, directory) -> list:
    """``[(names, module)]`` to put into ``model`` at its own names, built from the manifest and checked against
    ``model`` (which is not changed). Nested factorized modules are put into their (new) outer module here;
    plain layers only where the base model's layer differs from the saved one."""
    tagged = [("modules", e) for e in manifest["modules"]] + [("plain", e) for e in manifest.get("plain", [])]
    built, out = {}, []
    for kind, entry in _nesting_order(tagged, directory):
        where = f"{str(directory)!r}, module {entry['name']!r}"
        names = _entry_names(entry)
        located = [_locate(model, built, name, where) for name in names]
        if kind == "modules":
            module = _built_factorized(entry, where)
            for name, (_, _, base_module) in zip(names, located):
                _check_fits(base_module, module, f"{where} at {name!r}", resized=entry.get("resized", False))
            if entry.get("resized"):
                module.resized = True
        else:
            module = _plain_replacement(entry, [base for _, _, base in located], where)
            if module is None:
                continue
        _restore_buffers(module, entry.get("buffers", []), located[0][2], where)
        top = []
        for name, (container, relative, _) in zip(names, located):
            if container is None:
                top.append(name)
            else:
                _set_module(container, relative, module)
            built[name] = module
        if top:
            out.append((top, module))
    return out


def _folded_batchnorms(model, manifest, directory) -> list:
    """``[(names, nn.Identity())]`` for the saved Identity layers where the base model has a BatchNorm (folded into
    the conv before it by ``fold_bn=True``); an Identity where the base model has another kind of module is
    refused. ``model`` is not changed."""
    out = []
    for name in manifest.get("identities", []):
        where = f"{str(directory)!r}, module {name!r}"
        base = _locate(model, {}, name, where)[2]
        if type(base) is nn.Identity:
            continue
        if not isinstance(base, nn.modules.batchnorm._BatchNorm):
            raise CompressedModelError(f"{where}: the saved model has an Identity here (a BatchNorm folded by "
                                       f"fold_bn=True), the base model a {type(base).__name__}: is it the "
                                       f"architecture the folder was saved from?")
        out.append(([name], nn.Identity()))
    return out


def _plain_view(base, family, entry, where):
    """``base`` as a plain layer of ``family`` (a registered kind such as transformers' ``Conv1D`` through the
    plain layer computing the same: ``compress_sequential`` converts those); another module is refused."""
    view = base if isinstance(base, family) else standard_layer(base) if kind_of(base) is not None else None
    if view is None or _plain_family(view) is not family:
        raise CompressedModelError(f"{where}: the base model has a {type(base).__name__} here, the saved model a "
                                   f"{entry['class']} (a {family.__name__}): is it the architecture the folder "
                                   f"was saved from?")
    return view


def _plain_replacement(entry, bases, where):
    """The layer to put at a plain entry's names (``bases``: the modules there now), or None where the base model
    already has the saved layer (same class, configuration and buffers). A rebuilt layer has the saved
    configuration, which may have fewer units than the base model's (hidden-unit pruning; it is then marked
    ``resized``), never more."""
    family = PLAIN_CLASSES[entry["family"]]
    config = _from_json(entry["config"], where)
    specs = entry.get("buffers", [])
    views = [_plain_view(base, family, entry, where) for base in bases]
    same_class = all(type(base).__name__ == entry["class"] for base in bases)
    if same_class and all(_plain_config(view) == config and all(s["name"] in base._buffers for s in specs)
                          for base, view in zip(bases, views)):
        return None
    for view in views:
        _check_resized(_plain_config(view), config, where)
    cls = type(bases[0]) if same_class else PLAIN_CLASSES.get(entry["class"])
    if cls is None:
        raise CompressedModelError(f"{where}: class {entry['class']!r} is neither the base model's class here "
                                   f"({type(bases[0]).__name__}) nor one of {', '.join(PLAIN_CLASSES)}")
    try:
        module = cls(**config)
    except (TypeError, ValueError) as err:
        raise CompressedModelError(f"{where}: cannot build {entry['class']} from its config: {err}") from None
    if _plain_family(module) is not family or _plain_config(module) != config:
        raise CompressedModelError(f"{where}: {entry['class']}(**config) does not build a {family.__name__} of "
                                   f"the saved configuration {config!r}")
    if any(config.get(k) != _plain_config(views[0]).get(k) for k in UNIT_KEYS):
        module.resized = True   # fewer units than the base model's layer (it may be factorized later)
    return module


def _fewer_units(saved, base) -> bool:
    """Whether a saved unit count (``in_features``, ``out_channels``, ...) is a pruned one of the base model's:
    an int in ``[1, base]``."""
    return type(saved) is int and 0 < saved <= (base or 0)


def _depthwise_config(config, at_least=1) -> bool:
    """A depthwise conv's configuration (one filter per channel: its groups are its units), with at least
    ``at_least`` groups (a depthwise conv pruned to one channel has one)."""
    groups = config.get("groups", 1)
    return groups >= at_least and groups == config.get("in_channels") == config.get("out_channels")


def _check_resized(have, want, where):
    """A saved plain layer may differ from the base model's only in having fewer units (and in its bias, eps,
    momentum): pruning never adds units, and a layer of another shape is another architecture."""
    if set(have) != set(want):
        raise CompressedModelError(f"{where}: the saved configuration has the keys {sorted(want)}, a layer of "
                                   f"this kind has {sorted(have)}")
    units = UNIT_KEYS + (("groups",) if _depthwise_config(have, at_least=2) and _depthwise_config(want) else ())
    diff = [k for k in want if k not in FREE_KEYS and (
        not _fewer_units(want[k], have[k]) if k in units else _norm(want[k]) != _norm(have[k]))]
    if diff:
        raise CompressedModelError(f"{where}: the base model's layer has " + ", ".join(
            f"{k}={have[k]!r}" for k in diff) + " but the saved one has " + ", ".join(
            f"{k}={want[k]!r}" for k in diff) + ": a different architecture or size (a pruned layer only has "
                                                "fewer units)")


def _restore_buffers(module, specs, base_module, where):
    """Register on ``module`` the listed buffers its class does not build (carried over from the layer it
    replaced): persistent ones as placeholders that the strict weight load fills; non-persistent ones, which
    no state dict holds, taken from the base model's module at that name, which must have them."""
    for spec in specs:
        name, shape, dtype = spec["name"], tuple(spec["shape"]), _dtype_named(spec["dtype"])
        if module._buffers.get(name) is not None:
            continue
        if spec["persistent"]:
            value = torch.empty(shape, dtype=dtype)
        else:
            value = getattr(base_module, "_buffers", {}).get(name)
            if value is None or tuple(value.shape) != shape or value.dtype != dtype:
                raise CompressedModelError(
                    f"{where}: the non-persistent buffer {name!r} ({list(shape)}, {spec['dtype']}) is not in the "
                    f"weights (a state dict leaves it out) and the base model's {type(base_module).__name__} "
                    f"here has no such buffer to take it from")
        try:
            module.register_buffer(name, value, persistent=spec["persistent"])
        except (KeyError, AttributeError, TypeError) as err:
            raise CompressedModelError(f"{where}: cannot register the buffer {name!r}: {err}") from None


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
    replacements = _replacements(model, manifest, directory) + _folded_batchnorms(model, manifest, directory)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = _read_weights(directory, manifest, _expected_state(model, replacements), device)
    for names, module in replacements:
        for name in names:   # the base model's hooks are part of its architecture: compress carried them too
            base = model.get_submodule(name)
            _set_module(model, name, carry_hooks(base, module, consumed=legacy_reparametrization(base)))
    model.load_state_dict(state, strict=True, assign=True)
    _retie(model, manifest.get("tied", {}))
    keep_off_fused_fast_path(model)   # as compress did
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
