"""Load models for the CLI (zoo names, ``torch.export`` archives, TorchScript, pickles) and save them back.

``compress`` walks ``nn.Linear`` / ``nn.ConvNd`` modules. A ``torch.export`` program (and a
TorchScript module, converted to one) has none: its layers are ``aten.linear`` /
``aten.conv*`` / ``aten.conv_transpose*`` calls on parameter attributes. :func:`lift_layers` turns each such call
back into a real ``nn.Linear`` / ``nn.ConvNd`` / ``nn.ConvTransposeNd`` submodule (sharing the same parameter
tensors, named after them: ``features.0.weight`` -> module ``features.0``), so that the
program's ``.module()`` can be compressed like any eager model and exported again with
the same example inputs.

Formats (detected from the file's contents, not its name):

* ``export``: ``torch.export.save`` archives (``.pt2``): loaded with ``torch.export.load``.
* ``torchscript``: ``torch.jit.save`` archives: converted with torch's TorchScript ->
  export converter (needs example inputs: ``--input-shape``).
  Models the converter cannot handle are refused with a message.
* ``pickle``: a whole pickled ``nn.Module`` (``torch.save(model)``). Unpickling runs
  arbitrary code, so it is loaded only with ``trust_pickle=True``; without it the file is
  opened with ``weights_only=True`` and refused with a message.
* ``dir``: a folder written by :func:`layers.save_compressed` (no pickle), its base model
  rebuilt from the folder (zoo entry or transformers config).

Writing files (``.pt2`` with dynamic dimensions, ONNX, folders) is :mod:`.export`.
"""
from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from decomp_toolkit.layers.transposed import TRANSPOSED_TYPES

from ..zoo import ZOO, ZooEntry

FORMATS = ("export", "torchscript", "pickle")
EXTENSIONS = {".pt2": "export", ".onnx": "onnx", ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript",
              ".pt": "pickle", ".pth": "pickle", ".pkl": "pickle", ".pickle": "pickle"}
DTYPES = {"float32": torch.float32, "float": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32}


class ModelLoadError(ValueError):
    """A model spec or file that cannot be loaded or saved; the message says why and what to do."""


@dataclass
class LoadedModel:
    """An eager, compressible model with where it came from."""

    model: nn.Module
    format: str                      # "zoo" or one of FORMATS
    source: str
    example_input: tuple | None = None
    entry: ZooEntry | None = None
    lifted: list = field(default_factory=list)   # layer names lifted from a graph
    static_shapes: bool = False   # a graph traced at fixed shapes (cannot be re-exported with a dynamic batch)


# --------------------------------------------------------------------------- example inputs

def parse_input_shape(text: str):
    """``"1,3,224,224"`` / ``"1x3x224x224"`` with an optional ``":int64"`` -> ``(shape, dtype)``."""
    shape_text, _, dtype_text = text.partition(":")
    pieces = [v.strip() for v in re.split(r"[,x]", shape_text)]
    if not all(v.isdigit() for v in pieces):
        raise ModelLoadError(f"--input-shape {text!r}: write the dimensions as 1,3,224,224 "
                             f"(optionally :int64)")
    shape = tuple(int(v) for v in pieces)
    if any(v <= 0 for v in shape):
        raise ModelLoadError(f"--input-shape {text!r}: dimensions must be positive integers, e.g. 1,3,224,224")
    dtype = DTYPES.get(dtype_text or "float32")
    if dtype is None:
        raise ModelLoadError(f"--input-shape {text!r}: unknown dtype {dtype_text!r}; one of {', '.join(DTYPES)}")
    return shape, dtype


def make_example(shapes) -> tuple:
    """Deterministic example tensors for ``[(shape, dtype), ...]`` (normal floats, zero integers)."""
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*s, generator=gen).to(d) if d.is_floating_point else torch.zeros(s, dtype=d)
                 for s, d in shapes)


# --------------------------------------------------------------------------- format detection

