"""Sequential (asymmetric) compression, streamed block by block, on tiny random Llama models (no hub)."""
import math
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.decomp.asymmetric import asymmetric_svd, sequential_objective
from decomp_toolkit.decomp.whitened import whitened_svd
from decomp_toolkit.layers.budget import LossProfile, allocate_by_loss
from decomp_toolkit.layers.sequential import compress_sequential

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def tokens(n=8, length=16, seed=1):
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the closed form

def test_asymmetric_svd_is_the_optimum_and_its_bound_is_exact():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 12, generator=gen, dtype=torch.float64)
    Xp = X + 0.3 * torch.randn(200, 12, generator=gen, dtype=torch.float64)
    W = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    G, Gi, C = X.T @ X, Xp.T @ Xp, Xp.T @ X
    for rank in (1, 4, 9):
        fit = asymmetric_svd(W, G, Gi, C, rank)
        direct = float(torch.linalg.norm(W @ X.T - fit.to_tensor() @ Xp.T))
        assert math.isclose(fit.error_bound, direct, rel_tol=1e-8)
        assert math.isclose(fit.error, direct, rel_tol=1e-8)
        white = whitened_svd(W, G, rank=rank).to_tensor()
        assert fit.error_bound <= sequential_objective(W, white, G, Gi, C) * (1 + 1e-12)
        for _ in range(5):  # random rank-k perturbations of the optimum never do better
            A = fit.A + 0.01 * torch.randn(fit.A.shape, generator=gen, dtype=torch.float64)
            assert sequential_objective(W, A @ fit.B, G, Gi, C) >= fit.error_bound * (1 - 1e-12)


def test_asymmetric_svd_equals_whitened_svd_when_inputs_agree():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(100, 10, generator=gen, dtype=torch.float64)
    W = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    G = X.T @ X
    fit = asymmetric_svd(W, G, G, G, 3)
    assert torch.allclose(fit.to_tensor(), whitened_svd(W, G, rank=3).to_tensor(), atol=1e-10)


def test_asymmetric_svd_rejects_a_bad_rank_naming_the_shape():
    G = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(3, 4\).*rank=5 is outside \[1, 3\]"):
        asymmetric_svd(torch.ones(3, 4, dtype=torch.float64), G, G, G, 5)


# ----------------------------------------------------------------------------- the model-level pass

def test_sequential_never_worse_than_the_nonsequential_fit_layerwise():
    model = tiny_llama()
    small, report = compress_sequential(model, tokens(), ratio=0.5, include="model.layers.*", batch_size=4,
                                        progress=False, compare=True)
    assert len(report.fits) == 21
    for name, fit in report.fits.items():
        assert fit.error_bound <= fit.diagnostics["nonsequential"] * (1 + 1e-9) + 1e-12, name
        if fit.diagnostics["jitter"] == 0:   # the bound is exact; with a jitter (singular input Gram) an upper bound
            assert math.isclose(fit.error, fit.error_bound, rel_tol=1e-6, abs_tol=1e-9), name
        else:
            assert fit.error <= fit.error_bound * (1 + 1e-9), name
    # the report's totals are the model's own parameter count
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    assert all(r.replaced for r in report.layers)
    assert sum(p.numel() for p in model.parameters()) == report.model_params_before  # input model unchanged


def test_sequential_beats_nonsequential_end_to_end_on_the_calibration_outputs():
    from decomp_toolkit.layers import calibrate, compress

    model, ids = tiny_llama(seed=3), tokens(16, 16, seed=4)
    seq, _ = compress_sequential(model, ids, ratio=0.6, include="model.layers.*", batch_size=8, progress=False)
    cal = calibrate(model, ids, layers="model.layers.*", batch_size=8, progress=False)
    plain, _ = compress(model, method="svd", ratio=0.6, calibration=cal, include=["model.layers.*"], progress=False)
    with torch.no_grad():
        ref = model(ids).logits
        assert (seq(ids).logits - ref).norm() < (plain(ids).logits - ref).norm()


