"""``decomp info FILE``: what a compressed model file holds (its inputs, its factorized modules, its report)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .export import ONNX_REPORT_KEY, REPORT_FILE
from .model_io import ModelLoadError, detect_format


def _report_text(saved) -> str:
    from decomp_toolkit.layers.serialize import report_from_dict

    if not saved:
        return "no compression report stored"
    return str(report_from_dict(json.loads(saved) if isinstance(saved, str) else saved))


def _shape(dims) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _describe_folder(path: Path) -> list:
    from decomp_toolkit.layers.serialize import read_manifest

    manifest = read_manifest(path)
    (kind, name), = manifest["base"].items()
    classes = Counter(m["class"] for m in manifest["modules"])
    shared = sum(1 for m in manifest["modules"] if m.get("aliases"))
    lines = [f"{path}: save_compressed folder (safetensors weights + {len(manifest['modules'])} factorized modules "
             f"in compressed.json; no pickle)",
             f"base model: {kind} {name!r}" + ("" if kind != "module" else " (load with model=<an instance>)"),
             f"parameters: {manifest.get('params', 0):,}",
             "factorized modules: " + (", ".join(f"{c} x{n}" for c, n in sorted(classes.items())) or "none")]
    if shared or manifest.get("tied"):
        lines.append(f"shared modules: {shared}; tied tensors: {len(manifest.get('tied', {}))}")
    return lines + [_report_text(manifest.get("report"))]


def _describe_export(path: Path) -> list:
    extra = {REPORT_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    user_inputs = set(program.graph_signature.user_inputs)
    inputs = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    lines = [f"{path}: torch.export program ({sum(v.numel() for v in program.state_dict.values()):,} "
             f"parameters and buffers)"]
    lines += [f"input {i}: {_shape(v.shape)} {str(v.dtype).replace('torch.', '')}" for i, v in enumerate(inputs)]
    ranges = {str(k): f"[{v.lower}, {str(v.upper).replace('int_oo', 'inf')}]"
              for k, v in program.range_constraints.items()}
    if ranges:
        lines.append("dynamic dims: " + ", ".join(f"{k} in {v}" for k, v in ranges.items()))
    return lines + [_report_text(extra[REPORT_FILE])]


def _describe_onnx(path: Path) -> list:
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("reading ONNX needs onnx: pip install onnx") from None
    proto = onnx.load(str(path), load_external_data=False)
    lines = [f"{path}: ONNX model (opset {', '.join(str(o.version) for o in proto.opset_import)})"]
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        lines.append(f"input {value.name}: {_shape(dims)} {dtype}")
    props = {p.key: p.value for p in proto.metadata_props}
    return lines + [_report_text(props.get(ONNX_REPORT_KEY))]


def _describe_torchscript(path: Path) -> list:
    extra = {REPORT_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return [f"{path}: TorchScript module (static shapes)", _report_text(extra[REPORT_FILE])]


def describe(path) -> str:
    """A few lines on what ``path`` holds, then its compression report when one was stored."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{str(path)!r}: no such file or folder")
    if path.is_dir():
        return "\n".join(_describe_folder(path))
    if path.suffix.lower() == ".onnx":
        return "\n".join(_describe_onnx(path))
    fmt = detect_format(path)
    if fmt == "export":
        return "\n".join(_describe_export(path))
    if fmt == "torchscript":
        return "\n".join(_describe_torchscript(path))
    return f"{path}: a pickle (torch.save); not opened: unpickling can run arbitrary code"


__all__ = ["describe"]