def detect_format(path) -> str:
    """``"export"``, ``"torchscript"`` or ``"pickle"`` from the file's contents."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise ModelLoadError(f"cannot read {str(path)!r}: {err.strerror or err}") from None
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise ModelLoadError(f"cannot read {str(path)!r}: {err}") from None
        tails = {n.split("/", 1)[-1] for n in names}
        if any(t in ("archive_format", "models/model.json") or t.endswith("serialized_exported_program.json")
               for t in tails):
            return "export"
        if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
            return "torchscript"
        if "data.pkl" in tails:
            return "pickle"
        raise ModelLoadError(f"{str(path)!r} is a zip archive but not a torch.export, TorchScript or torch.save file")
    if head[:1] == b"\x80":
        return "pickle"
    raise ModelLoadError(f"{str(path)!r} is not a torch model file (torch.export .pt2, TorchScript or torch.save)")


# --------------------------------------------------------------------------- graph -> modules

def _aten():
    ops = torch.ops.aten
    convs = {ops.conv1d.default: 1, ops.conv2d.default: 2, ops.conv3d.default: 3}
    for n, name in ((1, "conv1d"), (2, "conv2d"), (3, "conv3d")):
        overload = getattr(getattr(ops, name), "padding", None)
        if overload is not None:
            convs[overload] = n
    for n in (1, 2, 3):   # conv_transposeNd(input, weight, bias, stride, padding, output_padding, groups, dilation)
        packet = getattr(ops, f"conv_transpose{n}d")
        for overload in packet.overloads():   # 1-D: "default", 2-D / 3-D: "input"
            convs[getattr(packet, overload)] = -n
    return ops.linear.default, convs, ops.convolution.default


def _conv_transpose_call(args, dims):
    """``(kind, dims, x, w, b, kwargs)`` of an ``aten.conv_transposeNd`` call (defaults per torch's signature)."""
    defaults = [1, 0, 0, 1, 1]   # stride, padding, output_padding, groups, dilation
    stride, padding, output_padding, groups, dilation = [v if v is not None else d
                                                         for v, d in zip(args[3:8], defaults)]
    kw = dict(stride=_tuple(stride, dims), padding=_tuple(padding, dims), output_padding=_tuple(output_padding, dims),
              groups=int(groups), dilation=_tuple(dilation, dims))
    return "transposed", dims, args[0], args[1], args[2], kw


def _tuple(value, n):
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return (int(value),) * n


def _layer_from_call(node, linear_op, conv_ops, convolution_op):
    """``(kind, dims, weight_node, bias_node, conv_kwargs)`` for a liftable call, else None."""
    args = list(node.args) + [None] * 9
    if node.target is linear_op:
        return "linear", None, args[0], args[1], args[2], {}
    if node.target in conv_ops and conv_ops[node.target] < 0:
        return _conv_transpose_call(args, -conv_ops[node.target])
    if node.target in conv_ops:
        dims = conv_ops[node.target]
        stride, padding = args[3] if args[3] is not None else 1, args[4] if args[4] is not None else 0
        dilation, groups = args[5] if args[5] is not None else 1, args[6] if args[6] is not None else 1
        kw = dict(stride=_tuple(stride, dims), dilation=_tuple(dilation, dims), groups=int(groups),
                  padding=padding if isinstance(padding, str) else _tuple(padding, dims))
        return "conv", dims, args[0], args[1], args[2], kw
    if node.target is convolution_op:
        dims = len(args[3])
        kw = dict(stride=_tuple(args[3], dims), padding=_tuple(args[4], dims), dilation=_tuple(args[5], dims),
                  groups=int(args[8]))
        if args[6]:   # transposed
            return "transposed", dims, args[0], args[1], args[2], dict(kw, output_padding=_tuple(args[7], dims))
        return "conv", dims, args[0], args[1], args[2], kw
    return None


def _attr(gm, target):
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return owner, attr, getattr(owner, attr)


def lift_layers(gm: torch.fx.GraphModule) -> list:
    """Replace ``aten.linear`` / ``aten.conv*`` / ``aten.conv_transpose*`` calls on parameter attributes by
    ``nn.Linear`` / ``nn.ConvNd`` / ``nn.ConvTransposeNd`` submodules (in place); returns the lifted module names.

    A call is lifted only when its weight (and bias) are ``get_attr`` nodes used by no
    other kind of node, so that replacing the module later cannot break another use.
    The module takes the name of the weight's owner (``a.b.weight`` -> ``a.b``) when that
    owner holds nothing else; otherwise a fresh top-level name.
    """
    linear_op, conv_ops, convolution_op = _aten()
    graph, lifted, made = gm.graph, [], {}
    layer_calls = [n for n in graph.nodes if n.op == "call_function" and
                   _layer_from_call(n, linear_op, conv_ops, convolution_op) is not None]
    call_set = set(layer_calls)
    for node in layer_calls:
        kind, dims, x, w, b, conv_kw = _layer_from_call(node, linear_op, conv_ops, convolution_op)
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            continue
        attr_nodes = [w] + ([b] if b is not None else [])
        if any(user not in call_set for a in attr_nodes for user in a.users):
            continue
        key = (w.target, b.target if b is not None else None, kind, tuple(sorted(conv_kw.items())))
        if key not in made:
            weight = _attr(gm, w.target)[2]
            bias = _attr(gm, b.target)[2] if b is not None else None
            if kind == "linear":
                if weight.dim() != 2:
                    continue
                module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            elif kind == "transposed":   # weight (C_in, C_out / groups, *k)
                in_ch, out_per_group, *kernel = weight.shape
                cls = TRANSPOSED_TYPES[dims]
                module = cls(in_ch, out_per_group * conv_kw["groups"], tuple(kernel), bias=bias is not None,
                             device="meta", **conv_kw)
            else:
                out_ch, in_per_group, *kernel = weight.shape
                cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
                module = cls(in_per_group * conv_kw["groups"], out_ch, tuple(kernel), bias=bias is not None,
                             device="meta", **conv_kw)
            module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                module.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            made[key] = _register(gm, w.target, b.target if b is not None else None, module)
        name = made[key]
        with graph.inserting_before(node):
            call = graph.call_module(name, (x,))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if name not in lifted:
            lifted.append(name)
    for attr_node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(attr_node)
    graph.lint()
    gm.recompile()
    return lifted


def _register(gm, weight_target, bias_target, module) -> str:
    owner_name, _, weight_attr = weight_target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else None
    expected = {weight_attr} | ({bias_target.rpartition(".")[2]} if bias_target else set())
    same_owner = bias_target is None or bias_target.rpartition(".")[0] == owner_name
    if (owner is not None and type(owner) is nn.Module and same_owner and not list(owner.children())
            and set(dict(owner.named_parameters(recurse=False))) | set(dict(owner.named_buffers(recurse=False)))
            == expected):
        parent_name, _, child = owner_name.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, child, module)
        return owner_name
    base = weight_target.replace(".", "_") + "_layer"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}{i}", i + 1
    gm.add_submodule(name, module)
    return name