def test_streaming_microbatches_give_the_same_factors_as_one_batch():
    model, ids = tiny_llama(seed=5).double(), tokens(8, 16, seed=6)
    one, _ = compress_sequential(model, ids, ratio=0.5, include="model.layers.*", batch_size=8, progress=False)
    streamed, _ = compress_sequential(model, ids, ratio=0.5, include="model.layers.*", batch_size=2,
                                      progress=False, device="cpu")
    _assert_same_compression(_fitted(one, ids), _fitted(streamed, ids), atol=1e-9)


def _fitted(model, ids):
    """``(weights, jitters, logits)`` of a compressed model: each factorized layer's product and whitening
    jitter, and the model's logits on ``ids``."""
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "dense_weight")}
    with torch.no_grad():
        logits = model(ids).logits
    return ({n: m.dense_weight().detach() for n, m in layers.items()},
            {n: m.fit.diagnostics["jitter"] for n, m in layers.items()}, logits)


def _assert_same_compression(a, b, atol):
    """Equal factors for every layer whose calibration inputs span its input space; a layer whose inputs in the
    compressed model lie in a subspace (an o_proj after a low-rank v_proj shared by grouped heads: whitening
    jitter > 0) is free off that subspace, so it is compared through the model's outputs."""
    (weights_a, jitter_a, logits_a), (weights_b, _, logits_b) = a, b
    assert set(weights_a) == set(weights_b)
    for name, weight in weights_a.items():
        if jitter_a[name] == 0:
            assert torch.allclose(weight, weights_b[name], atol=atol), name
    assert torch.allclose(logits_a, logits_b, rtol=1e-7, atol=1e-7)


def test_linear_with_bias_and_conv_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
                          nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10)))
    x = torch.randn(32, 3, 6, 6)
    small, report = compress_sequential(model, x, ratio=0.5, batch_size=16, blocks=["0", "1", "2"], progress=False,
                                        compare=True)
    assert [r.replaced for r in report.layers] == [True, True, True]
    for name, fit in report.fits.items():
        assert fit.error_bound <= fit.diagnostics["nonsequential"] * (1 + 1e-9) + 1e-9, name
    with torch.no_grad():
        assert small(x).shape == (32, 10)
        # the last layer's certified error is its measured output error against the original outputs
        ref_in = model[:2](x).flatten(1)
        got_in = small[:2](x).flatten(1)
        err = (model[2][1](ref_in) - small[2][1](got_in)).norm()
    fit = report.fits["2.1"]
    assert math.isclose(float(err), fit.error_bound, rel_tol=1e-4)
    assert small[2][1].fit is fit and fit.error_kind == "output"


def test_rank_requests_are_validated():
    model, ids = tiny_llama(), tokens(4)
    with pytest.raises(ValueError, match="exactly one"):
        compress_sequential(model, ids, ratio=0.5, ranks={}, progress=False)
    with pytest.raises(ValueError, match=r"ranks\['model.layers.0.mlp.up_proj'\]=99"):
        compress_sequential(model, ids, ranks={"model.layers.0.mlp.up_proj": 99}, include="model.layers.*",
                            progress=False)
    with pytest.raises(ValueError, match="include pattern 'nothing\\*' matches no layer"):
        compress_sequential(model, ids, ratio=0.5, include="nothing*", progress=False)
    with pytest.raises(ValueError, match="exclude pattern 'model.layer.0.\\*' matches no layer"):   # a typo
        compress_sequential(model, ids, ratio=0.5, exclude=("model.layer.0.*",), progress=False)
    with pytest.raises(ValueError, match="select no"):
        compress_sequential(model, ids, ratio=0.5, include="model.*", exclude=("model.*",), progress=False)


# ----------------------------------------------------------------------------- attention masks (padding rows)

