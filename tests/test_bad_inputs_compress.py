"""Bad or unusual inputs to compress(): wrong requests, real module classes, sharing, hooks, budgets, reports.

Every case checks a clear error (type + the layer / argument named) or the correct result, and that
the input model is bit-for-bit unchanged afterwards.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decomp_toolkit.layers import compress, decompose
from decomp_toolkit.layers._accounting import layer_macs
from decomp_toolkit.layers.sequential import compress_sequential
from decomp_toolkit.layers.errors import UnsupportedLayerError
from decomp_toolkit.layers.kinds import register_layer_kind
from _unchanged import assert_unchanged, snapshot

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4)).eval()


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10)).eval()


def lowrank_mlp(seed=0, rank=4):
    """An MLP whose weights have rank <= ``rank``: compress(rank=rank) reproduces it exactly."""
    model = mlp(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            out, inp = layer.weight.shape
            layer.weight.copy_(torch.randn(out, rank, generator=gen) @ torch.randn(rank, inp, generator=gen) / 4)
    return model


def model_params(model):
    return sum(p.numel() for p in model.parameters())


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=120, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def run_checked(model, expect_error=None, match=None, **kwargs):
    """compress(model, **kwargs) with the bit-for-bit check of ``model``; returns (small, report) or raises."""
    saved = snapshot(model)
    try:
        if expect_error is not None:
            with pytest.raises(expect_error, match=match):
                compress(model, progress=False, **kwargs)
            return None
        return compress(model, progress=False, **kwargs)
    finally:
        assert_unchanged(model, saved)


# --------------------------------------------------------------------------- 1. nothing silent: wrong requests

WRONG_REQUESTS = [
    ("rank_zero", dict(rank=0), ValueError, "rank=0"),
    ("rank_negative", dict(rank=-3), ValueError, "rank=-3"),
    ("rank_bool", dict(rank=True), TypeError, "rank="),
    ("rank_string", dict(rank="banana"), ValueError, "banana"),
    ("energy_zero", dict(energy=0), ValueError, "energy=0"),
    ("energy_above_one", dict(energy=1.5), ValueError, "energy=1.5"),
    ("energy_nan", dict(energy=float("nan")), ValueError, "energy=nan"),
    ("energy_string", dict(energy="0.9"), TypeError, "energy"),
    ("tol_one", dict(tol=1.0), ValueError, "tol=1.0"),
    ("ratio_zero", dict(ratio=0.0), ValueError, "ratio=0.0"),
    ("two_specs", dict(rank=2, energy=0.9), ValueError, "exactly one"),
    ("no_spec", dict(), ValueError, "exactly one"),
    ("unknown_method", dict(method="nope", energy=0.9), ValueError, "unknown method.*nope"),
    ("unknown_option", dict(energy=0.9, frobnicate=1), TypeError, "frobnicate"),
    ("include_matches_nothing", dict(energy=0.9, include=["nomatch*"]), ValueError, "nomatch"),
    ("exclude_matches_nothing", dict(energy=0.9, exclude=["nomatch*"]), ValueError, "nomatch"),
    ("include_as_string", dict(energy=0.9, include="0"), TypeError, "list of fnmatch patterns"),
    ("policy_unknown_method", dict(policy={"*": dict(method="nope", rank=2)}), ValueError, "nope"),
    ("policy_pattern_matches_nothing", dict(policy={"zzz*": dict(rank=2)}), ValueError, "zzz"),
    ("policy_two_specs", dict(policy={"*": dict(rank=2, ratio=0.5)}), ValueError, "policy.*exactly one"),
    ("policy_not_a_dict", dict(policy={"*": 3}), TypeError, "policy"),
    ("policy_unknown_option", dict(policy={"0": dict(rank=2, colour="red")}), TypeError, "colour"),
    ("tol_for_a_method_that_cannot_certify_it", dict(method="btd", tol=0.1), ValueError,
     "does not take tol=.*methods that take tol="),
    ("rank_for_a_projection", dict(method="toeplitz", rank=3), ValueError, "toeplitz"),
    ("budget_and_rank", dict(budget=dict(params=0.5), rank=3), ValueError, "do not also pass"),
    ("budget_fraction_too_big", dict(budget=dict(params=1.5)), ValueError, "fraction must be in"),
    ("budget_fraction_zero", dict(budget=dict(params=0)), ValueError, "fraction must be in"),
    ("budget_unknown_kind", dict(budget=dict(size=0.5)), ValueError, "dict\\(params=fraction\\)"),
    ("budget_unknown_scope", dict(budget=dict(params=0.5, of="world")), ValueError, "of= must be one of"),
    ("budget_flops_without_input", dict(budget=dict(flops=0.5)), ValueError, "needs example_input"),
    ("budget_for_a_method_without_spectrum", dict(method="pq", budget=dict(params=0.5)), ValueError,
     "cannot allocate"),
    ("bad_option_value", dict(energy=0.9, algorithm="quantum"), ValueError, "quantum"),
]


@pytest.mark.parametrize("kwargs, error, match", [c[1:] for c in WRONG_REQUESTS], ids=[c[0] for c in WRONG_REQUESTS])
def test_wrong_request_raises_before_any_work(kwargs, error, match):
    run_checked(mlp(), error, match, **kwargs)


NOT_A_MODEL = [
    ("single_linear", lambda: nn.Linear(64, 64), TypeError, "single Linear layer.*decompose"),
    ("single_conv", lambda: nn.Conv2d(3, 8, 3), TypeError, "single Conv2d layer"),
    ("torchscript", lambda: torch.jit.script(mlp()), TypeError, "TorchScript"),
    ("no_factorizable_layer", lambda: nn.Sequential(nn.ReLU(), nn.Tanh()), ValueError, "nothing to factorize"),
]


@pytest.mark.parametrize("make, error, match", [c[1:] for c in NOT_A_MODEL], ids=[c[0] for c in NOT_A_MODEL])
def test_not_a_model_with_factorizable_layers_raises(make, error, match):
    run_checked(make(), error, match, energy=0.9)


def test_a_string_is_not_a_model():
    with pytest.raises(TypeError, match="expected an nn.Module model, got str"):
        compress("model.pt", energy=0.9)


def test_layer_matching_no_policy_entry_says_so():
    small, report = run_checked(mlp(), policy={"0": dict(rank=2)})
    status = {r.name: r.status for r in report.layers}
    assert status["0"] == "replaced"
    assert status["2"] == status["4"] == "skipped: matches no policy pattern and compress() got no top-level rank spec"


def test_nan_weight_is_an_error_naming_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    run_checked(model, ValueError, "^2 \\(Linear, weight \\(32, 32\\)\\): contains NaN", energy=0.9)


def test_inf_bias_is_an_error_naming_the_layer():
    model = mlp()
    with torch.no_grad():
        model[4].bias[0] = float("inf")
    run_checked(model, ValueError, "4 \\(Linear, bias \\(4,\\)\\): contains NaN or Inf", energy=0.9)


def test_meta_device_model_is_an_error():
    with torch.device("meta"):
        model = mlp()
    run_checked(model, ValueError, "meta device", energy=0.9)


def test_nothing_factorized_is_noted():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    small, report = run_checked(model, rank=2)
    assert not report.replaced and any("nothing was factorized" in n for n in report.notes)
    assert all("not fewer than the dense" in r.status for r in report.layers)


# --------------------------------------------------------------------------- 2. real module classes

def _dense_twin(model):
    """``model`` with every factorized module replaced by its ``to_dense()`` reconstruction."""
    import copy
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if hasattr(module, "to_dense") and name:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, module.to_dense())
    return twin


def test_gpt2_conv1d_layers_are_compressed_and_match_to_dense():
    model = gpt2()
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    small, report = run_checked(model, rank=8, example_input=ids)
    records = {r.name: r for r in report.layers}
    conv1d = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(conv1d) == 8 and all(records[n].replaced for n in conv1d)
    assert all(records[n].type.startswith("Conv1D -> LowRankLinear") for n in conv1d)
    assert records["lm_head"].status == ("skipped: weight tied with transformer.wte.weight; decomposing one side "
                                         "would untie it and grow the model")
    assert small.lm_head.weight is small.transformer.wte.weight  # the tie survives
    assert report.model_params_after == model_params(small) < model_params(model) == report.model_params_before
    with torch.no_grad():
        got, want = small(ids).logits, _dense_twin(small)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_gpt2_budget_totals_equal_the_models_own_count():
    model = gpt2()
    small, report = run_checked(model, budget=dict(params=0.6))
    assert report.model_params_before == model_params(model)
    assert report.model_params_after == model_params(small)
    before, after = report.targeted_totals("params")
    assert after <= 0.6 * before and report.budget.met
    assert report.notes[0].startswith("budget: parameters of targeted layers <= 60.00%")
    assert f"whole model: {model_params(model):,} -> {model_params(small):,}" in report.notes[0]


def test_decompose_accepts_a_conv1d_directly():
    torch.manual_seed(0)
    layer = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs, weight (16, 24)
    saved = snapshot(layer)
    small = decompose(layer, "svd", rank=16)
    assert_unchanged(layer, saved)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(small(x), layer(x), rtol=1e-4, atol=1e-5)


class ScaledLinear(nn.Linear):
    """A subclass with its own forward (2 * Linear)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def _scaled_dense(module):
    dense = nn.Linear(module.in_features, module.out_features)
    with torch.no_grad():
        dense.weight.copy_(2.0 * module.weight)
        dense.bias.copy_(2.0 * module.bias)
    return dense