# --------------------------------------------------------------------------- loading

def load(spec: str, *, trust_pickle: bool = False, input_shapes=None) -> LoadedModel:
    """A zoo name or a model file -> :class:`LoadedModel` (raises ModelLoadError / MissingZooPackage)."""
    shapes = [parse_input_shape(s) for s in (input_shapes or [])]
    if spec in ZOO:
        entry = ZOO[spec]
        return LoadedModel(entry.load_model(), "zoo", spec, tuple(entry.example_input()), entry)
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(f"unknown model {spec!r}: not a zoo name ({', '.join(ZOO)}) and no such file")
    if path.is_dir():
        return _load_folder(path, make_example(shapes) if shapes else None)
    fmt = detect_format(path)
    example = make_example(shapes) if shapes else None
    if fmt == "export":
        return _load_export(path, example)
    if fmt == "torchscript":
        return _load_torchscript(path, example)
    return _load_pickle(path, example, trust_pickle)


def _load_folder(path, example):
    """A folder written by ``layers.save_compressed`` (its base model rebuilt: zoo entry, transformers config)."""
    from decomp_toolkit.layers import load_compressed
    from decomp_toolkit.layers.serialize import MANIFEST, read_manifest

    if not (path / MANIFEST).exists():
        raise ModelLoadError(f"{str(path)!r} is a directory without {MANIFEST}; pass a model file (.pt2, "
                             f"TorchScript or torch.save), a save_compressed folder or a zoo name ({', '.join(ZOO)})")
    entry = ZOO.get(read_manifest(path)["base"].get("zoo"))
    if example is None and entry is not None:
        example = tuple(entry.example_input())
    return LoadedModel(load_compressed(path), "dir", str(path), example, entry)