class _TokenBlock(nn.Module):
    """``x + down(tanh(up(x)))`` on ``x (B, T, D)``, token by token; the mask ``(B, T)`` passes through."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x, attention_mask):
        return x + self.down(torch.tanh(self.up(x)))


class _PaddedEncoder(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T)) -> (B, D)``: embedding, two token-wise blocks and
    the masked mean over the real tokens, so padding positions change no real token's output; the padding
    token (id 0) embeds far from the others."""

    def __init__(self, vocab=64, dim=8, hidden=12):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.emb.weight[0] = 20 * torch.randn(dim)
        self.blocks = nn.ModuleList(_TokenBlock(dim, hidden) for _ in range(2))

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        keep = attention_mask[..., None].to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1)


def _padded_and_unpadded(lengths=((9, 9, 6, 6), (8, 4, 8, 4))):
    """The same sequences as padded dict batches (one per entry of ``lengths``, padded with id 0 to the
    longest) and as unpadded dict batches of equal-length sequences (all-ones masks)."""
    gen = torch.Generator().manual_seed(3)
    padded, unpadded = [], []
    for batch in lengths:
        seqs = [torch.randint(1, 64, (n,), generator=gen) for n in batch]
        T = max(batch)
        ids = torch.stack([torch.cat([s, s.new_zeros(T - len(s))]) for s in seqs])
        mask = (torch.arange(T)[None] < torch.tensor(batch)[:, None]).long()
        padded.append(dict(input_ids=ids, attention_mask=mask))
        for n in sorted(set(batch), reverse=True):
            same = torch.stack([s for s in seqs if len(s) == n])
            unpadded.append(dict(input_ids=same, attention_mask=torch.ones_like(same)))
    return padded, unpadded


def _factors(model):
    return {n: m.dense_weight().detach() for n, m in model.named_modules() if hasattr(m, "dense_weight")}


def test_attention_mask_leaves_the_padding_rows_out_of_the_sequential_fit():
    from decomp_toolkit.layers.sequential import layer_loss_profiles

    model = _PaddedEncoder().double().eval()
    padded, unpadded = _padded_and_unpadded()
    pads = sum(int((b["attention_mask"] == 0).sum()) for b in padded)
    masked, report = compress_sequential(model, padded, ratio=0.5, progress=False)
    plain, plain_report = compress_sequential(model, unpadded, ratio=0.5, progress=False)
    names = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert report.masked == {n: pads for n in names} and pads == 14
    assert plain_report.masked == {n: 0 for n in names}
    got, want = _factors(masked), _factors(plain)
    assert sorted(got) == sorted(names)
    for name in names:   # the fit sees exactly the real tokens' rows
        assert torch.allclose(got[name], want[name], rtol=1e-7, atol=1e-7), name
        assert math.isclose(report.fits[name].error_bound, plain_report.fits[name].error_bound, rel_tol=1e-7)
    # the same padded batches run as tuples (the mask unseen) fit the padding rows too
    tuples = [(b["input_ids"], b["attention_mask"]) for b in padded]
    unmasked, unmasked_report = compress_sequential(model, tuples, ratio=0.5, forward=lambda m, b: m(*b),
                                                    progress=False)
    assert unmasked_report.masked == {}
    assert max(float((_factors(unmasked)[n] - want[n]).abs().max()) for n in names) > 1e-2
    # the budget's loss profiles (input Grams and row counts) leave them out as well
    layers, blocks = {n: model.get_submodule(n) for n in names}, ["blocks.0", "blocks.1"]
    loss = lambda m, b: m(**b).pow(2).sum()  # noqa: E731  (the same per sequence, padded or not)
    with_pads = layer_loss_profiles(model, layers, padded, blocks, loss=loss)
    without = layer_loss_profiles(model, layers, unpadded, blocks, loss=loss)
    for name in names:
        assert torch.allclose(torch.as_tensor(with_pads[name].losses), torch.as_tensor(without[name].losses),
                              rtol=1e-7, atol=1e-12), name


# ----------------------------------------------------------------------------- the allocator

