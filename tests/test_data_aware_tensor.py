"""Data-aware Tucker-2 and PQ (issue 7), and CP's refusal of gram=.

* data-aware Tucker-2's output error on the calibration data is <= plain Tucker-2's at
  the same ranks (grouped convs too), its error_bound is that measured error, forward ==
  to_dense forward, the bias absorbs the mean shift (input_mean=);
* compress(method="tucker", calibration=) replaces convs and reports output-error bounds;
* data-aware PQ's output error is <= plain PQ's (never worse on every seed, lower on
  average on correlated inputs), for Linear and Conv;
* cp + gram= raises an error naming the missing data-aware variant.
"""
import math

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.decomp.whitened import output_error
from decomp_toolkit.layers import calibrate, compress, decompose

torch.set_num_threads(1)


def correlated_images(n, channels, size, latent, seed):
    """Images whose channels live near a ``latent``-dimensional subspace (like real features)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(latent, channels, generator=gen)
    z = torch.randn(n, size, size, latent, generator=gen) * torch.tensor([0.6 ** i for i in range(latent)])
    x = (z @ mix).permute(0, 3, 1, 2)
    return (x + 0.02 * torch.randn(x.shape, generator=gen) + 0.5).contiguous()


def correlated_rows(n, features, latent, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.7 ** i for i in range(latent)])
    x = (torch.randn(n, latent, generator=gen) * scale) @ torch.randn(latent, features, generator=gen)
    return x + 0.02 * torch.randn(n, features, generator=gen) + 0.3


def conv_output_error(conv, module, gram):
    """||(W - W') X^T||_F from the Gram, per group."""
    g = conv.groups
    W = conv.weight.detach().double().reshape(g, conv.out_channels // g, -1)
    A = module.dense_weight().detach().double().reshape(W.shape)
    return math.sqrt(sum(output_error(W[i], A[i], gram[i]) ** 2 for i in range(g)))


# --------------------------------------------------------------------------- Tucker-2

@pytest.mark.parametrize("groups", [1, 2])
def test_tucker_data_aware_never_worse_than_plain(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 10, 3, padding=1, groups=groups).eval()
    x = correlated_images(24, 8, 8, latent=3, seed=1)
    gram = calibrate(conv, x, progress=False)[""]
    ranks = (4, 2) if groups == 1 else (3, 2)
    plain = decompose(conv, "tucker", rank=ranks)
    aware = decompose(conv, "tucker", rank=ranks, gram=gram)
    assert aware.rank == plain.rank
    e_plain, e_aware = conv_output_error(conv, plain, gram), conv_output_error(conv, aware, gram)
    assert e_aware <= e_plain * (1 + 1e-9)
    assert e_aware < 0.9 * e_plain  # correlated inputs: the refit wins clearly
    assert aware.fit.diagnostics["data_aware_fit"] == "data-aware"
    assert aware.fit.error_kind == "output" and aware.fit.error_bound is None  # measured, not certified
    assert math.isclose(aware.fit.error, e_aware, rel_tol=1e-6)
    assert math.isclose(aware.fit.diagnostics["plain_output_error"], e_plain, rel_tol=1e-6)
    W = conv.weight.detach().double().reshape(groups, 10 // groups, -1)
    norm = math.sqrt(sum(float(((W[i] @ gram[i]) * W[i]).sum()) for i in range(groups)))
    assert math.isclose(aware.fit.norm, norm, rel_tol=1e-9)
    with torch.no_grad():
        assert torch.allclose(aware(x), aware.to_dense()(x), atol=1e-4)


def test_tucker_data_aware_with_input_mean_corrects_the_bias():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 8, 3, padding=0).eval()
    x = correlated_images(20, 6, 7, latent=2, seed=2)
    cal = calibrate(conv, x, progress=False)
    aware = decompose(conv, "tucker", rank=(3, 2), calibration=cal)   # centered (the conv has a bias)
    with torch.no_grad():
        measured = float((conv(x).double() - aware(x).double()).norm())
        plain = decompose(conv, "tucker", rank=(3, 2))
        plain_err = float((conv(x).double() - plain(x).double()).norm())
    assert math.isclose(aware.fit.error, measured, rel_tol=1e-3)
    assert measured < plain_err


def test_tucker_gram_shape_and_mean_errors():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(ValueError, match="does not match"):
        decompose(conv, "tucker", rank=2, gram=torch.eye(10))
    with pytest.raises(ValueError, match="input_mean= goes with gram="):
        decompose(conv, "tucker", rank=2, input_mean=torch.zeros(36))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.flatten(1))


def test_compress_tucker_with_calibration_reports_output_bounds():
    torch.manual_seed(2)
    model = Net().eval()
    x = correlated_images(16, 3, 6, latent=2, seed=3)
    cal = calibrate(model, x, progress=False)
    small, report = compress(model, method="tucker", rank=(3, 3), calibration=cal, progress=False,
                             include=("conv*",))
    records = {r.name: r for r in report.layers}
    assert records["conv1"].replaced and records["conv2"].replaced
    assert any("OUTPUT error" in note for note in report.notes)
    assert small.conv2.fit.error_kind == "output"
    # conv2: the reported relative output error is the one measured on the calibration data
    with torch.no_grad():
        feats = torch.relu(model.conv1(x))
        ref, approx = model.conv2(feats).double(), small.conv2(feats).double()
    centered = ref - ref.mean((0, 2, 3), keepdim=True)
    assert math.isclose(records["conv2"].rel_output_error, float((ref - approx).norm()) / float(centered.norm()),
                        rel_tol=1e-3)


# --------------------------------------------------------------------------- PQ

def test_pq_linear_data_aware_beats_plain_on_correlated_inputs():
    torch.manual_seed(3)
    linear = nn.Linear(24, 12)
    x = correlated_rows(300, 24, latent=4, seed=4)
    gram = calibrate(linear, x, progress=False)[""][0]
    plain_errs, aware_errs = [], []
    for seed in range(4):
        for shared in (True, False):
            plain = decompose(linear, "pq", block_size=4, n_centroids=4, shared_codebook=shared, random_state=seed)
            aware = decompose(linear, "pq", block_size=4, n_centroids=4, shared_codebook=shared, random_state=seed,
                              gram=gram)
            e_plain = output_error(linear.weight.detach(), plain.dense_weight().detach(), gram)
            e_aware = output_error(linear.weight.detach(), aware.dense_weight().detach(), gram)
            assert e_aware <= e_plain * (1 + 1e-9)
            assert math.isclose(aware.fit.error, e_aware, rel_tol=1e-5)
            assert aware.fit.error_kind == "output" and aware.fit.diagnostics["data_aware_fit"] in ("data-aware", "plain")
            assert aware.codes.shape == plain.codes.shape and aware.codebooks.shape == plain.codebooks.shape
            h = aware.fit.diagnostics["weighted_history"]
            assert all(b <= a * (1 + 1e-9) for a, b in zip(h, h[1:]))
            plain_errs.append(e_plain)
            aware_errs.append(e_aware)
    assert sum(aware_errs) < 0.95 * sum(plain_errs)


def test_pq_conv_data_aware_and_bias_correction():
    torch.manual_seed(4)
    conv = nn.Conv2d(6, 8, 3, groups=2).eval()
    x = correlated_images(12, 6, 7, latent=2, seed=5)
    cal = calibrate(conv, x, progress=False)
    gram = cal[""]
    plain = decompose(conv, "pq", block_size=3, n_centroids=8, random_state=0)
    aware = decompose(conv, "pq", block_size=3, n_centroids=8, random_state=0, gram=gram)
    assert conv_output_error(conv, aware, gram) <= conv_output_error(conv, plain, gram) * (1 + 1e-9)
    assert math.isclose(aware.fit.error, conv_output_error(conv, aware, gram), rel_tol=1e-5)
    centered = decompose(conv, "pq", block_size=3, n_centroids=8, random_state=0, calibration=cal)
    with torch.no_grad():
        measured = float((conv(x).double() - centered(x).double()).norm())
    assert math.isclose(centered.fit.error, measured, rel_tol=1e-3)


def test_compress_pq_with_calibration_uses_output_bounds():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    x = correlated_rows(100, 16, latent=3, seed=6)
    cal = calibrate(model, x, progress=False)
    small, report = compress(model, method="pq", block_size=4, n_centroids=4, random_state=0, calibration=cal,
                             progress=False)
    assert all(r.replaced for r in report.layers)
    assert small[0].fit.error_kind == "output" and small[2].fit.error_kind == "output"


# --------------------------------------------------------------------------- CP

def test_cp_with_gram_says_there_is_no_data_aware_variant():
    conv = nn.Conv2d(4, 6, 3)
    with pytest.raises(TypeError, match="no data-aware variant.*weighted CP.*'svd' or 'tucker'"):
        decompose(conv, "cp", rank=3, gram=torch.eye(36))
    x = correlated_images(4, 4, 5, latent=2, seed=7)
    cal = calibrate(conv, x, progress=False)
    with pytest.raises(TypeError, match="no data-aware variant"):
        decompose(conv, "cp", rank=3, calibration=cal)
