"""calibrate(): layers reading the same tensor share one Gram computation, with results identical to
per-layer Grams; the float64 symmetric Gram kernel; a causal LM's unused logits are skipped."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from decomp_toolkit.layers.calibrate import (GRAM_BLOCK_ROWS, calibrate, gram_and_sum, gram_of, input_gram,
                                             unused_logits_kwargs)


class Attention(nn.Module):
    """q, k, v read the same tensor; o reads another; ``inplace`` modifies the input between k and v."""

    def __init__(self, inplace=False):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 6)
        self.inplace = inplace

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        if self.inplace:
            x.mul_(2.0)
        return self.o(q * k + self.v(x))


def recorded_grams(model, data):
    """Per-layer Grams from each layer's own recorded inputs (the reference)."""
    grams, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def keep(mod, args, name=name):
                G = input_gram(mod, args[0])[0]
                grams[name] = grams[name] + G if name in grams else G
            hooks.append(module.register_forward_pre_hook(keep))
    with torch.no_grad():
        for batch in data.split(4):
            model(batch.clone())
    for h in hooks:
        h.remove()
    return grams


def test_shared_input_grams_equal_per_layer_grams_exactly_and_do_not_share_storage():
    torch.manual_seed(0)
    model, data = Attention(), torch.randn(12, 3, 6)
    cal = calibrate(model, data, batch_size=4, progress=False)
    reference = recorded_grams(model, data)
    assert sorted(cal.names()) == sorted(reference)
    for name, G in reference.items():
        assert torch.equal(cal[name], G), name
    assert torch.equal(cal["q"], cal["k"]) and torch.equal(cal["k"], cal["v"])
    assert cal["q"].data_ptr() != cal["k"].data_ptr()      # entries are independent tensors
    before = cal["k"].clone()
    cal.grams["q"] += 1.0
    assert torch.equal(cal["k"], before)
    assert cal.samples["q"] == cal.samples["v"] == 36


def test_an_input_modified_in_place_between_layers_gets_its_own_gram():
    torch.manual_seed(1)
    model, data = Attention(inplace=True), torch.randn(8, 3, 6)
    cal = calibrate(model, data.clone(), batch_size=4, progress=False)   # the model scales its input in place
    reference = recorded_grams(model, data)
    assert torch.allclose(cal["v"], 4 * cal["q"], rtol=1e-12)   # v saw 2x
    for name, G in reference.items():
        assert torch.equal(cal[name], G), name


def test_gram_of_is_the_exactly_symmetric_float64_product():
    gen = torch.Generator().manual_seed(2)
    for shape in ((50, 7), (3, 40), (1, 1), (0, 5)):
        rows = torch.randn(*shape, generator=gen)
        G = gram_of(rows)
        R = rows.double()
        assert G.dtype == torch.float64 and G.shape == (shape[1], shape[1])
        assert torch.equal(G, G.T)
        assert torch.allclose(G, R.T @ R, rtol=1e-13, atol=1e-13 * max(1.0, float((R * R).sum())))


@settings(max_examples=25)
@given(rows=st.integers(0, 5000), cols=st.integers(1, 24), offset=st.floats(-50, 50), seed=st.integers(0, 2 ** 16))
def test_gram_of_float32_products_are_within_their_rounding_bound(rows, cols, offset, seed):
    """float32 products in blocks of GRAM_BLOCK_ROWS rows, blocks summed in float64: each entry within the
    worst-case bound gamma_B sum_r |x_ri x_rj| (B = block rows, gamma_B = B u / (1 - B u)), exactly symmetric."""
    R = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + offset
    G = gram_of(R, torch.float32)
    exact = R.double().T @ R.double()
    u = 2.0 ** -24
    gamma = GRAM_BLOCK_ROWS * u / (1 - GRAM_BLOCK_ROWS * u)
    bound = gamma * (R.double().abs().T @ R.double().abs()) + 1e-300
    assert G.dtype == torch.float64 and torch.equal(G, G.T)
    assert bool(((G - exact).abs() <= bound).all())