def _with_scaled_layer():
    model = lowrank_mlp()
    scaled = ScaledLinear(32, 32)
    with torch.no_grad():
        scaled.weight.copy_(model[2].weight)
        scaled.bias.copy_(model[2].bias)
    model[2] = scaled
    return model


def test_unregistered_forward_override_is_kept_dense_with_the_reason():
    model = _with_scaled_layer()
    small, report = run_checked(model, rank=4)
    status = {r.name: r.status for r in report.layers}
    assert "ScaledLinear overrides forward() of Linear" in status["2"] and "register_layer_kind" in status["2"]
    assert status["0"] == "replaced" and isinstance(small[2], ScaledLinear)


def test_user_registered_layer_kind_is_compressed_and_matches():
    model = _with_scaled_layer()
    register_layer_kind(ScaledLinear, dense=_scaled_dense)
    try:
        small, report = run_checked(model, rank=4)
    finally:
        from decomp_toolkit.layers import kinds
        kinds._KINDS.pop(ScaledLinear, None)
    assert report.layers[1].replaced and report.layers[1].type.startswith("ScaledLinear -> ")
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)


def test_registered_kind_with_a_wrong_dense_function_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), ScaledLinear(32, 32))
    register_layer_kind(ScaledLinear, dense=lambda m: nn.Linear(m.in_features, m.out_features))  # forgets the 2x
    try:
        run_checked(model, ValueError, "does not compute the module's function", energy=0.9)
    finally:
        from decomp_toolkit.layers import kinds
        kinds._KINDS.pop(ScaledLinear, None)


