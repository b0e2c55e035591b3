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


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1 project -> BN (+ x)."""

    def __init__(self, c=6, hidden=24, stride=1, bias=False):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, hidden, 1, bias=bias), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=bias)
        self.bn2, self.project, self.bn3 = nn.BatchNorm2d(hidden), nn.Conv2d(hidden, c, 1, bias=bias), nn.BatchNorm2d(c)
        self.stride = stride

    def forward(self, x):
        h = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        y = self.bn3(self.project(h))
        return x + y if self.stride == 1 else y


def _trained_like_bn(net, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
    return net.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_a_depthwise_conv_between_two_pointwise_convs_is_sliced_with_the_pair(bias, tmp_path):
    from decomp_toolkit.layers import load_compressed, save_compressed

    net = _trained_like_bn(nn.Sequential(_InvertedResidual(bias=bias), _InvertedResidual(stride=2, bias=bias)))
    assert _pairs(net) == [((f"{i}.expand",), f"{i}.project", (f"{i}.bn1", f"{i}.dw", f"{i}.bn2")) for i in (0, 1)]
    data = torch.randn(16, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=8, progress=False)
    for i in (0, 1):
        dw = small[i].dw
        assert (dw.in_channels, dw.out_channels, dw.groups, dw.weight.shape[0]) == (12, 12, 12, 12)
        assert small[i].expand.out_channels == small[i].bn1.num_features == small[i].project.in_channels == 12
        assert small[i].dw.stride == net[i].dw.stride and (small[i].dw.bias is not None) == bias
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    records = {r.name: r for r in report.layers}
    assert records["0.dw"].method == "interpolative-sequential" and records["0.dw"].rank == 12
    assert records["0.dw"].params_after == sum(p.numel() for p in small[0].dw.parameters())
    assert all(not (r.status or "").startswith("skipped") for r in report.layers)
    # the kept units of the depthwise conv are the expand conv's kept rows: slicing = zeroing the other columns
    with torch.no_grad():
        assert torch.isfinite(small(data)).all()
    save_compressed(small, tmp_path / "m", report=report)
    loaded = load_compressed(tmp_path / "m", model=_trained_like_bn(
        nn.Sequential(_InvertedResidual(bias=bias), _InvertedResidual(stride=2, bias=bias))))
    with torch.no_grad():
        assert torch.equal(loaded(data), small(data))


def test_an_excluded_depthwise_conv_keeps_its_chain_out_of_the_pairs():
    net = _trained_like_bn(nn.Sequential(_InvertedResidual(), _InvertedResidual()))
    targets = select_targets(net, exclude=["0.dw"])
    found = find_pairs(net, [t for t in targets if net.get_submodule(t).groups == 1], sliceable=targets)
    assert [p.consumer for p in found] == ["1.project"]
    data = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    small, _ = compress_sequential(net, data, ratio=0.5, pairs="auto", exclude=["0.dw"], progress=False)
    assert small[0].dw.groups == 24 and small[1].dw.groups == 12
    assert torch.equal(small[0].dw.weight, net[0].dw.weight)


@pytest.mark.parametrize("shrinkage", [None, "auto", "oas", 1.0])
def test_a_pair_fit_is_shrunk_on_request_and_reports_its_unshrunk_error(shrinkage):
    net = _trained_like_bn(nn.Sequential(_InvertedResidual(hidden=48)))
    data = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(2))   # 32 rows for 48 inputs
    small, report = compress_sequential(net, data, ratio=0.5, pairs="auto", batch_size=4, progress=False,
                                        shrinkage=shrinkage)
    fit = report.fits["0.project"]
    assert (fit.diagnostics["shrinkage"] > 0) == (shrinkage not in (None, "auto"))   # "auto": the pair's ridge
    outputs = {}
    for label, model in (("dense", net), ("pruned", small)):
        # bn_aware: the fit is in the scale of the BatchNorm after the consumer, i.e. on what the next layer sees
        model[0].bn3.register_forward_hook(lambda m, a, y, label=label: outputs.setdefault(label, y))
        with torch.no_grad():
            model(data)
    measured = float((outputs["dense"] - outputs["pruned"]).double().norm())
    assert fit.error == pytest.approx(measured, rel=1e-4)
    if shrinkage == 1.0:   # the statistics become scaled identities (X' = X here): the consumer keeps its own columns
        bn = net[0].bn3        # in the scale of its BatchNorm (bn_aware: the compressed model's conv holds that scale)
        in_bn_scale = net[0].project.weight.flatten(1) * (bn.weight.abs() / (bn.running_var + bn.eps).sqrt())[:, None]
        columns = in_bn_scale.norm(dim=0).argsort(descending=True)[:24].sort().values
        assert torch.allclose(small[0].project.weight.flatten(1), in_bn_scale[:, columns], rtol=1e-3, atol=1e-5)


def test_a_between_entry_that_is_not_per_unit_or_of_another_width_says_what_to_pass():
    net = _trained_like_bn(nn.Sequential(_InvertedResidual(), _InvertedResidual()))
    data = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"between entry '0.bn3' has 6 channels but the consumer reads 24"):
        compress_sequential(net, data, ratio=0.5, pairs=[("0.expand", "0.project", ["0.bn1", "0.dw", "0.bn3"])])
    net[0].act = nn.ReLU()
    with pytest.raises(ValueError, match=r"'0.act' \(ReLU\) must be a BatchNorm or a depthwise conv"):
        compress_sequential(net, data, ratio=0.5, pairs=[("0.expand", "0.project", ["0.act"])])


def test_sliced_batchnorms_keep_the_dtype_and_the_frozen_flags_and_one_kept_channel_reloads(tmp_path):
    from decomp_toolkit.layers import load_compressed, save_compressed

    net = _trained_like_bn(nn.Sequential(_InvertedResidual())).double()
    for p in net.parameters():
        p.requires_grad_(False)
    data = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    small, report = compress_sequential(net, data, ranks={"0.project": 1}, pairs="auto", progress=False)
    block = small[0]
    assert block.dw.groups == block.bn1.num_features == block.bn2.num_features == 1
    assert {p.dtype for p in small.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in small.parameters())
    assert report.units["0.bn1"] == report.units["0.dw"] == (1, 24)
    save_compressed(small, tmp_path / "m", report=report)
    loaded = load_compressed(tmp_path / "m", model=_trained_like_bn(nn.Sequential(_InvertedResidual())).double())
    with torch.no_grad():
        assert torch.equal(loaded(data), small(data))


class _SharedBatchNorm(nn.Module):
    """Two blocks sharing one BatchNorm; a shape check keeps fx from tracing the whole model."""

    def __init__(self):
        super().__init__()
        shared = nn.BatchNorm2d(12)
        self.b0 = nn.Sequential(nn.Conv2d(6, 12, 1), shared, nn.ReLU(), nn.Conv2d(12, 6, 1))
        self.b1 = nn.Sequential(nn.Conv2d(6, 12, 1), shared, nn.ReLU(), nn.Conv2d(12, 6, 1))

    def forward(self, x):
        if x.shape[1] != 6:
            raise ValueError("expected 6 channels")
        return self.b1(self.b0(x))


def test_a_batchnorm_shared_by_two_blocks_is_not_sliced():
    net = _trained_like_bn(_SharedBatchNorm())
    assert _pairs(net) == []
    data = torch.randn(8, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    small, _ = compress_sequential(net, data, ratio=0.5, pairs="auto", progress=False)
    assert small.b0[1] is small.b1[1] and small.b0[1].num_features == 12