@settings(max_examples=25)
@given(rows=st.integers(0, 1300), cols=st.integers(1, 24), offset=st.floats(-50, 50), seed=st.integers(0, 2 ** 16),
       float32=st.booleans())
def test_gram_and_sum_is_gram_of_and_the_row_sum(rows, cols, offset, seed, float32):
    """One product of the rows with a ones column: the Gram block equals gram_of (float64 products: to
    rounding of the sums; float32 products: each within the float32 bound, as BLAS may sum the augmented
    buffer in another order), the sum is exact in float64 and within the float32 products' bound otherwise."""
    R = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + offset
    products = torch.float32 if float32 else torch.float64
    G, S = gram_and_sum(R, products)
    exact_sum = R.double().sum(0)
    assert G.dtype == S.dtype == torch.float64 and G.shape == (cols, cols) and S.shape == (cols,)
    assert torch.equal(G, G.T)
    u = 2.0 ** -24 if float32 else 2.0 ** -53
    block = GRAM_BLOCK_ROWS if float32 else max(rows, 1)
    gamma = block * u / (1 - block * u)
    magnitude = R.double().abs().T @ R.double().abs()
    assert bool(((G - gram_of(R, products)).abs() <= 2 * gamma * magnitude + 1e-300).all())
    bound = gamma * R.double().abs().sum(0) + 1e-300
    assert bool(((S - exact_sum).abs() <= bound).all())


def test_calibrate_gram_precision_float32_is_close_and_a_bad_value_raises():
    torch.manual_seed(0)
    model, data = Attention(), torch.randn(12, 3, 6)
    exact = calibrate(model, data, batch_size=4, progress=False)
    fast = calibrate(model, data, batch_size=4, progress=False, gram_precision="float32")
    for name in exact.names():
        assert torch.allclose(fast[name], exact[name], rtol=1e-5, atol=1e-5 * float(exact[name].abs().max()))
    assert not all(torch.equal(fast[n], exact[n]) for n in exact.names())   # really float32 products
    with pytest.raises(ValueError, match="gram_precision='float16' is not one of"):
        calibrate(model, data, progress=False, gram_precision="float16")


class TinyLM(nn.Module):
    """A causal-LM-like module with a ``transformers``-style ``logits_to_keep`` argument."""

    def __init__(self):
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11)
        self.head_rows = []

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, logits_to_keep=0):
        h = torch.relu(self.body(self.embed(input_ids)))
        h = h[:, -logits_to_keep:] if logits_to_keep else h
        self.head_rows.append(h.shape[1])
        return self.head(h)


def test_the_unused_head_of_a_causal_lm_runs_on_one_position_and_the_grams_do_not_change():
    torch.manual_seed(3)
    model, ids = TinyLM(), torch.randint(0, 11, (6, 5))
    cal = calibrate(model, ids, include="body", batch_size=3, progress=False)
    assert model.head_rows == [1, 1]
    model.head_rows.clear()
    full = calibrate(model, ids, batch_size=3, progress=False)      # the head is calibrated: all positions
    assert model.head_rows == [5, 5] and full.samples["head"] == 30
    assert torch.equal(cal["body"], full["body"])
    targets = [("body", model.body)]
    assert unused_logits_kwargs(model, targets, {"input_ids": ids, "labels": ids}) == {}
    assert unused_logits_kwargs(model, targets, ids) == {"logits_to_keep": 1}
    assert unused_logits_kwargs(nn.Linear(2, 2), targets, ids) == {}


def test_copies_keep_the_module_references_and_pickles_drop_them():
    import copy
    import pickle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    cal = calibrate(model, torch.randn(16, 6), progress=False)
    for clone in (copy.copy(cal), copy.deepcopy(cal)):
        assert clone.name_of(model[2]) == "2"
        assert torch.equal(clone.grams["0"], cal.grams["0"])
    deep = copy.deepcopy(cal)
    assert deep.grams["0"] is not cal.grams["0"]
    assert pickle.loads(pickle.dumps(cal))._modules == {}