def test_register_layer_kind_rejects_a_non_module():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer_kind(int, dense=lambda m: m)


class StaticSamePadConv(nn.Conv2d):
    """EfficientNet-style conv that pads in its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclass_with_own_forward_is_kept_dense_and_the_rest_compressed():
    torch.manual_seed(0)
    model = nn.Sequential(StaticSamePadConv(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(),
                          nn.Linear(16 * 6 * 6, 10)).eval()
    small, report = run_checked(model, energy=0.9)
    status = {r.name: r.status for r in report.layers}
    assert "StaticSamePadConv overrides forward() of Conv2d" in status["0"]
    assert status["2"] == status["4"] == "replaced"


def test_transposed_layers_are_compressed_and_lazy_ones_listed_as_kept_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.LazyLinear(4))
    small, report = run_checked(model, rank=2)
    status = {r.name: r.status for r in report.layers}
    assert status["1"] == "replaced" and type(small[1]).__name__ == "TransposedChain"
    assert "lazy layer is not initialized" in status["2"]


class RecurrentTagger(nn.Module):
    """Embedding (tied to the output Linear) + LSTM + nn.MultiheadAttention + a raw positional table."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.rnn = nn.LSTM(16, 16, bidirectional=True, batch_first=True)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.position = nn.Parameter(torch.randn(12, 32))
        self.mix = nn.Linear(32, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        s, _ = self.rnn(self.emb(ids))
        s = s + self.position[: s.shape[1]]
        s, _ = self.mha(s, s, s)
        return self.out(self.mix(s))


def test_weights_no_method_factorizes_are_named_with_their_counts_and_reasons():
    torch.manual_seed(0)
    model = RecurrentTagger().eval()
    ids = torch.randint(0, 50, (2, 7))
    small, report = run_checked(model, rank=4)
    [note] = [n for n in report.notes if n.startswith("not factorizable")]
    lstm = sum(p.numel() for p in model.rnn.parameters() if p.dim() == 2)
    assert f"rnn LSTM {lstm:,} (recurrent weights" in note
    assert f"mha MultiheadAttention {model.mha.in_proj_weight.numel():,} (its packed in_proj_weight" in note
    status = {r.name: r.status for r in report.layers}
    assert status["mix"] == "replaced" and "never calls out_proj" in status["mha.out_proj"]
    assert type(small.mha.out_proj) is type(model.mha.out_proj)
    assert f"(model) RecurrentTagger {model.position.numel():,} (raw parameters" in note
    assert "emb " not in note  # tied to the output Linear, a candidate
    held = lstm + model.mha.in_proj_weight.numel() + model.position.numel()
    assert f"{held:,} parameters ({held / model_params(model):.1%} of the model)" in note
    assert torch.isfinite(small(ids)).all()
    with pytest.warns(UserWarning, match="fewer than 4 calibration rows"):
        _, seq_report = compress_sequential(model, [ids], ratio=0.5)
    assert note in seq_report.notes
    assert "never calls out_proj" in {r.name: r.status for r in seq_report.layers}["mha.out_proj"]


def low_rank_encoder(rank=4):
    """A 2-layer batch-first nn.TransformerEncoder whose feed-forward weights have rank ``rank``."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    with torch.no_grad():
        for layer in encoder.layers:
            for linear in (layer.linear1, layer.linear2):
                out, inp = linear.weight.shape
                linear.weight.copy_(torch.randn(out, rank) @ torch.randn(rank, inp) / inp)
    return encoder


@pytest.mark.parametrize("grad", [False, True])
def test_a_torch_transformer_encoder_runs_its_factorized_feed_forward_and_reloads(grad, tmp_path):
    from decomp_toolkit.layers import load_compressed, save_compressed

    encoder, x = low_rank_encoder(), torch.randn(2, 5, 32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    small, report = run_checked(encoder, rank=4)
    status = {r.name: r.status for r in report.layers}
    assert status["layers.0.linear1"] == status["layers.1.linear2"] == "replaced"
    assert "never calls out_proj" in status["layers.0.self_attn.out_proj"]
    assert any("fused fast path off" in n and "layers.0, layers.1" in n for n in report.notes)
    save_compressed(small, tmp_path)
    back = load_compressed(tmp_path, model=nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64,
                                                                                            batch_first=True), 2))
    with torch.set_grad_enabled(grad):
        for kwargs in ({}, dict(src_key_padding_mask=mask)):   # the fused layer path, the nested-tensor path
            kept = ~mask   # the nested-tensor path zeroes the padded positions; the module path does not
            torch.testing.assert_close(small(x, **kwargs)[kept], encoder(x, **kwargs)[kept], rtol=1e-4, atol=1e-5)
            assert torch.equal(back(x, **kwargs), small(x, **kwargs))


def test_compress_sequential_fits_a_torch_transformer_encoder_with_its_fast_path_off():
    encoder = low_rank_encoder()
    batches = [torch.randn(4, 6, 32) for _ in range(3)]
    with pytest.warns(UserWarning, match="fewer than 4 calibration rows"):
        small, report = compress_sequential(encoder, batches, include=["*linear*"],
                                            ranks={f"layers.{i}.linear{j}": 4 for i in (0, 1) for j in (1, 2)})
    status = {r.name: r.status for r in report.layers}
    assert all(status[f"layers.{i}.linear{j}"] == "replaced" for i in (0, 1) for j in (1, 2)), status
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        torch.testing.assert_close(small(batches[0]), encoder(batches[0]), rtol=1e-4, atol=1e-4)


def test_a_model_of_linears_and_convs_only_gets_no_unfactorizable_note():
    _, report = run_checked(convnet(), rank=2)
    assert not any(n.startswith("not factorizable") for n in report.notes)


def test_spatial_scheme_applies_to_convs_and_says_what_happened_to_linears():
    small, report = run_checked(convnet(), rank=2, scheme="spatial")
    assert type(small[0]).__name__ == type(small[2]).__name__ == "SpatialLowRankConv"
    assert type(small[5]).__name__ == "LowRankLinear"
    assert any("scheme= applies only to some layer kinds" in n and "5" in n for n in report.notes)


# --------------------------------------------------------------------------- 3. sharing

def test_shared_module_is_decomposed_once_and_installed_at_every_name():
    torch.manual_seed(0)
    model = nn.Module()
    model.a = model.b = nn.Linear(32, 32)
    model.c = nn.Linear(32, 8)
    model.forward = lambda x: model.c(model.b(model.a(x)))
    small, report = run_checked(model, rank=4)
    assert small.a is small.b and type(small.a).__name__ == "LowRankLinear"
    shared = [r for r in report.layers if r.name == "a"][0]
    assert shared.names == ("a", "b") and len(report.layers) == 2
    assert report.model_params_after == model_params(small) == 4 * 64 + 32 + 4 * 40 + 8
    assert any("shared module a is reached as a, b" in n for n in report.notes)
    assert "a = b" in str(report)


def test_shared_module_excluded_under_one_name_stays_dense():
    torch.manual_seed(0)
    model = nn.Sequential()
    shared = nn.Linear(16, 16)
    model.add_module("first", shared)
    model.add_module("second", shared)
    model.add_module("head", nn.Linear(16, 4))
    small, report = run_checked(model, rank=2, exclude=["second"])
    first = [r for r in report.layers if r.name == "first"][0]
    assert first.status == "skipped: excluded (as second)" and small.first is small.second
    assert isinstance(small.first, nn.Linear)


def test_tied_parameter_between_modules_is_kept_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    model[2].weight = model[0].weight
    small, report = run_checked(model, rank=2)
    status = {r.name: r.status for r in report.layers}
    assert status["0"].startswith("skipped: weight tied with 2.weight")
    assert status["2"].startswith("skipped: weight tied with 0.weight")
    assert small[0].weight is small[2].weight
    assert report.model_params_before == model_params(model) and report.model_params_after == model_params(small)


def test_inplace_with_sharing_keeps_identity():
    torch.manual_seed(0)
    model = nn.Module()
    model.a = model.b = nn.Linear(16, 16)
    model.forward = lambda x: model.b(model.a(x))
    same, report = compress(model, rank=2, inplace=True, progress=False)
    assert same is model and model.a is model.b and type(model.a).__name__ == "LowRankLinear"
    assert report.model_params_after == model_params(model)


# --------------------------------------------------------------------------- 5. hooks, buffers, parametrizations

def test_forward_hook_is_carried_over():
    model = lowrank_mlp()
    model[2].register_forward_hook(lambda module, args, out: 3.0 * out)
    small, report = run_checked(model, rank=4)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert report.layers[1].replaced


def test_forward_pre_hook_is_carried_over():
    model = lowrank_mlp()
    model[2].register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))
    small, report = run_checked(model, rank=4)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)


def test_buffer_is_carried_over():
    model = mlp()
    model[2].register_buffer("scale", torch.tensor([2.0]))
    small, report = run_checked(model, rank=4)
    assert torch.equal(small[2].scale, torch.tensor([2.0])) and "2.scale" in small.state_dict()


def test_backward_hook_keeps_the_layer_dense():
    model = mlp()
    model[2].register_full_backward_hook(lambda module, gin, gout: None)
    small, report = run_checked(model, rank=4)
    assert report.layers[1].status.startswith("skipped: has backward hooks")
    assert isinstance(small[2], nn.Linear)


def test_extra_parameter_keeps_the_layer_dense():
    model = mlp()
    model[2].register_parameter("gain", nn.Parameter(torch.ones(32)))
    small, report = run_checked(model, rank=4)
    assert "holds parameters other than weight/bias (gain)" in report.layers[1].status
    assert report.model_params_after == model_params(small)


class _Double(nn.Module):
    def forward(self, weight):
        return 2.0 * weight


def test_parametrized_layer_is_decomposed_from_its_effective_weight():
    from torch.nn.utils import parametrize
    model = lowrank_mlp()
    parametrize.register_parametrization(model[2], "weight", _Double())
    small, report = run_checked(model, rank=4)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert report.model_params_after == model_params(small)


def test_legacy_weight_norm_layer_is_decomposed_from_its_effective_weight():
    model = lowrank_mlp()
    model[2] = torch.nn.utils.weight_norm(model[2])
    with torch.no_grad():
        model[2].weight_g.mul_(2.0)  # the stored .weight is now stale until the next forward
    small, report = run_checked(model, rank=4)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-5)
    assert not hasattr(small[2], "weight_g")


# --------------------------------------------------------------------------- 4. budgets say what they count

def test_budget_counts_the_targeted_layers_by_default():
    model = convnet()
    small, report = run_checked(model, budget=dict(params=0.5), exclude=["5"])
    before, after = report.targeted_totals("params")
    assert before == sum(model_params(model[i]) for i in (0, 2)) and after <= 0.5 * before
    assert "Targeted layers:" in report.notes[0] and "whole model:" in report.notes[0]


def test_budget_of_the_whole_model():
    model = convnet()
    small, report = run_checked(model, budget=dict(params=0.5, of="model"))
    assert model_params(small) <= 0.5 * model_params(model) and report.budget.met
    assert "of the whole model" in report.notes[0]


def test_unreachable_budget_is_a_clear_miss_that_matches_the_final_model():
    model = convnet()
    small, report = run_checked(model, budget=dict(params=0.001))
    before, after = report.targeted_totals("params")
    assert not report.budget.met and "NOT met" in report.notes[0]
    assert f"reached {after:,} " in report.notes[0] and report.budget.cost == after
    assert report.model_params_after == model_params(small)


def test_flops_budget_with_dict_example_input():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = convnet()

        def forward(self, pixels):
            return self.body(pixels)

    model = Keyword().eval()
    small, report = run_checked(model, budget=dict(flops=0.5), example_input={"pixels": torch.randn(1, 3, 6, 6)})
    before, after = report.targeted_totals("flops")
    assert 0 < after <= 0.5 * before


# --------------------------------------------------------------------------- 8. reports tell the truth

def test_report_shows_the_factorized_class_and_totals_match_the_model():
    model = convnet()
    small, report = run_checked(model, energy=0.9, example_input=torch.randn(1, 3, 6, 6))
    assert {r.type for r in report.replaced} == {"Conv2d -> LowRankConv", "Linear -> LowRankLinear"}
    assert report.model_params_before == model_params(model) and report.model_params_after == model_params(small)
    text = str(report)
    assert f"model parameters: {model_params(model):,} -> {model_params(small):,}" in text


def test_pq_report_counts_the_stored_code_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    small, report = run_checked(model, method="pq", bits=2, include=["0"])
    record = report.layers[0]
    assert record.replaced and record.bits_after == small[0].size_bits < record.bits_before == 32 * (64 * 64 + 64)
    bits_after = small[0].size_bits + 32 * model_params(small[1])
    assert report.model_bits_after == bits_after and "stored size" in str(report)


def test_held_out_error_is_reported_and_correct():
    from decomp_toolkit.layers import calibrate
    model = mlp()
    data, held = torch.randn(256, 16), torch.randn(128, 16)
    cal = calibrate(model, data, progress=False)
    small, report = run_checked(model, rank=4, calibration=cal, held_out=held)
    record = report.layers[0]
    with torch.no_grad():   # the installed layer's real output error on held (its bias absorbs (W - W') mean)
        x = held.double()
        want = F.linear(x, model[0].weight.double(), model[0].bias.double())
        got = F.linear(x, small[0].dense_weight().double(), small[0].bias.double())
        norm = float(F.linear(x - data.double().mean(0), model[0].weight.double()).norm())
    assert record.held_out_error == pytest.approx(float((want - got).norm()) / norm, rel=1e-6)
    assert "held_out_error" in report.columns
    assert any("MEASURED ON THE CALIBRATION DATA" in n for n in report.notes)
    assert record.error_on == "calibration outputs"


def test_report_json_lists_shared_names():
    import json
    torch.manual_seed(0)
    model = nn.Module()
    model.a = model.b = nn.Linear(16, 16)
    model.forward = lambda x: model.b(model.a(x))
    _, report = run_checked(model, rank=2)
    data = json.loads(report.to_json())
    assert data["layers"][0]["names"] == ["a", "b"]


def test_wrong_shape_example_input_names_the_layer():
    run_checked(mlp(), ValueError, "example_input.*at 0 \\(Linear, weight \\(32, 16\\)\\).*\\(2, 7\\)", energy=0.9,
                example_input=torch.randn(2, 7))


def test_mixed_precision_and_dtype_is_kept():
    model = mlp().double()
    small, report = run_checked(model, rank=4)
    assert small[0].reduce.weight.dtype == torch.float64
    assert math.isfinite(report.layers[0].rel_error)


def test_unsupported_layer_error_is_a_value_error():
    assert issubclass(UnsupportedLayerError, ValueError)


# --------------------------------------------------------------------------- 9. every method's models export

def _spec_for(entry):
    if "rank" in entry.spec_kinds:
        return dict(rank=2)
    return dict(bits=2) if entry.name == "pq" else {}


def _method_names():
    from decomp_toolkit.layers import available_methods
    return sorted(available_methods())


@pytest.mark.parametrize("method", _method_names())
def test_every_method_compresses_a_model_that_exports_with_a_dynamic_batch(method):
    from decomp_toolkit.layers import available_methods
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                          nn.ReLU(), nn.Linear(16, 16)).eval()
    with torch.no_grad():   # a Toeplitz last layer: structured methods fit it (a random one is kept dense by ldr)
        index = torch.arange(16)
        model[5].weight.copy_(torch.randn(31)[index[:, None] - index[None, :] + 15])
    small, report = run_checked(model, method=method, **_spec_for(available_methods()[method]))
    assert report.replaced, [r.status for r in report.layers]
    exported = torch.export.export(small.eval(), (torch.randn(2, 4, 6, 6),),
                                   dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    x = torch.randn(3, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), small(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1), (2, 8, 5, 7)),
    (lambda: nn.ConvTranspose1d(6, 9, 4, stride=3, dilation=2, groups=3), (6, 11)),
    (lambda: nn.ConvTranspose3d(4, 2, 2, stride=2), (1, 4, 3, 2, 3)),
])
def test_a_transposed_conv_is_counted_as_the_adjoint_of_its_conv(make, shape):
    """MACs of ConvTransposeNd = MACs of the ConvNd it is the adjoint of, run on its output; the output shape is
    the module's own. compress (which factorizes it) and compress_sequential (which keeps it dense) count it."""
    torch.manual_seed(0)
    up = make()
    x = torch.randn(shape)
    macs, out_shape = layer_macs(up, shape)
    y = up(x)
    conv = getattr(nn, type(up).__name__.replace("Transpose", ""))(up.out_channels, up.in_channels, up.kernel_size, up.stride, up.padding, up.dilation,
                                up.groups)
    assert tuple(out_shape[1:]) == tuple(y.shape[-len(out_shape) + 1:])
    assert macs == layer_macs(conv, tuple(y.shape))[0]
    model = nn.Sequential(nn.Identity(), up).eval()
    small, report = compress(model, rank=1, example_input=x, progress=False)
    record = {r.name: r for r in report.layers}["1"]
    assert record.replaced and record.flops_before == macs and record.flops_after == small[1].flops(shape) < macs
    report = compress_sequential(model, [x], ratio=0.5, example_input=x, progress=False)[1]
    record = {r.name: r for r in report.layers}["1"]
    assert not record.replaced and record.flops_before == record.flops_after == macs


def test_include_none_means_every_layer_as_in_calibrate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).eval()
    x = torch.randn(2, 3, 6, 6)
    for run in (lambda **kw: compress(model, rank=2, fold_bn=True, progress=False, **kw),
                lambda **kw: compress_sequential(model, [x], ratio=0.5, progress=False, **kw)):
        default, given = run()[1], run(include=None)[1]
        assert [(r.name, r.status, r.rank) for r in given.layers] == [(r.name, r.status, r.rank) for r in default.layers]
