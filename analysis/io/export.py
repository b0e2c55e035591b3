"""Write a (compressed) model for shipping, and check what was written against the model in memory.

Formats, chosen by the output's extension (:func:`format_for_output`):

* ``export`` (``.pt2``): ``torch.export`` with a DYNAMIC batch dimension on every input and
  a dynamic sequence dimension on integer (token) inputs of rank >= 2 (``static=True``
  keeps the example's shapes). torch.export specializes dimensions of size 1, so a batch-1
  example is repeated to batch 2 for tracing. The report travels inside the archive
  (``extra_files``: ``decomp_report.json``).
* ``onnx`` (``.onnx``): the dynamo ONNX exporter with the same dynamic dimensions; the report
  is stored as the ``decomp_report`` metadata property. :func:`check_onnx` runs the file in
  onnxruntime against torch.
* ``dir`` (a folder, ``--format dir``): :func:`layers.save_compressed` (safetensors + manifest).
* ``torchscript`` (``.ts``): ``torch.jit.trace`` (static shapes).
* ``pickle``: ``torch.save(model)``, only when asked for by name (it pickles the toolkit's
  classes: unsafe to load, and it breaks when a class moves).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch

from decomp_toolkit.layers.serialize import report_to_dict

from .model_io import EXTENSIONS, ModelLoadError

OUTPUT_FORMATS = ("export", "onnx", "dir", "torchscript", "pickle")
FORMAT_NAMES = {"pt2": "export", "export": "export", "onnx": "onnx", "dir": "dir", "folder": "dir",
                "ts": "torchscript", "torchscript": "torchscript", "pickle": "pickle"}
REPORT_FILE = "decomp_report.json"
ONNX_REPORT_KEY = "decomp_report"
ONNX_HINT = "pip install onnx onnxscript onnxruntime (or pip install 'decomp-toolkit[onnx]')"


def format_for_output(path, requested: str | None = None) -> str:
    """The output format: ``requested`` (``--format``) if it agrees with the name, else from the extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    by_name = EXTENSIONS.get(suffix)
    if requested is not None:
        fmt = FORMAT_NAMES.get(requested)
        if fmt is None:
            raise ModelLoadError(f"--format {requested!r}: one of {', '.join(sorted(FORMAT_NAMES))}")
        if fmt == "dir" and by_name is not None:
            raise ModelLoadError(f"--format dir writes a folder, but {str(path)!r} ends in {suffix}: give a folder name")
        if fmt != "dir" and by_name != fmt:
            wanted = [s for s, f in EXTENSIONS.items() if f == fmt]
            raise ModelLoadError(f"--format {requested} but {str(path)!r} ends in {suffix or 'no extension'}: "
                                 f"name it *{wanted[0]}")
        return fmt
    if by_name == "pickle":
        raise ModelLoadError(f"{str(path)!r} would be a pickle of the model's classes (unsafe to load, and it breaks "
                             f"when a class moves): write .pt2 (torch.export), .onnx, or a folder (--format dir); "
                             f"pass --format pickle to write a pickle anyway")
    if by_name is not None:
        return by_name
    if str(path).endswith("/") or path.is_dir():
        return "dir"
    raise ModelLoadError(f"cannot tell the output format from {str(path)!r}: end it with .pt2 (torch.export), "
                         f".onnx (ONNX) or .ts (TorchScript), or pass --format dir for a save_compressed folder")


# --------------------------------------------------------------------------- dynamic dimensions

def dynamic_dims(x: torch.Tensor) -> dict:
    """``{dim: Dim.DYNAMIC}``: the batch dim, and the sequence dim of an integer (token) input."""
    dims = {0: torch.export.Dim.DYNAMIC}
    if not x.is_floating_point() and x.dim() >= 2:
        dims[1] = torch.export.Dim.DYNAMIC
    return dims


def at_batch(example, batch: int) -> tuple:
    """The example inputs with batch size ``batch`` (rows repeated or cut)."""
    out = []
    for x in example:
        reps = -(-batch // x.shape[0])
        out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch])
    return tuple(out)