def test_loss_allocator_meets_the_budget_within_one_rank_step():
    gen = torch.Generator().manual_seed(0)
    profiles = {}
    for i in range(12):
        m, n = [(32, 32), (16, 32), (48, 32), (32, 48)][i % 4]
        losses = torch.rand(min(m, n), generator=gen).sort(descending=True).values * (i + 1)
        profiles[f"l{i}"] = LossProfile(losses=losses.numpy(), step=m + n, dense_cost=m * n, min_rank=2)
    dense = sum(p.dense_cost for p in profiles.values())
    for fraction in (0.3, 0.5, 0.8):
        target = fraction * dense
        alloc = allocate_by_loss(profiles, target)
        assert alloc.met and alloc.cost <= target
        assert alloc.cost == sum(p.cost(None if r is None else r[0]) for p, r in
                                 zip(profiles.values(), alloc.ranks.values()))
        for name, r in alloc.ranks.items():  # no layer could take one more rank step
            p = profiles[name]
            if r is None:
                continue
            assert r[0] >= p.min_rank
            nxt = p.cost(r[0] + 1) if r[0] + 1 <= p.max_rank else p.dense_cost
            assert alloc.cost + nxt - p.cost(r[0]) > target


def test_loss_allocator_is_optimal_on_a_small_case():
    import itertools
    profiles = {"a": LossProfile(losses=[5.0, 1.0, 0.5, 0.1], step=8, dense_cost=16),
                "b": LossProfile(losses=[9.0, 4.0, 0.2, 0.1], step=8, dense_cost=16)}
    for target in (16, 24, 32):
        alloc = allocate_by_loss(profiles, target)
        best = min((sum(p.loss(r) for p, r in zip(profiles.values(), c)), c)
                   for c in itertools.product([1, None], repeat=2)
                   if sum(p.cost(r) for p, r in zip(profiles.values(), c)) <= target)
        assert math.isclose(alloc.objective, best[0])


def test_budget_report_matches_the_model():
    model = tiny_llama(seed=2)
    small, report = compress_sequential(model, tokens(8), budget=dict(layer_params=0.5), include="model.layers.*",
                                        batch_size=4, progress=False, min_rank={"*": 2})
    layer_params = sum(r.params_after for r in report.layers)
    dense = sum(r.params_before for r in report.layers)
    assert layer_params == report.budget.cost <= 0.5 * dense
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
    for r in report.layers:
        assert (not r.replaced) or r.rank >= 2
    assert any("budget met" in note for note in report.notes)
    assert len(report.rank_table().splitlines()) == 21


# ----------------------------------------------------------------------------- distributed (2 gloo processes)

