"""pairs="auto" on models named and written in other ways: the fx graph (or, when the model does not trace,
its submodules that do) proposes producer -> channel-wise ops -> consumer chains; what is not channel-wise
is not proposed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decomp_toolkit.layers.interpolative import find_pairs
from decomp_toolkit.layers.sequential import compress_sequential, select_targets


class _ShapeCheckedCnn(nn.Module):
    """A CNN whose forward checks its input's shape (torch.fx cannot trace it as a whole)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(12 * 4 * 4, 24), nn.ReLU(), nn.Dropout(0.1), nn.Linear(24, 5))

    def forward(self, x):
        if x.shape[-2:] != (16, 16):
            raise ValueError("expected 16x16 inputs")
        return self.classifier(self.features(x).flatten(1))


class _ResidualMlp(nn.Module):
    def __init__(self, d=12, hidden=32, gated=False):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.gate = nn.Linear(d, hidden) if gated else None

    def forward(self, x):
        h = self.norm(x)
        hidden = F.silu(self.gate(h)) * self.up(h) if self.gate is not None else F.gelu(self.up(h))
        return x + self.down(hidden)


class _NotChannelwise(nn.Module):
    """Chains broken by what sits between the layers: a product with the input, a BatchNorm read twice,
    a softmax over the units, a residual sum, a Linear output read twice."""

    def __init__(self, d=8):
        super().__init__()
        self.a1, self.a2 = nn.Linear(d, d), nn.Linear(d, d)
        self.b1, self.b2, self.bn = nn.Linear(d, d), nn.Linear(d, d), nn.BatchNorm1d(d)
        self.c1, self.c2 = nn.Linear(d, d), nn.Linear(d, d)
        self.d1, self.d2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        y = self.a2(torch.relu(self.a1(x)) * x)
        y = self.b2(self.bn(self.b1(y))) + self.bn(y)
        y = self.c2(torch.softmax(self.c1(y), dim=-1)) + y
        h = self.d1(y)
        return self.d2(torch.relu(h)) + h


def _pairs(net):
    return [(p.producers, p.consumer, p.between) for p in find_pairs(net, select_targets(net))]


def test_a_model_fx_cannot_trace_is_read_through_its_submodules():
    assert _pairs(_ShapeCheckedCnn()) == [(("features.0",), "features.4", ("features.1",)),
                                          (("classifier.0",), "classifier.3", ())]


@pytest.mark.parametrize("gated", [False, True])
def test_mlps_are_found_whatever_their_layers_are_called(gated):
    net = nn.Sequential(_ResidualMlp(gated=gated), _ResidualMlp(gated=gated))
    producers = ("gate", "up") if gated else ("up",)
    assert _pairs(net) == [(tuple(f"{i}.{p}" for p in producers), f"{i}.down", ()) for i in (0, 1)]
    data = torch.randn(64, 5, 12, generator=torch.Generator().manual_seed(0))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=16, progress=False)
    assert [small[i].down.in_features for i in (0, 1)] == [16, 16]
    assert all(type(small[i].up) is nn.Linear and small[i].up.out_features == 16 for i in (0, 1))
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


def test_chains_that_are_not_channel_wise_are_not_proposed():
    assert _pairs(_NotChannelwise()) == []


def test_gpt2_mlps_are_paired_and_the_compressed_model_runs():
    """GPT-2's MLP layers are transformers Conv1D (not nn.Linear): found on the standardized model, and a
    pruned producer keeps its pruned form (it was put back as the dense Conv1D: the model then failed)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(1, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(model, [dict(input_ids=ids)], ratio=0.5, pairs="auto",
                                        exclude=("lm_head",), progress=False)
    for i in (0, 1):
        mlp = small.transformer.h[i].mlp
        assert (mlp.c_fc.out_features, mlp.c_proj.in_features) == (64, 64)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    with torch.no_grad():
        dense, out = model(input_ids=ids).logits, small(input_ids=ids).logits
    assert float(torch.linalg.norm(out - dense) / torch.linalg.norm(dense)) < 0.5


class _TupleBlock(nn.Module):
    """A block that returns ``(hidden, aux)``, unpacked by its parent (T5's blocks return three values)."""

    def __init__(self, d=12):
        super().__init__()
        self.mlp = _ResidualMlp(d)

    def forward(self, x):
        return self.mlp(x), x.mean()


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_TupleBlock(), _TupleBlock()])

    def forward(self, x):
        for block in self.blocks:
            x, _ = block(x)
        return x


def test_the_pair_check_leaves_a_blocks_tuple_output_alone():
    net = _TupleNet().eval()
    data = torch.randn(32, 5, 12, generator=torch.Generator().manual_seed(0))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=16, progress=False)
    assert sorted(report.units) == [f"blocks.{i}.mlp.{n}" for i in (0, 1) for n in ("down", "up")]
    assert small(data).shape == data.shape


class _SubclassedLinear(nn.Linear):
    """A Linear subclass (the forward of nn.Linear): not a plain layer to slice, still one to factorize."""


class _FalconLikeMlp(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = _SubclassedLinear(d, 4 * d), _SubclassedLinear(4 * d, d)

    def forward(self, x):
        return x + self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


def test_a_named_mlp_of_linear_subclasses_is_left_to_the_rank_fits():
    net = nn.Sequential()
    net.add_module("mlp", _FalconLikeMlp())
    assert _pairs(net) == []
    data = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", blocks=[""], batch_size=32,
                                        progress=False)
    assert not report.units and all(r.replaced for r in report.layers)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())


def test_layers_outside_the_blocks_are_all_named_with_the_exclude_to_pass():
    net = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"2 layer\(s\) lie in none of the blocks \['1'\]: \['0', '2'\]; "
                                         r"exclude them \(exclude=\('0', '2'\)\)"):
        compress_sequential(net, torch.randn(16, 8), ratio=0.5, blocks=["1"], progress=False)


class _TwoStacks(nn.Module):
    """Two stacks of blocks with a module between them (an encoder, a projection, a decoder)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.mid = nn.Linear(8, 8)
        self.dec = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.enc(x))))


def test_blocks_that_do_not_chain_are_refused_beyond_the_first_two():
    net = _TwoStacks().eval()
    with pytest.raises(ValueError, match=r"the input of blocks\[2\] is not the output of blocks\[1\]"):
        compress_sequential(net, torch.randn(32, 8), ratio=0.5, blocks=["enc.0", "enc.1", "dec.0", "dec.1"],
                            exclude=("mid",), progress=False)
    small, _ = compress_sequential(net, torch.randn(32, 8), ratio=0.5, blocks=[""], progress=False)
    assert small(torch.randn(2, 8)).shape == (2, 8)
