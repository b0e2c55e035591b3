"""save_compressed / load_compressed of what the first manifest version left out: plain layers resized by
hidden-unit pruning (``compress_sequential(pairs=...)``), buffers carried over to a replacement, and
factorized modules nested in factorized modules (SVD, then PQ on the factors). Each round trip loads
in this process and compares the outputs exactly and the parameter counts."""
import json

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import CompressedModelError, compress, load_compressed, save_compressed
from decomp_toolkit.layers.lowrank import LowRankLinear
from decomp_toolkit.layers.pq import PQLinear
from decomp_toolkit.layers.sequential import compress_sequential

from test_interpolative import _Cnn   # conv-BN-ReLU-conv-BN-ReLU-maxpool-conv-ReLU-conv: three chained pairs


def _params(model) -> int:
    """Parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _assert_same(loaded, saved, *inputs):
    """The loaded model computes exactly what the saved one does and has as many parameters."""
    loaded.eval(), saved.eval()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), saved(*inputs))
    assert _params(loaded) == _params(saved)
    assert loaded.state_dict().keys() == saved.state_dict().keys()


def _edit_manifest(folder, edit):
    """Apply ``edit`` to the folder's compressed.json."""
    path = folder / "compressed.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- 1: hidden-unit pruning

class _Block(nn.Module):
    """A residual MLP (``up`` -> GELU -> ``down``): a pair for ``pairs="auto"``."""

    def __init__(self, d, h):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


