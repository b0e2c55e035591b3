"""Every tensor-method layer class under torch.export and torch.compile.

Each class once: ``torch.export.export(module, (x,)).module()(x) == module(x)`` and
``torch.compile(module, backend="aot_eager")(x) == module(x)``; one Inductor case (it
compiles C++, so it is skipped without a C++ compiler).
"""
import shutil

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import decompose

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
