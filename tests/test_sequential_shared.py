"""compress_sequential's shared statistics: layers reading the same tensor (q/k/v, gate/up) share one
accumulation, with results identical to per-layer statistics; the loss profiles' component losses from
the eigendecomposition of the smaller Gram equal the SVD formula."""
import numpy as np
import pytest
import torch

from decomp_toolkit.layers.calibrate import calibrate
from decomp_toolkit.layers.fisher import fisher_weighted_spectrum
from decomp_toolkit.layers.sequential import (_reference_pass, component_losses, compress_sequential,
                                              layer_loss_profiles, output_fisher)

pytest.importorskip("transformers")
from test_sequential import tiny_llama, tokens  # noqa: E402


def block_stream(model, ids):
    """``[(args, kwargs)]`` the first decoder block receives, one per 4-row microbatch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise StopIteration

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for batch in ids.split(4):
        try:
            with torch.no_grad():
                model(batch)
        except StopIteration:
            pass
    handle.remove()
    return captured


def test_layers_reading_one_tensor_record_one_object():
    model = tiny_llama(layers=2)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    inputs, _ = _reference_pass(model.model.layers[0], block_stream(model, tokens()), names)
    for j in range(2):
        assert inputs["self_attn.q_proj"][j] is inputs["self_attn.k_proj"][j] is inputs["self_attn.v_proj"][j]
        assert inputs["mlp.gate_proj"][j] is inputs["mlp.up_proj"][j]
        assert inputs["self_attn.o_proj"][j] is not inputs["self_attn.q_proj"][j]


def test_shared_statistics_give_the_fits_of_per_layer_statistics():
    """k and v share q's statistics (up shares gate's); each layer alone gets the same fit."""
    model, ids = tiny_llama(seed=3, layers=2), tokens(seed=4)
    prefix = "model.layers.0."
    for group in ({"self_attn.q_proj": 4, "self_attn.k_proj": 3, "self_attn.v_proj": 2},
                  {"mlp.gate_proj": 5, "mlp.up_proj": 6}):
        ranks = {prefix + n: r for n, r in group.items()}
        together, report = compress_sequential(model, ids, ranks=ranks, batch_size=4, progress=False,
                                               include=list(ranks))
        for name, rank in ranks.items():
            alone, single = compress_sequential(model, ids, ranks={name: rank}, batch_size=4, progress=False,
                                                include=name)
            assert torch.equal(together.get_submodule(name).dense_weight(),
                               alone.get_submodule(name).dense_weight()), name
            assert report.fits[name].error_bound == single.fits[name].error_bound


def test_loss_profiles_of_shared_inputs_equal_those_of_each_layers_own_gram():
    model, ids = tiny_llama(seed=5, layers=2), tokens(seed=6)
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    layers = {n: model.get_submodule(n) for n in names}
    batches = list(ids.split(4))
    profiles = layer_loss_profiles(model, layers, batches, [f"model.layers.{i}" for i in range(2)])
    fisher = output_fisher(model, names, batches)
    cal = calibrate(model, ids, include="model.layers.*", batch_size=4, progress=False)   # one Gram per layer
    for name in names:
        own = component_losses(layers[name], cal[name][0], fisher[name], rows=cal.samples[name]).numpy()
        assert profiles[name].losses.shape == own.shape
        assert np.allclose(profiles[name].losses, own, rtol=1e-8, atol=1e-12 * own.max()), name


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (7, 7), (2, 3, 8), (2, 8, 3)])
def test_fisher_weighted_spectrum_equals_the_svd_formula(shape):
    gen = torch.Generator().manual_seed(7)
    M = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, shape[-1], dtype=torch.float64)
    F = torch.rand(shape[-2] * (shape[0] if len(shape) == 3 else 1), generator=gen, dtype=torch.float64)
    batched = M if M.ndim == 3 else M[None]
    U, S, _ = torch.linalg.svd(batched, full_matrices=False)
    expected = (S ** 2 * (F.reshape(batched.shape[0], -1, 1) * U ** 2).sum(1)).sum(0)
    got = fisher_weighted_spectrum(M, F)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12 * float(expected.max()))


def test_inplace_compression_reports_the_layers_it_replaced():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    dense_params = [sum(p.numel() for p in model[i].parameters()) for i in (0, 2)]
    x = torch.randn(64, 12)
    same, report = compress_sequential(model, x, ratio=0.5, blocks=[""], inplace=True, progress=False)
    assert same is model and all(type(model[i]).__name__ == "LowRankLinear" for i in (0, 2))
    assert [r.params_before for r in report.layers] == dense_params
    assert [r.type for r in report.layers] == ["Linear", "Linear"]
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
