"""save_compressed / load_compressed: safetensors + JSON manifest, loaded back in a FRESH Python process.

Every round trip writes the folder and the reference outputs here, then one new interpreter
rebuilds each model (from ``model=`` built from the same architecture source, a zoo name or
a transformers config) and compares float32 outputs: the max abs difference must be 0.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import (CompressedModelError, available_methods, compress, decompose, load_compressed,
                                   load_report, save_compressed)
from _helpers import registered_requests

ROOT = Path(__file__).resolve().parents[1]

# The architectures, as source: the fresh process executes the same text to rebuild them.
ARCH = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2),
                                          nn.ReLU())
            self.head = nn.Linear(24 * 7 * 7, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.features(x), 1))

    class Holder(nn.Module):
        """One layer (Linear or ConvNd) wrapped, so that the factorized module sits at a dotted name."""
        def __init__(self, layer):
            super().__init__()
            self.block = nn.Sequential(layer)

        def forward(self, x):
            return self.block(x)

    class SharedAndTied(nn.Module):
        """One Linear module reachable at two names, and an output head tied to the embedding."""
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.first = nn.Linear(16, 16)
            self.again = self.first
            self.mix = nn.Linear(16, 16)
            self.head = nn.Linear(16, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            x = self.emb(ids)
            return self.head(self.again(torch.relu(self.first(x))) + self.mix(x))
''')
namespace = {}
exec(ARCH, namespace)
SmallCNN, Holder, SharedAndTied = namespace["SmallCNN"], namespace["Holder"], namespace["SharedAndTied"]

LAYERS = {"linear": (lambda: nn.Linear(24, 16), (5, 24)), 1: (lambda: nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
          2: (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
          3: (lambda: nn.Conv3d(4, 6, 3, padding=1), (1, 4, 5, 5, 5))}
# Options beyond the default of some classes (implementations, schemes, forward modes).
VARIANTS = [("svd", 2, dict(rank=2, scheme="spatial")), ("cp", 2, dict(rank=3, n_iter_max=5, implementation="fused")),
            ("pq", "linear", dict(block_size=4, n_centroids=8, forward="lut", random_state=0))]


def registered_cases():
    return registered_requests() + VARIANTS


def fresh_process_diffs(jobs, tmp_path) -> dict:
    """Load each ``job`` (folder, how to rebuild the base, input file) in a new interpreter; ``{folder: diff}``."""
    script = tmp_path / "check.py"
    script.write_text(ARCH + textwrap.dedent(f'''
        import json, sys
        from safetensors.torch import load_file
        from decomp_toolkit.layers import load_compressed

        def rebuild(base):
            if base is None:
                return None
            kind, arg = base
            if kind == "cnn":
                return SmallCNN()
            if kind == "shared":
                return SharedAndTied()
            return Holder({{"linear": lambda: nn.Linear(*arg), 1: lambda: nn.Conv1d(*arg), 2: lambda: nn.Conv2d(*arg),
                           3: lambda: nn.Conv3d(*arg)}}[kind if kind == "linear" else int(kind)]())

        torch.set_num_threads({torch.get_num_threads()})   # the same summation order as the saving process
        out = {{}}
        for folder, base, data in json.load(open(sys.argv[1])):
            tensors = load_file(data)
            model = load_compressed(folder, model=rebuild(base))
            with torch.no_grad():
                got = model(*[tensors[f"in{{i}}"].clone() for i in range(len(tensors) - 1)])
            got = got[0] if isinstance(got, (tuple, list)) else getattr(got, "last_hidden_state", got)
            got = got if isinstance(got, torch.Tensor) else got.logits
            out[folder] = float((got - tensors["out"]).abs().max())
            if base is not None and base[0] == "shared":
                out[folder + ":shared"] = float(model.first is model.again and model.head.weight is model.emb.weight)
        print(json.dumps(out))
    '''))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def job(model, inputs, folder, rebuild, **save_kw):
    """Save ``model`` and its output on ``inputs``; the job description for :func:`fresh_process_diffs`."""
    from safetensors.torch import save_file

    model.eval()
    save_compressed(model, folder, **save_kw)
    with torch.no_grad():
        out = model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    out = out if isinstance(out, torch.Tensor) else out.logits
    tensors = {f"in{i}": x for i, x in enumerate(inputs)} | {"out": out.contiguous()}
    save_file(tensors, str(folder) + ".inputs.safetensors")
    return [str(folder), rebuild, str(folder) + ".inputs.safetensors"]


def layer_args(layer):
    if isinstance(layer, nn.Linear):
        return [layer.in_features, layer.out_features]
    return [layer.in_channels, layer.out_channels, layer.kernel_size[0], 1, layer.padding[0]]


def test_every_registered_method_and_a_plain_cnn_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    jobs = []
    for i, (method, kind, spec) in enumerate(registered_cases()):
        make, shape = LAYERS[kind]
        layer = make()
        factorized = decompose(layer, method, **spec)
        model = Holder(layer)
        model.block[0] = factorized
        jobs.append(job(model, (torch.randn(shape),), tmp_path / f"{i}-{method}-{kind}", [str(kind), layer_args(layer)]))
    small, report = compress(SmallCNN(), method="svd", ratio=0.5, progress=False)
    jobs.append(job(small, (torch.randn(2, 3, 16, 16),), tmp_path / "cnn", ["cnn", None], report=report))
    diffs = fresh_process_diffs(jobs, tmp_path)
    assert len(diffs) == len(jobs) >= len(available_methods())
    assert {k: d for k, d in diffs.items() if d != 0.0} == {}
    assert str(load_report(tmp_path / "cnn")) == str(report)


def test_shared_modules_and_tied_parameters_round_trip(tmp_path):
    torch.manual_seed(0)
    model = SharedAndTied()
    model.first = decompose(model.first, "svd", rank=4)
    model.again = model.first
    model.mix = decompose(model.mix, "tucker", rank=3)
    ids = torch.randint(0, 20, (3, 5))
    manifest_folder = tmp_path / "shared"
    diffs = fresh_process_diffs([job(model, (ids,), manifest_folder, ["shared", None])], tmp_path)
    assert diffs == {str(manifest_folder): 0.0, f"{manifest_folder}:shared": 1.0}
    manifest = json.loads((manifest_folder / "compressed.json").read_text())
    assert {m["name"]: m["aliases"] for m in manifest["modules"]} == {"first": ["again"], "mix": []}
    assert manifest["tied"]["head.weight"] == "emb.weight"


def test_no_pickle_in_the_folder(tmp_path):
    small, _ = compress(SmallCNN(), method="svd", ratio=0.5, progress=False)
    save_compressed(small, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["compressed.json", "model.safetensors"]
    assert b"\x80\x02" not in (tmp_path / "m" / "compressed.json").read_bytes()


# --------------------------------------------------------------------------- errors

@pytest.fixture
def saved_cnn(tmp_path):
    torch.manual_seed(0)
    small, _ = compress(SmallCNN(), method="svd", ratio=0.5, progress=False)
    save_compressed(small, tmp_path / "m")
    return tmp_path / "m"


def tamper(folder, edit):
    path = folder / "compressed.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["modules"][0].update({"class": "os.system"}), r"class 'os.system' is not a known factorized"),
    (lambda m: m["modules"][0].update({"class": "Linear"}), r"class 'Linear' is not a known factorized"),
    (lambda m: m["modules"][0].update({"name": "features.9"}), r"has no module 'features.9'"),
    (lambda m: m["modules"][0].update({"name": "features.1"}), r"has a ReLU here, not a Linear/Conv"),
    (lambda m: m["modules"][0]["config"].update({"rank": 1}), r"does not fit the base model: shape mismatch"),
    (lambda m: m["modules"][0]["config"].update({"evil": 1}), r"cannot build LowRankConv from its config"),
    (lambda m: m["modules"][0]["config"].update({"x": {"__import__": "os"}}), r"unknown marker"),
    (lambda m: m.pop("modules")[0], r"'modules' must be a list"),
    (lambda m: m.update({"version": 99}), r"has version 99"),
    (lambda m: m.update({"format": "pickle"}), r"not a decomp-toolkit manifest"),
    (lambda m: m.update({"base": {"plugin-that-is-not-installed": "x"}}), r"cannot rebuild; pass model="),
])
def test_tampered_manifest_is_refused_and_the_model_is_unchanged(saved_cnn, edit, message):
    tamper(saved_cnn, edit)
    base = SmallCNN()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CompressedModelError, match=message):
        load_compressed(saved_cnn, model=None if "plugin" in message or "rebuild" in message else base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.Sequential, SmallCNN) for m in base.modules())


def test_mismatched_base_model_and_broken_files(saved_cnn, tmp_path):
    with pytest.raises(CompressedModelError, match=r"'head'.*in_features=4096.*saved one has in_features=1176"):
        load_compressed(saved_cnn, model=_wider())
    with pytest.raises(CompressedModelError, match=r"saved from a SmallCNN \(a plain nn.Module\): pass model="):
        load_compressed(saved_cnn)
    with pytest.raises(CompressedModelError, match=r"holds no compressed.json"):
        load_compressed(tmp_path, model=SmallCNN())
    (saved_cnn / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CompressedModelError, match=r"cannot read the weights"):
        load_compressed(saved_cnn, model=SmallCNN())
    (saved_cnn / "compressed.json").write_text("{not json")
    with pytest.raises(CompressedModelError, match=r"cannot read .*compressed.json"):
        load_compressed(saved_cnn, model=SmallCNN())


def _wider():
    model = SmallCNN()
    model.head = nn.Linear(4096, 10)
    return model


def test_extra_weights_in_the_base_are_reported(saved_cnn):
    model = SmallCNN()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(CompressedModelError, match=r"missing extra.bias, extra.weight"):
        load_compressed(saved_cnn, model=model)


# --------------------------------------------------------------------------- zoo and transformers

def test_zoo_mnist_cnn_rebuilds_without_model(tmp_path):
    zoo = pytest.importorskip("decomp_toolkit.analysis.zoo")
    if not zoo.ZOO["mnist-cnn"].installed():
        pytest.skip("mnist-cnn zoo packages not installed")
    small, report = compress(zoo.load_mnist_cnn(), method="tucker", rank=4, progress=False)
    images = zoo.load_mnist_images(limit=16)[0]
    diffs = fresh_process_diffs([job(small, (images,), tmp_path / "mnist", None, report=report,
                                     base={"zoo": "mnist-cnn"})], tmp_path)
    assert diffs == {str(tmp_path / "mnist"): 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "mobilenet-v2"])
def test_zoo_models_round_trip(name, tmp_path):
    zoo = pytest.importorskip("decomp_toolkit.analysis.zoo")
    entry = zoo.ZOO[name]
    if not entry.installed():
        pytest.skip(f"{name} zoo packages not installed")
    small, report = compress(entry.load_model(), method="svd", budget=dict(params=0.5), progress=False)
    diffs = fresh_process_diffs([job(small, tuple(entry.example_input()), tmp_path / name, None, report=report,
                                     base={"zoo": name})], tmp_path)
    assert diffs == {str(tmp_path / name): 0.0}


def _gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config), torch.randint(0, 64, (2, 7))


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config), torch.randint(0, 64, (2, 7))


def _bert_minilm():
    transformers = pytest.importorskip("transformers")
    zoo = pytest.importorskip("decomp_toolkit.analysis.zoo")
    try:
        folder = zoo.minilm_dir()
    except zoo.MissingZooPackage as err:
        pytest.skip(str(err))
    model = transformers.BertModel.from_pretrained(str(folder))
    ids, mask = zoo.load_sentences(limit=4)
    return model, ids


@pytest.mark.parametrize("build", [_gpt2, _llama, _bert_minilm], ids=["gpt2", "llama", "bert-minilm"])
def test_transformers_models_round_trip_and_stay_save_pretrained_folders(build, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ids = build()
    model.eval()
    small, _ = compress(model, method="svd", ratio=0.5, progress=False)
    assert small.num_parameters() < model.num_parameters()
    folder = tmp_path / "hf"
    diffs = fresh_process_diffs([job(small, (ids,), folder, None)], tmp_path)
    assert diffs == {str(folder): 0.0}
    assert {"config.json", "model.safetensors", "compressed.json"} <= {p.name for p in folder.iterdir()}
    plain = transformers.AutoModel.from_pretrained(str(folder))  # a valid save_pretrained folder (dense layers)
    assert plain.config.architectures == [type(small).__name__]
    if getattr(small.config, "tie_word_embeddings", False) and hasattr(small, "lm_head"):
        loaded = load_compressed(folder)
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight or not isinstance(
            loaded.get_output_embeddings(), nn.Linear)
