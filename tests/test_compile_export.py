"""Every tensor-method layer class under torch.export and torch.compile, and every registered class in ONNX.

Each class once: ``torch.export.export(module, (x,)).module()(x) == module(x)`` and
``torch.compile(module, backend="aot_eager")(x) == module(x)``; one Inductor case (it
compiles C++, so it is skipped without a C++ compiler). ONNX: each class the registry
builds, exported by the dynamo exporter with a dynamic batch dimension (as ``decomp
compress -o x.onnx`` does) and run in onnxruntime at batch 1 and 3 against torch.
"""
import shutil

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import decompose
from _helpers import registered_requests

CASES = {
    "TuckerConv": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), dict(method="tucker", rank=(3, 2)),
                   (2, 6, 7, 7)),
    "CPConv": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), dict(method="cp", rank=3, n_iter_max=10),
               (2, 6, 7, 7)),
    "CPConv-fused": (lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="circular"),
                     dict(method="cp", rank=3, n_iter_max=10, implementation="fused"), (2, 6, 7, 7)),
    "TTLinear": (lambda: nn.Linear(24, 12), dict(method="tt", rank=3), (5, 24)),
    "TTLinear-ltr": (lambda: nn.Linear(24, 12), dict(method="tt", rank=3), (5, 24)),
    "TTLinear-pairs": (lambda: nn.Linear(64, 48), dict(method="tt", rank=3, d=3), (5, 64)),
    "BlockTermConv": (lambda: nn.Conv1d(6, 8, 3, padding=1), dict(method="btd", rank=2, n_blocks=2, n_iter_max=3,
                                                                  n_init=1), (2, 6, 9)),
    "TransposedChain": (lambda: nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1), dict(method="svd", rank=3),
                        (2, 6, 5, 5)),
    "TransposedChain-patch": (lambda: nn.ConvTranspose2d(6, 8, 2, stride=2), dict(method="tucker", rank=(3, 2)),
                              (2, 6, 5, 5)),
}


def build(name):
    torch.manual_seed(0)
    make, spec, shape = CASES[name]
    module = decompose(make(), **spec).eval()
    if name.startswith("TTLinear-"):
        module.implementation = {"ltr": "ltr", "pairs": "rtl-pairs"}[name.split("-")[1]]
    return module, torch.randn(shape)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export(name):
    module, x = build(name)
    exported = torch.export.export(module, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_trace(name):
    module, x = build(name)
    traced = torch.jit.trace(module, (x,), check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_aot_eager(name):
    torch._dynamo.reset()
    module, x = build(name)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile's Inductor backend needs a C++ compiler on CPU")
def test_compile_inductor_tucker():
    torch._dynamo.reset()
    module, x = build("TuckerConv")
    compiled = torch.compile(module, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- ONNX

ONNX_LAYERS = {"linear": (lambda: nn.Linear(24, 16), (5, 24)), 1: (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
               2: (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
               3: (lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 5, 5, 5)),
               "transposed": (lambda: nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1), (2, 6, 5, 5)),
               "transposed-patch": (lambda: nn.ConvTranspose2d(6, 8, 2, stride=2), (2, 6, 5, 5))}
ONNX_VARIANTS = [("svd", 2, dict(rank=2, scheme="spatial")), ("cp", 2, dict(rank=3, implementation="fused")),
                 ("svd", "transposed", dict(rank=3)), ("tucker", "transposed-patch", dict(rank=(3, 2))),
                 ("pq", "linear", dict(block_size=4, n_centroids=8, forward="lut", random_state=0))]
ONNX_UNSUPPORTED = {"ldr": "torch's ONNX exporter has no complex-valued unsqueeze (LDR's complex FFT)"}


def onnx_cases(all_kinds=False):
    """Each registered method on Linear and on its first conv kind (every kind with ``all_kinds``), and the
    variants: every factorized class the registry builds, without building any at collection time."""
    cases, seen = [], set()
    for method, kind, spec in registered_requests() + ONNX_VARIANTS:
        family = (method, kind if all_kinds or isinstance(kind, str) else "conv", tuple(sorted(spec.items())))
        if family in seen:
            continue
        seen.add(family)
        marks = [pytest.mark.xfail(reason=ONNX_UNSUPPORTED[method], strict=True)] if method in ONNX_UNSUPPORTED else []
        label = "-".join([method, str(kind)] + [f"{k}={v}" for k, v in spec.items()])
        cases.append(pytest.param(method, kind, spec, id=label, marks=marks))
    return cases


def check_onnx_case(method, kind, request, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from decomp_toolkit.analysis.io import export

    torch.manual_seed(0)
    make, shape = ONNX_LAYERS[kind]
    module, x = decompose(make(), method, **request).eval(), torch.randn(shape)
    export.save_onnx(module, tmp_path / "m.onnx", (x,))
    with torch.no_grad():
        scale = float(module(x).abs().max())
    diffs = export.check_onnx(tmp_path / "m.onnx", module, (x,), batches=(1, 3))
    assert max(diffs.values()) <= 1e-5 * max(scale, 1.0), diffs


@pytest.mark.parametrize("method, kind, spec", onnx_cases())
def test_onnx_every_class_matches_torch_in_onnxruntime(method, kind, spec, tmp_path):
    check_onnx_case(method, kind, spec, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method, kind, spec", onnx_cases(all_kinds=True))
def test_onnx_every_method_and_kind(method, kind, spec, tmp_path):
    check_onnx_case(method, kind, spec, tmp_path)