def _load_export(path, example):
    try:
        program = torch.export.load(str(path))
    except Exception as err:  # corrupt / incompatible archive
        raise ModelLoadError(f"cannot load the torch.export archive {str(path)!r}: {err}") from None
    if example is None:
        stored = getattr(program, "example_inputs", None)
        if stored is not None:
            args, kwargs = stored
            if kwargs:
                raise ModelLoadError(f"{str(path)!r} was exported with keyword inputs; pass --input-shape for each "
                                     f"positional input instead")
            example = tuple(args)
    if example is None:
        raise ModelLoadError(f"{str(path)!r} stores no example inputs; pass --input-shape (e.g. 1,3,224,224)")
    gm = program.module()
    lifted = lift_layers(gm)
    return LoadedModel(gm, "export", str(path), example, lifted=lifted, static_shapes=not program.range_constraints)


def _load_torchscript(path, example):
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ModelLoadError(f"cannot load the TorchScript file {str(path)!r}: {err}") from None
    if example is None:
        raise ModelLoadError(f"TorchScript files carry no example input; pass --input-shape "
                             f"(e.g. --input-shape 1,3,224,224) to load {str(path)!r}")
    try:
        from torch._export.converter import TS2EPConverter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(scripted.eval(), example).convert()
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot compress the TorchScript model {str(path)!r}: torch's TorchScript->export "
                             f"converter failed ({first[:200]}); export the eager model with torch.export "
                             f"(.pt2) instead") from None
    gm = program.module()
    lifted = lift_layers(gm)
    return LoadedModel(gm, "torchscript", str(path), example, lifted=lifted,
                       static_shapes=not program.range_constraints)


def _load_pickle(path, example, trust_pickle):
    if not trust_pickle:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ModelLoadError(f"{str(path)!r} is a pickled model: unpickling can run arbitrary code; pass "
                                 f"--trust-pickle if you trust the file") from None
        except Exception as err:
            raise ModelLoadError(f"cannot read {str(path)!r}: {err}") from None
        raise ModelLoadError(f"{str(path)!r} holds a {type(obj).__name__} (weights only, no architecture); pass a "
                             f"whole pickled model, a torch.export .pt2, a TorchScript file or a zoo name")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:
        raise ModelLoadError(f"cannot unpickle {str(path)!r}: {type(err).__name__}: {err}") from None
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{str(path)!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj.eval(), "pickle", str(path), example)


# --------------------------------------------------------------------------- reading back

def load_saved(path, fmt: str, trust_pickle: bool = True):
    """A callable module loaded back from a file written by :func:`.export.save` (for checks)."""
    if fmt == "dir":
        from decomp_toolkit.layers import load_compressed

        return load_compressed(path)
    if fmt == "export":
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    return torch.load(str(path), map_location="cpu", weights_only=not trust_pickle)


__all__ = ["load", "load_saved", "lift_layers", "detect_format", "parse_input_shape",
           "make_example", "LoadedModel", "ModelLoadError", "FORMATS"]
