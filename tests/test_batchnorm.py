"""Conv + BatchNorm: pair detection, exact folding / rescaling, and compress(fold_bn=, bn_aware=)."""
import copy

import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import compress
from decomp_toolkit.layers.batchnorm import conv_bn_pairs, fold_batchnorm, scale_for_batchnorm


class _Block(nn.Module):
    """Attributes (not a Sequential): found by fx tracing; the skip branch uses conv2's input."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)  # its output feeds a BN AND the residual: not a pair
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        z = self.conv3(y)
        return self.bn3(z) + z


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 1e-6)
            m.weight.data.copy_(torch.randn(n, generator=g) * torch.logspace(-4, 1, n))  # incl. signs, ~0 gammas
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _sequential():
    return _randomize_bn(nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                                       nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(12)))


def _generator():
    """A DCGAN-style decoder: transposed convs (one grouped, one without bias) each followed by BatchNorm."""
    torch.manual_seed(0)
    return _randomize_bn(nn.Sequential(nn.ConvTranspose2d(3, 12, 4, stride=2, padding=1, bias=False),
                                       nn.BatchNorm2d(12), nn.ReLU(),
                                       nn.ConvTranspose2d(12, 8, 4, stride=2, padding=1, groups=4), nn.BatchNorm2d(8),
                                       nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)))


def test_pairs_fx_and_sequential():
    assert conv_bn_pairs(_randomize_bn(_Block())) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert conv_bn_pairs(_sequential()) == [("0", "1")]  # the ReLU between conv 3 and BN 5 breaks the pair
    assert conv_bn_pairs(_generator()) == [("0", "1"), ("3", "4")]


@pytest.mark.parametrize("transform", [fold_batchnorm, scale_for_batchnorm])
@pytest.mark.parametrize("build", [_Block, _sequential, _generator])
def test_exact_in_eval_mode(transform, build):
    model = _randomize_bn(build()) if build is _Block else build()
    x = torch.randn(2, model.conv1.in_channels if build is _Block else 3, 9, 7)
    changed = copy.deepcopy(model)
    pairs = transform(changed)
    assert pairs
    with torch.no_grad():
        torch.testing.assert_close(changed(x), model(x), rtol=1e-5, atol=1e-5)
    if transform is fold_batchnorm:
        assert all(isinstance(changed.get_submodule(b), nn.Identity) for _, b in pairs)


def test_scale_keeps_train_mode_behaviour():
    """Up to eps: with BN scales well above sqrt(eps) the batch statistics absorb the rescaling."""
    model = _sequential()
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-2, 2, 12) + 0.05)
    changed = copy.deepcopy(model)
    scale_for_batchnorm(changed)
    x = torch.randn(4, 3, 6, 6)
    model.train(), changed.train()
    torch.testing.assert_close(changed[:2](x), model[:2](x), rtol=1e-2, atol=2e-3)  # eps acts on c^2 var


def test_bn_aware_weighs_channels_by_bn_scale():
    """A conv whose BN amplifies one channel 1000x: the BN-aware rank-1 SVD keeps that channel."""
    conv, bn = nn.Conv2d(4, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0, 0]])[:, :, None, None])
        bn.weight.copy_(torch.tensor([1e-3, 1.0]))
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(8, 4, 3, 3)
    with torch.no_grad():
        reference = model(x)
        plain, _ = compress(model, method="svd", rank=1, bn_aware=False, progress=False)
        aware, report = compress(model, method="svd", rank=1, progress=False)
        err_plain = float((plain(x) - reference).norm() / reference.norm())
        err_aware = float((aware(x) - reference).norm() / reference.norm())
    assert err_aware < 1e-2 < err_plain
    assert any("bn_aware" in n and "1 into 0" in n for n in report.notes)


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_bn_aware_weighs_the_channels_of_a_transposed_conv_by_bn_scale(method):
    """The transposed twin: the BN after ConvTranspose2d amplifies output channel 1 1000x; rank 1 keeps it."""
    conv, bn = nn.ConvTranspose2d(4, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0], [0, 0.5], [0, 0], [0, 0]])[:, :, None, None])   # (C_in, C_out)
        bn.weight.copy_(torch.tensor([1e-3, 1.0]))
    model = nn.Sequential(conv, bn).eval()
    x = torch.randn(8, 4, 3, 3)
    rank = 1 if method == "svd" else (1, 1)
    with torch.no_grad():
        reference = model(x)
        plain, _ = compress(model, method=method, rank=rank, bn_aware=False, progress=False)
        aware, report = compress(model, method=method, rank=rank, progress=False)
        err_plain = float((plain(x) - reference).norm() / reference.norm())
        err_aware = float((aware(x) - reference).norm() / reference.norm())
    assert err_aware < 1e-2 < err_plain
    assert any("bn_aware" in n and "1 into 0" in n for n in report.notes)
    folded, report = compress(model, method=method, rank=rank, fold_bn=True, progress=False)
    assert isinstance(folded[1], nn.Identity) and any(n.startswith("fold_bn: folded 1") for n in report.notes)


def test_compress_fold_bn_reports_and_counts():
    model = _randomize_bn(_Block())
    small, report = compress(model, method="svd", energy=0.99, fold_bn=True, progress=False)
    assert isinstance(small.bn1, nn.Identity) and isinstance(small.bn2, nn.Identity)
    assert isinstance(small.bn3, nn.BatchNorm2d) and isinstance(model.bn1, nn.BatchNorm2d)  # input untouched
    assert any(n.startswith("fold_bn: folded 2") for n in report.notes)
    assert report.model_params_after == sum(p.numel() for p in small.parameters())
