"""The contract of every registered method on every layer kind it supports, driven by the registry.

For each ``(method, kind)`` of :func:`layers.available_methods` (a method registered later is
tested without editing this file), on layers with non-default options (stride, padding
modes, dilation, groups, no bias), in float64:

* forward == ``to_dense()`` forward == the reference op with the reconstructed weight;
* ``config`` + ``state_dict`` rebuild the same function (float32 and float64);
* ``num_params`` / ``flops`` equal independent counts (tensor sizes, hooks on the stages);
* ``module.fit`` names the method, its measured weight error is right and a certified bound holds;
* dtype and device are kept (float32, bfloat16); the input layer is never modified;
* a kind the method refuses raises UnsupportedLayerError, a wrong request ValueError/TypeError.
"""
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import UnsupportedLayerError, available_methods, decompose
from _helpers import check_contract, check_dtype_kept, small_request

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

LAYERS = {  # kind -> [(label, factory(dtype), input shape)]
    "linear": [("bias", lambda dt: nn.Linear(20, 12, dtype=dt), (2, 3, 20)),
               ("nobias", lambda dt: nn.Linear(24, 10, bias=False, dtype=dt), (4, 24))],
    1: [("stride", lambda dt: nn.Conv1d(6, 10, 3, stride=2, padding=1, dtype=dt), (2, 6, 9))],
    2: [("reflect", lambda dt: nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect", dtype=dt), (2, 6, 7, 6)),
        ("groups", lambda dt: nn.Conv2d(6, 8, (3, 2), stride=(2, 1), padding=(1, 2), dilation=2, groups=2,
                                        padding_mode="replicate", bias=False, dtype=dt), (2, 6, 8, 7))],
    3: [("circular", lambda dt: nn.Conv3d(4, 6, 2, padding=1, padding_mode="circular", dtype=dt), (1, 4, 4, 4, 3))],
}


def _cases():
    for name, entry in sorted(available_methods().items()):
        for kind in entry.builders:
            if kind in entry.unsupported:
                continue
            for label, make, shape in LAYERS[kind]:
                yield pytest.param(name, make, shape, id=f"{name}-{kind}-{label}")


def _refused():
    for name, entry in sorted(available_methods().items()):
        for kind in entry.unsupported:
            label, make, _ = LAYERS[kind][0]
            yield pytest.param(name, make, id=f"{name}-{kind}")


def _builder(method):
    entry = available_methods()[method]
    request = small_request(entry)
    seeded = {"random_state": 0} if "random_state" in entry.all_options() else {}

    def build(layer):
        return decompose(layer, method, **request, **seeded)
    return build


CASES, REFUSED = list(_cases()), list(_refused())


@pytest.mark.parametrize("method, make, shape", CASES)
def test_contract(method, make, shape):
    torch.manual_seed(0)
    layer = make(torch.float64)
    check_contract(layer, _builder(method), torch.randn(shape, dtype=torch.float64), method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, make, shape", CASES)
def test_dtype_and_device_kept(method, make, shape, dtype):
    torch.manual_seed(0)
    check_dtype_kept(make(torch.float64), _builder(method), torch.randn(shape, dtype=torch.float64), dtype)


@pytest.mark.parametrize("method, make", REFUSED)
def test_refused_kinds_raise_unsupported_layer_error(method, make):
    layer = make(torch.float64)
    with pytest.raises(UnsupportedLayerError, match=rf"method={method!r}"):
        decompose(layer, method, **small_request(available_methods()[method]))


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_wrong_requests_raise_before_any_work(method):
    entry = available_methods()[method]
    kind = next(k for k in entry.builders if k not in entry.unsupported)
    layer = LAYERS[kind][0][1](torch.float64)
    with pytest.raises(TypeError, match="unknown option"):
        decompose(layer, method, **small_request(entry), no_such_option=1)
    refused_kinds = [k for k in ("rank", "energy", "tol", "ratio") if k not in entry.spec_kinds]
    for kind in refused_kinds:
        with pytest.raises(ValueError):
            decompose(layer, method, **{kind: 0.5 if kind != "rank" else 2})
    if entry.spec_kinds and entry.spec_required:
        with pytest.raises(ValueError, match="pass exactly one of"):
            decompose(layer, method)


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_option_is_documented(method):
    entry = available_methods()[method]
    docs = entry.option_docs()
    missing = [o for o in entry.all_options() if o not in docs]
    assert not missing, f"method {method!r}: options without a meaning in an Options: block: {missing}"
    assert f"`{method}`" in decompose.__doc__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, make, shape", CASES)
def test_device_kept_on_cuda(method, make, shape):
    torch.manual_seed(0)
    layer = make(torch.float64).cuda()
    module = _builder(method)(layer)
    for t in list(module.parameters()) + list(module.buffers()) + list(module.to_dense().parameters()):
        assert t.device == layer.weight.device
    x = torch.randn(shape, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.to_dense()(x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("method, make, shape", CASES)
def test_the_layers_train_or_eval_mode_is_kept(method, make, shape, training):
    torch.manual_seed(0)
    module = _builder(method)(make(torch.float64).train(training))
    assert {m.training for m in module.modules()} == {training}


@pytest.mark.parametrize("method", sorted(m for m, e in available_methods().items() if "ratio" in e.spec_kinds))
def test_a_ratio_below_the_smallest_factorization_is_an_unsupported_layer_error(method):
    entry = available_methods()[method]
    kind = next(k for k in entry.builders if k not in entry.unsupported)
    with pytest.raises(UnsupportedLayerError, match=rf"method={method!r}"):
        decompose(LAYERS[kind][0][1](torch.float64), method, ratio=1e-9)