def tracing_inputs(example, static: bool = False):
    """``(inputs, dynamic_shapes)`` for torch.export / ONNX: batch >= 2 so that the batch stays symbolic."""
    example = tuple(example)
    if static:
        return example, None
    if any(not isinstance(x, torch.Tensor) or x.dim() == 0 for x in example):
        raise ModelLoadError("a dynamic batch dimension needs tensor inputs with a batch dim; pass --static-shapes")
    batch = max(2, max(x.shape[0] for x in example))
    inputs = at_batch(example, batch)
    return inputs, tuple(dynamic_dims(x) for x in inputs)


def export_program(model, example, static: bool = False):
    """``torch.export.export`` with dynamic batch (and token sequence) dims; a clear error when it cannot."""
    inputs, shapes = tracing_inputs(example, static)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(model, inputs, dynamic_shapes=shapes)
    except Exception as err:
        if static:
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelLoadError(f"cannot export with a dynamic batch dimension ({first[:300]}); pass --static-shapes "
                             f"to export at the example input's shapes") from None


# --------------------------------------------------------------------------- writing

def save(model, path, fmt: str, example_input=None, *, report=None, base=None, static: bool = False):
    """Write ``model`` to ``path`` as ``fmt`` (one of OUTPUT_FORMATS); ``report`` travels with the file."""
    model.eval()
    path = Path(path)
    if fmt not in OUTPUT_FORMATS:
        raise ModelLoadError(f"unknown format {fmt!r}; one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "dir":
        from decomp_toolkit.layers import save_compressed

        save_compressed(model, path, report=report, base=base)
        return
    if fmt == "pickle":
        torch.save(model, str(path))
        return
    if example_input is None:
        raise ModelLoadError(f"saving as {fmt} needs example inputs; pass --input-shape")
    meta = json.dumps(report_to_dict(report)) if report is not None else None
    if fmt == "export":
        program = export_program(model, example_input, static)
        torch.export.save(program, str(path), extra_files={REPORT_FILE: meta} if meta else None)
    elif fmt == "onnx":
        save_onnx(model, path, example_input, static, meta)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, tuple(example_input), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={REPORT_FILE: meta} if meta else {})


def save_onnx(model, path, example, static=False, meta=None):
    """The dynamo ONNX exporter, weights inside the file (external data only past 1.5 GB)."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ModelLoadError(f"writing ONNX needs {err.name}: {ONNX_HINT}") from None
    inputs, shapes = tracing_inputs(example, static)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5e9
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)   # "torchvision is not installed" and other notes of the exporter
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=shapes, external_data=large)
    finally:
        onnx_log.setLevel(level)
    if meta:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.helper.set_model_props(proto, {ONNX_REPORT_KEY: meta})
        onnx.save(proto, str(path))


# --------------------------------------------------------------------------- checking

def _first(output):
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "last_hidden_state", output)


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def check_export(path, model, example, batches=(1, 2, 7)) -> dict:
    """``{batch: max |saved - model|}``: the .pt2 file run at each batch size against ``model``."""
    program = torch.export.load(str(path)).module()
    out = {}
    with torch.no_grad():
        for batch in batches:
            inputs = at_batch(example, batch)
            out[batch] = _max_diff(_first(program(*inputs)), _first(model(*inputs)))
    return out


def check_onnx(path, model, example, batches=(1, 2, 7)) -> dict:
    """``{batch: max |onnxruntime - torch|}`` (first output) at each batch size."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(f"checking ONNX needs onnxruntime: {ONNX_HINT}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    out = {}
    with torch.no_grad():
        for batch in batches:
            inputs = at_batch(example, batch)
            got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
            out[batch] = _max_diff(got, _first(model(*inputs)))
    return out


__all__ = ["format_for_output", "save", "save_onnx", "export_program", "tracing_inputs", "dynamic_dims", "at_batch",
           "check_export", "check_onnx", "OUTPUT_FORMATS", "REPORT_FILE", "ONNX_REPORT_KEY"]
