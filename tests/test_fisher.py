"""Output Fisher (layers.fisher) and the loss-aware budget of compress(budget=, calibration=calibrate(fisher=True))."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import calibrate, compress
from decomp_toolkit.layers.budget import rank_floor
from decomp_toolkit.layers.fisher import (CausalLMLoss, OutputProjectionLoss, default_sensitivity_loss,
                                          fisher_weighted_spectrum, layer_fisher)
from decomp_toolkit.layers.lowrank import LowRankLinear


def _mlp(seed=0, widths=(12, 24, 16, 10)):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    model = nn.Sequential(*layers[:-1]).double()
    # low-rank-ish weights with different scales, so layers differ in sensitivity
    with torch.no_grad():
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                u, v = torch.randn(m.out_features, 4, dtype=torch.float64), torch.randn(4, m.in_features,
                                                                                       dtype=torch.float64)
                m.weight.copy_((u @ v) / (2 + i) + 0.05 * torch.randn_like(m.weight))
    return model


def test_last_layer_fisher_is_the_sum_of_the_squared_projection_directions():
    model, x = _mlp(), torch.randn(40, 12, dtype=torch.float64)
    fisher = layer_fisher(model, ["4"], x, batch_size=16, chunk_size=0)
    generator = torch.Generator().manual_seed(0)
    expected = sum(torch.randn((len(b), 10), generator=generator, dtype=torch.float32).double().pow(2).sum(0)
                   for b in x.split(16))
    torch.testing.assert_close(fisher["4"], expected)


def test_fisher_leaves_the_model_as_it_was():
    model, x = _mlp(), torch.randn(20, 12, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    layer_fisher(model, ["0", "2", "4"], x)
    assert model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_uniform_fisher_weights_give_the_squared_spectrum():
    A = torch.randn(3, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(fisher_weighted_spectrum(A, torch.ones(21)),
                               torch.linalg.svdvals(A).pow(2).sum(0))
    B = torch.randn(6, 5, dtype=torch.float64)
    F = torch.zeros(6)
    F[2] = 3.0
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    torch.testing.assert_close(fisher_weighted_spectrum(B, F), 3.0 * S ** 2 * U[2] ** 2)
    with pytest.raises(ValueError, match="fisher has 5 entries"):
        fisher_weighted_spectrum(B, torch.ones(5))


def test_default_loss_picks_cross_entropy_for_token_models_and_projection_otherwise():
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, ids):
            return type("Out", (), {"logits": self.head(self.emb(ids))})()

    ids = torch.randint(0, 11, (2, 5))
    assert isinstance(default_sensitivity_loss(TinyLM(), ids), CausalLMLoss)
    assert isinstance(default_sensitivity_loss(_mlp(), torch.randn(3, 12, dtype=torch.float64)), OutputProjectionLoss)
    fisher = layer_fisher(TinyLM(), ["head"], ids)
    assert fisher["head"].shape == (11,) and torch.isfinite(fisher["head"]).all() and fisher["head"].sum() > 0


def test_calibrate_fisher_refuses_one_shot_iterators():
    model = _mlp()
    with pytest.raises(TypeError, match="runs the data twice"):
        calibrate(model, iter([torch.randn(4, 12, dtype=torch.float64)]), fisher=True, progress=False)


def _calibrated(model, fisher=True):
    x = torch.randn(256, 12, dtype=torch.float64)
    return calibrate(model, x, fisher=fisher, batch_size=64, progress=False)


def test_loss_budget_meets_the_budget_within_one_rank_step_and_counts_the_model_itself():
    model = _mlp()
    cal = _calibrated(model)
    assert set(cal.fisher) == {"0", "2", "4"}
    small, report = compress(model, method="svd", budget=dict(params=0.5), calibration=cal, progress=False)
    dense = sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel() for n in ("0", "2", "4"))
    after = sum(p.numel() for n in ("0", "2", "4") for p in small.get_submodule(n).parameters())
    steps = [m.in_features + m.out_features for m in (model[0], model[2], model[4])]
    assert after <= 0.5 * dense and 0.5 * dense - after < max(steps) + max(m.out_features for m in model
                                                                           if isinstance(m, nn.Linear))
    assert report.totals()["model_params_after"] == sum(p.numel() for p in small.parameters())
    assert any("estimated loss increase" in note for note in report.notes)
    assert report.budget.objective is not None


def test_min_rank_floors_every_replaced_layer():
    model = _mlp()
    cal = _calibrated(model)
    small, report = compress(model, method="svd", budget=dict(params=0.5, min_rank=0.25), calibration=cal,
                             progress=False)
    replaced = 0
    for name in ("0", "2", "4"):
        module, full = small.get_submodule(name), min(model.get_submodule(name).weight.shape)
        if isinstance(module, LowRankLinear):
            replaced += 1
            assert module.rank >= rank_floor(name, full, {"*": 0.25}) == int(np.ceil(0.25 * full))
    assert replaced >= 1 and report.budget.met
    _, tight = compress(model, method="svd", budget=dict(params=0.3, min_rank=0.5), calibration=cal, progress=False)
    assert not tight.budget.met and "NOT met" in tight.notes[0]


def test_min_rank_without_fisher_and_bad_values_are_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="min_rank= applies to the loss allocator"):
        compress(model, method="svd", budget=dict(params=0.5, min_rank=2), calibration=_calibrated(model, False),
                 progress=False)
    for bad in (0, 1.5, "x", True):
        with pytest.raises(ValueError, match="min_rank values"):
            compress(model, method="svd", budget=dict(params=0.5, min_rank=bad), progress=False)


def test_dict_batches_get_the_output_sensitivity_of_the_first_output_tensor():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.proj = nn.Embedding(13, 6), nn.Linear(6, 4)

        def forward(self, input_ids, attention_mask):
            hidden = self.proj(self.emb(input_ids)) * attention_mask[..., None]
            return {"pooled": hidden.mean(1), "ids": input_ids}

    torch.manual_seed(0)
    batches = [dict(input_ids=torch.randint(0, 13, (3, 5)), attention_mask=torch.ones(3, 5)) for _ in range(2)]
    cal = calibrate(Encoder(), batches, fisher=True, progress=False)
    assert set(cal.fisher) == {"proj"} and cal.fisher["proj"].shape == (4,)
    assert torch.isfinite(cal.fisher["proj"]).all() and (cal.fisher["proj"] > 0).all()


def test_fisher_follows_the_output_rescaling_of_bn_aware_compression():
    from decomp_toolkit.layers.compress import fisher_in_output_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.1, 4.0)
        model[1].weight.uniform_(0.5, 2.0)
    x = torch.randn(16, 3, 10, 10)
    cal = calibrate(model, x, fisher=True, progress=False)
    scaled = nn.Conv2d(3, 8, 3, padding=1)
    c = model[1].weight.detach() / torch.sqrt(model[1].running_var + model[1].eps)
    with torch.no_grad():
        scaled.weight.copy_(model[0].weight * c.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(fisher_in_output_scale(cal, "0", scaled), cal.fisher["0"].double() / c.double() ** 2)
    torch.testing.assert_close(fisher_in_output_scale(cal, "0", model[0]), cal.fisher["0"].double())
    small, report = compress(model, method="svd", budget=dict(params=0.6), calibration=cal, progress=False)
    assert report.budget.met and any("estimated loss increase" in n for n in report.notes)
    assert any(n.startswith("bn_aware") for n in report.notes)


def test_the_language_model_loss_follows_the_decoder_ids_of_an_encoder_decoder():
    """T5: the logits are over decoder positions, so the next-token targets are decoder_input_ids (a shorter
    sequence than input_ids: the cross-entropy on input_ids raised); with labels the model's own loss is used."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(num_layers=1, num_decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                                   vocab_size=40, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    batch = {"input_ids": torch.randint(0, 40, (3, 9)), "decoder_input_ids": torch.randint(0, 40, (3, 5))}
    with torch.no_grad():
        loss = default_sensitivity_loss(model, batch)
        logits = model(**batch).logits
        expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), batch["decoder_input_ids"][:, 1:].reshape(-1))
        assert isinstance(loss, CausalLMLoss)
        assert torch.allclose(loss(model, batch), expected)
        labelled = {"input_ids": batch["input_ids"], "labels": batch["decoder_input_ids"]}
        assert torch.allclose(loss(model, labelled), model(**labelled).loss)
    fisher = calibrate(model, [batch], progress=False, fisher=True).fisher
    assert fisher and all(bool(torch.isfinite(f).all()) and float(f.sum()) > 0 for f in fisher.values())


def test_logits_that_do_not_match_the_ids_are_refused_with_the_shapes():
    class Pooled(nn.Module):   # (batch, tokens) ids in, one (batch, 1, vocab) logit row out
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 20)

        def forward(self, ids):
            return self.head(self.embed(ids).mean(1, keepdim=True))

    with pytest.raises(ValueError, match=r"logits have shape \(2, 1, 20\).*token ids of shape \(2, 6\).*loss="):
        CausalLMLoss()(Pooled(), torch.randint(0, 20, (2, 6)))