def _worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from decomp_toolkit.layers import calibrate
    from decomp_toolkit.layers.distributed import all_reduce_calibration

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, ids = tiny_llama(seed=7).double(), tokens(8, 16, seed=8)
        shard = ids[rank * 4:(rank + 1) * 4]
        cal = all_reduce_calibration(calibrate(model, shard, layers="model.layers.*", batch_size=2, progress=False))
        small, _ = compress_sequential(model, shard, ratio=0.5, include="model.layers.*", batch_size=2,
                                       progress=False)
        if rank == 0:
            torch.save({"grams": cal.grams, "samples": cal.samples,
                        "ess": {n: cal.effective_samples(n) for n in cal.grams},
                        "rho": {n: cal.autocorrelation(n) for n in cal.grams},
                        "fitted": _fitted(small, ids)}, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process():
    import torch.multiprocessing as mp

    from decomp_toolkit.layers import calibrate

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        got = torch.load(os.path.join(tmp, "dist.pt"))
    model, ids = tiny_llama(seed=7).double(), tokens(8, 16, seed=8)
    cal = calibrate(model, ids, layers="model.layers.*", batch_size=2, progress=False)
    assert set(got["grams"]) == set(cal.grams)
    for name in cal.grams:
        assert got["samples"][name] == cal.samples[name]
        assert torch.allclose(got["grams"][name], cal.grams[name], rtol=1e-12, atol=1e-9)
        assert got["rho"][name] == pytest.approx(cal.autocorrelation(name), rel=1e-9, abs=1e-12)
        assert got["ess"][name] == pytest.approx(cal.effective_samples(name), rel=1e-9)
    small, _ = compress_sequential(model, ids, ratio=0.5, include="model.layers.*", batch_size=2, progress=False)
    _assert_same_compression(_fitted(small, ids), got["fitted"], atol=1e-8)


# ----------------------------------------------------------------------------- recovery

def test_recover_trains_only_factors_and_never_worsens_heldout():
    from decomp_toolkit.layers.recover import factor_parameters, heldout_perplexity, recover

    model = tiny_llama(seed=9)
    small, _ = compress_sequential(model, tokens(8, 16, seed=10), ratio=0.4, include="model.layers.*",
                                   batch_size=8, progress=False)
    train, heldout = tokens(32, 16, seed=11), tokens(8, 16, seed=12)
    frozen = {n: p.detach().clone() for n, p in small.named_parameters()
              if not any(p is q for q in factor_parameters(small))}
    before = heldout_perplexity(small, heldout)
    out, log = recover(small, model, train, heldout, seconds=None, max_tokens=4 * 15 * 6, lr=1e-2,
                       batch_size=4, eval_every=2, progress=False)
    assert out is small and log.steps == 6 and log.tokens == 6 * 4 * 15
    assert math.isclose(log.before, before)
    after = heldout_perplexity(small, heldout)
    assert after <= before * (1 + 1e-6) and math.isclose(after, log.best, rel_tol=1e-6)
    for n, p in small.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert [p.requires_grad for p in small.parameters()] == [True] * len(list(small.parameters()))


def test_recover_with_a_huge_learning_rate_keeps_the_starting_point():
    from decomp_toolkit.layers.recover import heldout_perplexity, recover

    model = tiny_llama(seed=13)
    small, _ = compress_sequential(model, tokens(8, 16), ratio=0.5, include="model.layers.*", progress=False)
    heldout = tokens(8, 16, seed=14)
    before = heldout_perplexity(small, heldout)
    _, log = recover(small, None, tokens(16, 16, seed=15), heldout, seconds=None, max_tokens=4 * 15 * 3, lr=50.0,
                     eval_every=1, progress=False)
    assert heldout_perplexity(small, heldout) <= before * (1 + 1e-6)
    with pytest.raises(ValueError, match="budget"):
        recover(small, None, tokens(4), heldout, seconds=None, max_tokens=None)


# ----------------------------------------------------------------------------- the real model (make bench)

@pytest.mark.slow
def test_smollm2_sequential_budget_beats_uniform_whitened():
    from decomp_toolkit.analysis.zoo import ZOO
    from decomp_toolkit.analysis.zoo.smollm2 import DECODER_LINEARS, load_smollm2, perplexity, token_windows
    from decomp_toolkit.layers import calibrate, compress

    if not ZOO["smollm2-135m"].installed():
        pytest.skip(ZOO["smollm2-135m"].install)
    model = load_smollm2()
    calib, test = token_windows("calibration", 8, 256), token_windows("test", 8, 256)
    cal = calibrate(model, calib, layers=DECODER_LINEARS, batch_size=8, progress=False)
    uniform, _ = compress(model, method="svd", ratio=0.8, calibration=cal, include=[DECODER_LINEARS], progress=False)
    small, report = compress_sequential(model, calib, budget=dict(layer_params=0.8), include=DECODER_LINEARS,
                                        batch_size=8, progress=False, min_rank={"*": 0.05})
    dense = sum(r.params_before for r in report.layers)
    assert len(report.layers) == 210 and report.budget.cost <= 0.8 * dense
    assert report.budget.cost == sum(r.params_after for r in report.layers)
    assert perplexity(small, test) < perplexity(uniform, test)