class _Mlp(nn.Module):
    """Two residual MLP blocks."""

    def __init__(self, d=12, h=40):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(_Block(d, h) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


MLP_PAIRS = [("blocks.0.up", "blocks.0.down"), ("blocks.1.up", "blocks.1.down")]


def test_pruned_mlp_round_trips_exactly(tmp_path):
    """The shrunk Linear layers are rebuilt at their saved size from the manifest's ``plain`` entries."""
    net = _Mlp().eval()
    data = torch.randn(64, 5, 12, generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(net, data, ratio=0.5, pairs=MLP_PAIRS, batch_size=16, progress=False)
    first, second = small.blocks[0], small.blocks[1]
    assert first.up.out_features < 40 and first.down.in_features == first.up.out_features
    save_compressed(small, tmp_path / "m", report=report)
    plain = {e["name"]: e for e in json.loads((tmp_path / "m" / "compressed.json").read_text())["plain"]}
    assert plain["blocks.0.up"]["config"]["out_features"] == first.up.out_features
    loaded = load_compressed(tmp_path / "m", model=_Mlp())
    assert (loaded.blocks[0].up.out_features, loaded.blocks[1].down.in_features) == (first.up.out_features,
                                                                                      second.down.in_features)
    _assert_same(loaded, small, torch.randn(3, 5, 12))


def test_pruned_conv_chain_with_batchnorms_round_trips_exactly(tmp_path):
    """Resized convolutions and BatchNorms (running statistics included) come back bit for bit."""
    net = _Cnn().eval()
    data = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=8, progress=False)
    assert small.bn1.num_features < 8 and small.conv3.out_channels < 6
    save_compressed(small, tmp_path / "m", report=report)
    loaded = load_compressed(tmp_path / "m", model=_Cnn())
    assert isinstance(loaded.bn1, nn.BatchNorm2d) and loaded.bn1.num_features == small.bn1.num_features
    assert torch.equal(loaded.bn2.running_var, small.bn2.running_var)
    _assert_same(loaded, small, torch.randn(2, 3, 8, 8))


def test_a_pruned_layer_larger_than_the_base_models_is_refused_and_the_model_is_unchanged(tmp_path):
    """A base model whose hidden layer is narrower than the saved one is another architecture."""
    net = _Mlp().eval()
    data = torch.randn(64, 5, 12, generator=torch.Generator().manual_seed(1))
    small, _ = compress_sequential(net, data, ratio=0.5, pairs=MLP_PAIRS, batch_size=16, progress=False)
    save_compressed(small, tmp_path / "m")
    narrow = _Mlp(h=4)
    before = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(CompressedModelError, match=r"module 'blocks.0.up'.*out_features=4 but the saved one has "
                                                   r"out_features=\d+: a different architecture"):
        load_compressed(tmp_path / "m", model=narrow)
    assert all(torch.equal(before[k], v) for k, v in narrow.state_dict().items())
    _edit_manifest(tmp_path / "m", lambda m: m["plain"][0].update({"family": "Conv2d"}))
    with pytest.raises(CompressedModelError, match=r"has a Linear here, the saved model a Linear \(a Conv2d\)"):
        load_compressed(tmp_path / "m", model=_Mlp())
    _edit_manifest(tmp_path / "m", lambda m: m["plain"][0].update({"family": "os.system"}))
    with pytest.raises(CompressedModelError, match=r"'family' must be one of Linear"):
        load_compressed(tmp_path / "m", model=_Mlp())


def test_pruned_zoo_model_rebuilds_without_model(tmp_path):
    """Without ``model=`` the base is rebuilt from the zoo entry and the pruned layers replace its own."""
    zoo = pytest.importorskip("decomp_toolkit.analysis.zoo")
    if not zoo.ZOO["mnist-cnn"].installed():
        pytest.skip("mnist-cnn zoo packages not installed")
    images = zoo.load_mnist_images(limit=32)[0]
    pairs = [("features.0", "features.3"), ("classifier.0", "classifier.2")]
    small, report = compress_sequential(zoo.load_mnist_cnn().eval(), images, ratio=0.5, pairs=pairs,
                                        batch_size=16, progress=False)
    assert small.features[0].out_channels < 32 and small.classifier[0].out_features < 128
    save_compressed(small, tmp_path / "m", report=report, base={"zoo": "mnist-cnn"})
    _assert_same(load_compressed(tmp_path / "m"), small, images[:4])
    _assert_same(load_compressed(tmp_path / "m", model=zoo.load_mnist_cnn()), small, images[:4])


# --------------------------------------------------------------------------- 2: buffers carried over

class _Tagged(nn.Linear):
    """A Linear (forward not overridden) with a persistent and a non-persistent buffer of its own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("step", torch.tensor(0))
        self.register_buffer("scale", torch.arange(3.0), persistent=False)


def _tagged_net():
    """A small MLP whose first layer is a _Tagged."""
    torch.manual_seed(0)
    return nn.Sequential(_Tagged(32, 32), nn.ReLU(), nn.Linear(32, 8))


def test_buffers_carried_to_a_replacement_round_trip(tmp_path):
    """The persistent buffer comes back with its saved value, the non-persistent one from the base model."""
    small, report = compress(_tagged_net().eval(), method="svd", rank=4, progress=False, time_layers=False)
    assert isinstance(small[0], LowRankLinear) and "step" in dict(small[0].named_buffers())
    small[0].step.fill_(7)
    save_compressed(small, tmp_path / "m", report=report)
    loaded = load_compressed(tmp_path / "m", model=_tagged_net())
    assert isinstance(loaded[0], LowRankLinear) and int(loaded[0].step) == 7 and loaded[0].step.dtype == torch.int64
    assert torch.equal(loaded[0].scale, torch.arange(3.0)) and "scale" in loaded[0]._non_persistent_buffers_set
    _assert_same(loaded, small, torch.randn(5, 32))


def test_a_non_persistent_buffer_the_base_model_lacks_is_refused(tmp_path):
    """A carried non-persistent buffer is in no state dict: a base without it cannot provide its value."""
    small, _ = compress(_tagged_net().eval(), method="svd", rank=4, progress=False, time_layers=False)
    save_compressed(small, tmp_path / "m")
    plain_base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with pytest.raises(CompressedModelError, match=r"non-persistent buffer 'scale' .* has no such buffer"):
        load_compressed(tmp_path / "m", model=plain_base)
    assert isinstance(plain_base[0], nn.Linear) and not isinstance(plain_base[0], LowRankLinear)
    _edit_manifest(tmp_path / "m", lambda m: m["modules"][0]["buffers"][0].update({"dtype": "os.system"}))
    with pytest.raises(CompressedModelError, match=r"'buffers' must be a list of"):
        load_compressed(tmp_path / "m", model=_tagged_net())


# --------------------------------------------------------------------------- 3: nested factorized modules

def _mlp():
    """The same small MLP each call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


@pytest.mark.parametrize("second", [dict(method="pq", bits=4), dict(method="svd", rank=4)])
def test_stacked_compression_round_trips_exactly(second, tmp_path):
    """SVD, then PQ (or SVD again) on the factors: outer modules are rebuilt first, then the inner ones."""
    low, _ = compress(_mlp(), method="svd", rank=16, progress=False, time_layers=False)
    both, report = compress(low, progress=False, time_layers=False, **second)
    inner = PQLinear if second["method"] == "pq" else LowRankLinear
    assert isinstance(both[0], LowRankLinear) and isinstance(both[0].expand, inner)
    save_compressed(both, tmp_path / "m", report=report)
    loaded = load_compressed(tmp_path / "m", model=_mlp())
    assert isinstance(loaded[0], LowRankLinear) and isinstance(loaded[0].expand, inner)
    _assert_same(loaded, both, torch.randn(3, 64))
    # the manifest's order does not matter: inner modules listed first still go into their outer one
    _edit_manifest(tmp_path / "m", lambda m: m["modules"].reverse())
    _assert_same(load_compressed(tmp_path / "m", model=_mlp()), both, torch.randn(3, 64))


def test_a_nested_module_whose_outer_one_is_not_listed_is_refused(tmp_path):
    """Dropping the outer entry leaves the inner one at a name the base model does not have."""
    low, _ = compress(_mlp(), method="svd", rank=16, progress=False, time_layers=False)
    both, _ = compress(low, method="pq", bits=4, progress=False, time_layers=False)
    save_compressed(both, tmp_path / "m")
    _edit_manifest(tmp_path / "m", lambda m: m.update(modules=[e for e in m["modules"] if "." in e["name"]]))
    base = _mlp()
    with pytest.raises(CompressedModelError, match=r"has no module '0.reduce'"):
        load_compressed(tmp_path / "m", model=base)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in base.modules())


