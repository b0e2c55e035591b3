"""Conv + BatchNorm pairs are folded / rescaled only when that cannot change another use of either module."""
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import UnsupportedLayerError, compress
from decomp_toolkit.layers.batchnorm import conv_bn_pairs, refused_pairs
from decomp_toolkit.layers.sequential import compress_sequential


def _set_bn(bn, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 0.15 + 0.05)
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 2)  # scales far from 1: a wrong rescale shows


class ReusedConv(nn.Module):
    """The same conv at two call sites, a BatchNorm after only the first."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.conv(self.bn(self.conv(x))))


class SharedBN(nn.Module):
    """The same BatchNorm after the conv and on the input."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)) + self.bn(x))


class ConvBNRes(nn.Sequential):
    """A Sequential subclass whose own forward also reads the conv output (a residual)."""

    def forward(self, x):
        y = self[0](x)
        return self[1](y) + y


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so pairs come from the Sequential fallback."""

    def __init__(self):
        super().__init__()
        self.block = ConvBNRes(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.block(x)
        return self.head(x)


class Plain(nn.Module):
    """The ordinary safe case: conv -> bn -> relu -> conv."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


UNSAFE = [ReusedConv, SharedBN, Untraceable]
FULL_RANKS = {"conv": 8, "block.0": 8, "head": 4}  # every layer at full rank: compress_sequential's fits are exact


def _build(cls):
    torch.manual_seed(0)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _set_bn(m)
    return model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_function_and_input_untouched(model, run):
    x = torch.randn(2, 8, 10, 10, generator=torch.Generator().manual_seed(1))
    before = _state(model)
    with torch.no_grad():
        ref = model(x)
    small, report = run(model, x)
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-4)
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    return small, report


@pytest.mark.parametrize("cls", UNSAFE)
def test_unsafe_candidates_are_refused_with_a_reason(cls):
    model = _build(cls)
    assert conv_bn_pairs(model) == []
    refused = refused_pairs(model)
    assert len(refused) == 1 and refused[0][2]


@pytest.mark.parametrize("kw", [dict(), dict(fold_bn=True)], ids=["bn_aware", "fold_bn"])
@pytest.mark.parametrize("cls", UNSAFE)
def test_compress_at_full_rank_keeps_the_output(cls, kw):
    run = lambda m, x: compress(m, method="svd", energy=1.0, progress=False, time_layers=False, **kw)  # noqa: E731
    small, report = _assert_same_function_and_input_untouched(_build(cls), run)
    assert any("not used for" in n for n in report.notes)  # the refused candidate is named
    assert not any(isinstance(m, nn.Identity) for m in small.modules())  # nothing folded


@pytest.mark.parametrize("kw", [dict(), dict(fold_bn=True)], ids=["bn_aware", "fold_bn"])
@pytest.mark.parametrize("cls", [SharedBN, Untraceable])
def test_compress_sequential_at_full_rank_keeps_the_output(cls, kw):
    def run(m, x):
        ranks = {k: v for k, v in FULL_RANKS.items() if k in dict(m.named_modules())}
        return compress_sequential(m, x, ranks=ranks, blocks=[""], progress=False, **kw)

    _, report = _assert_same_function_and_input_untouched(_build(cls), run)
    assert any("not used for" in n for n in report.notes)


@pytest.mark.parametrize("kw", [dict(), dict(fold_bn=True)], ids=["bn_aware", "fold_bn"])
def test_compress_sequential_refuses_a_reused_conv_and_leaves_the_input(kw):
    """compress_sequential needs every layer to run once per forward; the input model is untouched."""
    model = _build(ReusedConv)
    before = _state(model)
    with pytest.raises(UnsupportedLayerError, match="ran 2 times"):
        compress_sequential(model, torch.randn(2, 8, 10, 10), ranks={"conv": 8, "head": 4}, blocks=[""],
                            progress=False, **kw)
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_compress_with_an_explicit_rank_matches_the_bn_free_treatment():
    """A refused pair is compressed exactly as with bn_aware=False (a conv without BN)."""
    model = _build(ReusedConv)
    x = torch.randn(2, 8, 10, 10)
    aware, _ = compress(model, method="svd", rank=3, progress=False, time_layers=False)
    plain, _ = compress(model, method="svd", rank=3, bn_aware=False, progress=False, time_layers=False)
    with torch.no_grad():
        torch.testing.assert_close(aware(x), plain(x), rtol=1e-5, atol=1e-5)


def test_the_ordinary_case_is_still_paired_and_exact():
    model = _build(Plain)
    assert conv_bn_pairs(model) == [("conv", "bn")] and refused_pairs(model) == []
    seq = _build(lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    assert conv_bn_pairs(seq) == [("0", "1")]
    run = lambda m, x: compress(m, method="svd", energy=1.0, progress=False, time_layers=False)  # noqa: E731
    _, report = _assert_same_function_and_input_untouched(model, run)
    assert any(n.startswith("bn_aware: 1 conv(s)") and "bn into conv" in n for n in report.notes)
    run = lambda m, x: compress(m, method="svd", energy=1.0, fold_bn=True, progress=False,  # noqa: E731
                                time_layers=False)
    small, report = _assert_same_function_and_input_untouched(model, run)
    assert isinstance(small.bn, nn.Identity) and any(n.startswith("fold_bn: folded 1") for n in report.notes)


def test_plain_sequential_in_an_untraceable_model_is_still_paired():
    """The fallback still accepts a plain nn.Sequential (its forward is nn.Sequential.forward)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            return self.block(x) if x.sum() > -1e9 else x

    assert conv_bn_pairs(_build(Net)) == [("block.0", "block.1")]


def test_a_module_shared_in_the_module_tree_is_refused():
    """Called once, but also reachable under a second name: replacing it under one name would split it."""
    model = _build(Plain)
    model.alias = model.conv
    assert conv_bn_pairs(model) == [] and "shared" in refused_pairs(model)[0][2]