# --------------------------------------------------------------------------- old manifests

def test_a_version_1_manifest_still_loads(tmp_path):
    """A folder written before ``plain`` and ``buffers`` existed loads as it did."""
    small, _ = compress(_mlp(), method="svd", rank=8, progress=False, time_layers=False)
    save_compressed(small, tmp_path / "m")

    def as_version_1(manifest):
        """What version 1 wrote: no plain layers, no buffers."""
        manifest.update(version=1)
        manifest.pop("plain")
        for entry in manifest["modules"]:
            entry.pop("buffers")
    _edit_manifest(tmp_path / "m", as_version_1)
    _assert_same(load_compressed(tmp_path / "m", model=_mlp()), small, torch.randn(3, 64))


def test_a_pruned_then_factorized_model_round_trips_and_a_wider_saved_layer_is_still_refused(tmp_path):
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()

    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(1))
    pruned, _ = compress_sequential(mlp(), x, ratio=0.5, pairs="auto", blocks=[""], progress=False)
    stacked, _ = compress(pruned, method="svd", ratio=0.5, include=["0"], progress=False, time_layers=False)
    assert isinstance(stacked[0], LowRankLinear) and stacked[0].expand.out_features == 32
    save_compressed(stacked, tmp_path / "stacked")
    back = load_compressed(tmp_path / "stacked", mlp())
    assert torch.equal(back(x), stacked(x))
    again, _ = compress(back, method="svd", ratio=0.5, include=["2"], progress=False, time_layers=False)
    save_compressed(again, tmp_path / "again")                     # a reloaded pruned layer stays resized
    assert torch.equal(load_compressed(tmp_path / "again", mlp())(x), again(x))
    refit, _ = compress_sequential(pruned, x, ratio=0.5, blocks=[""], include=["0"], progress=False)
    save_compressed(refit, tmp_path / "refit")                     # a pruned layer refitted by rank stays resized
    assert torch.equal(load_compressed(tmp_path / "refit", mlp())(x), refit(x))
    dense, _ = compress(mlp(), method="svd", ratio=0.5, progress=False, time_layers=False)
    save_compressed(dense, tmp_path / "dense")
    narrower = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with pytest.raises(CompressedModelError, match=r"out_features=32 but the saved one has out_features=64"):
        load_compressed(tmp_path / "dense", narrower)


def _conv_bn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("spec", [dict(ratio=0.5), dict(rank=12)])
def test_a_model_compressed_with_folded_batchnorms_reloads_over_the_base_architecture(spec, tmp_path):
    """fold_bn=True puts Identity where each BN was (and a bias on a conv that had none, also when that conv is
    kept dense: rank 12 costs more than conv 0); loading over a fresh base model puts them back (it raised
    'missing 1.bias ...')."""
    x = torch.randn(2, 3, 8, 8)
    small, report = compress(_conv_bn(), method="svd", fold_bn=True, progress=False, **spec)
    assert type(small[1]) is type(small[4]) is nn.Identity
    assert (type(small[0]) is nn.Conv2d and small[0].bias is not None) == ("rank" in spec)
    save_compressed(small, tmp_path, report=report)
    loaded = load_compressed(tmp_path, model=_conv_bn(seed=1))
    assert type(loaded[1]) is type(loaded[4]) is nn.Identity
    _assert_same(loaded, small, x)


def test_an_identity_over_a_module_that_is_no_batchnorm_is_refused_and_the_model_is_unchanged(tmp_path):
    small, _ = compress(_conv_bn(), method="svd", ratio=0.5, fold_bn=True, progress=False)
    save_compressed(small, tmp_path)
    base = _conv_bn()
    base[4] = nn.Dropout()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CompressedModelError, match=r"module '4'.*Identity here.*the base model a Dropout"):
        load_compressed(tmp_path, model=base)
    assert type(base[4]) is nn.Dropout and type(base[0]) is nn.Conv2d
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_the_base_models_forward_hooks_are_carried_to_the_loaded_replacements(tmp_path):
    """A hook of the base architecture (here: doubling a layer's output) moves to the factorized layer at
    compress; a fresh base model's own hook moves to it at load too (it was dropped: outputs differed)."""
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)).eval()
        model[0].register_forward_hook(lambda module, args, out: out * 2.0)
        model[2].register_forward_pre_hook(lambda module, args: (args[0] - 0.5,))
        return model

    x = torch.randn(4, 32)
    small, report = compress(build(), method="svd", ratio=0.5, progress=False)
    assert isinstance(small[0], LowRankLinear) and len(small[0]._forward_hooks) == 1
    save_compressed(small, tmp_path, report=report)
    loaded = load_compressed(tmp_path, model=build())
    assert len(loaded[0]._forward_hooks) == len(loaded[2]._forward_pre_hooks) == 1
    _assert_same(loaded, small, x)
