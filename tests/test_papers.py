"""The arithmetic parts of the paper reproductions in papers/ (fast: meta-device layers, small data).

Each papers/<paper>/run.py exposes ``checks()``: the paper's numbers against ours, computed with
the toolkit's own layers and accounting. Here every gated check must reproduce, plus a few
properties of the reproductions themselves (why a variant does NOT match, and the real-weight
experiments that need no accuracy evaluation).
"""
import math

import pytest
import torch

from decomp_toolkit.decomp import pq_size_bits
from decomp_toolkit.layers import LowRankConv, PQConv
from papers import _shapes
from papers._common import Check, failures
from papers.jaderberg2014 import run as jaderberg
from papers.kim2016 import run as kim
from papers.lebedev2015 import run as lebedev
from papers.novikov2015 import run as novikov
from papers.stock2020 import run as stock
from papers.svdllm import run as svdllm
from papers.zhang2016 import run as zhang

MIB = 2 ** 20
PAPERS = {"zhang2016": zhang, "kim2016": kim, "lebedev2015": lebedev, "jaderberg2014": jaderberg,
          "novikov2015": novikov, "stock2020": stock}




# ----------------------------------------------------------------------------- the comparison logic

def test_check_rules():
    assert Check("a", 144, 144).ok and not Check("a", 144, 145).ok
    assert Check("b", 10.13, 10.1349, "decimals=2").ok and not Check("b", 10.13, 10.1351, "decimals=2").ok
    assert Check("c", 4.0, 3.9765, "rel=0.01").ok and not Check("c", 4.0, 3.95, "rel=0.01").ok
    assert Check("d", None, 3.0, "info").ok and Check("d", None, 3.0, "info").status == "info"
    assert not Check("e", 1, None).ok
    with pytest.raises(ValueError):
        _ = Check("f", 1, 1, "approx").ok


@pytest.mark.parametrize("paper", sorted(PAPERS))
def test_every_arithmetic_claim_reproduces(paper):
    checks = PAPERS[paper].checks()
    assert checks and all(c.gated for c in checks)
    assert failures(checks) == [], [c.row() for c in failures(checks)]


def test_runs_exit_zero_without_accuracy(capsys):
    for module in (jaderberg, kim, lebedev, novikov, stock, zhang):
        assert module.main(["--no-accuracy"]) == 0
    assert "reproduced" in capsys.readouterr().out


# ----------------------------------------------------------------------------- network shapes

def test_network_totals_from_meta_modules():
    assert _shapes.network_totals(_shapes.VGG16)["params"] == 138_357_544
    alexnet = _shapes.network_totals(_shapes.ALEXNET, bias=False)
    assert (alexnet["params"], alexnet["macs"]) == (60_954_656, 724_406_816)
    assert _shapes.network_totals(_shapes.ALEXNET)["params"] == 60_954_656 + 10_568   # + biases
    assert _shapes.resnet_param_count("resnet18") == 11_689_512
    assert _shapes.resnet_param_count("resnet50") == 25_557_032


# ----------------------------------------------------------------------------- Zhang et al. 2016

def test_zhang_cost_model_is_lowrankconv_flops():
    """d' k^2 c + d d' MACs per output pixel for every VGG layer and rank."""
    for spec, rank in zip(_shapes.VGG16_CONVS[1:], zhang.RANKS["3x sel"]):
        layer = LowRankConv(spec.in_channels, spec.out_channels, 3, rank, padding=1, device="meta")
        per_pixel = rank * 9 * spec.in_channels + spec.out_channels * rank
        assert layer.flops(spec.input_shape) == per_pixel * spec.size ** 2


def test_zhang_only_the_paper_accounting_matches():
    """Dropping C11 from the count, or adding the FC layers, misses the nominal 4x by > 1%."""
    ranks = zhang.RANKS["4x no-sel"]
    assert abs(zhang.whole_network_speedup(ranks) / 4 - 1) < 0.01
    assert zhang.whole_network_speedup(ranks, c11=False) > 4.04
    assert zhang.whole_network_speedup(ranks, fcs=True) < 3.89


def test_zhang_budget_allocation_on_real_weights():
    """At equal MACs the greedy allocation keeps more of Zhang's objective than uniform ranks."""
    from decomp_toolkit.analysis.zoo import load_mnist_cnn

    model = load_mnist_cnn()
    result = zhang.allocations(model, torch.zeros(1, 1, 28, 28), 0.3)
    uniform, selected = result["uniform"], result["selected (budget)"]
    assert selected["MACs"] <= uniform["MACs"] < 0.31 * uniform["dense_MACs"]
    assert selected["energy"] > uniform["energy"]


# ----------------------------------------------------------------------------- Jaderberg et al. 2014

def test_jaderberg_valid_convolutions_are_slower_than_the_simplified_model():
    for spec, K, _ in jaderberg.CASES:
        s = jaderberg.speedups(spec, K)
        assert s["valid"] < s["simplified"]
        C, N, D = spec.in_channels, spec.out_channels, spec.kernel
        assert s["simplified"] == pytest.approx(C * N * D / (K * (N + C)), rel=1e-12)


# ----------------------------------------------------------------------------- Lebedev et al. 2015

def test_lebedev_grouped_cp_differs_from_the_block_diagonal_expansion():
    """Our per-group CP of the grouped conv2: R(C + 2gD + N) for g*R components, not R(C + 2D + N)."""
    layer = lebedev.cp_layer(50, groups=2)
    assert layer.num_params == 50 * (96 + 2 * 2 * 5 + 256)
    assert lebedev.cp_layer(100).num_params == lebedev.lebedev_cost(100)


# ----------------------------------------------------------------------------- Stock et al. 2020

@pytest.mark.parametrize("net", ["resnet18", "resnet50"])
def test_stock_pq_layers_agree_with_the_size_formula(net):
    convs, _ = _shapes.RESNETS[net]
    for name, shape in convs[1:]:
        block = 9 if shape[2] == 3 else 4
        layer = PQConv(shape[1], shape[0], shape[2], block, 256, bias=False, device="meta")
        assert layer.size_bits == pq_size_bits(shape, block, 256)


def test_stock_sizes_in_mib_not_mb():
    cfg = stock.STOCK_RESULTS[("resnet18", "small")]
    bits = stock.stock_size_bits("resnet18", cfg["block_3x3"], cfg["block_1x1"], cfg["fc_centroids"])
    assert round(bits / 8 / MIB, 2) == 1.54 and round(bits / 8 / 1e6, 2) != 1.54
    assert round(_shapes.resnet_param_count("resnet18") * 4 / 1e6, 2) != stock.UNCOMPRESSED_MB["resnet18"]


# ----------------------------------------------------------------------------- Novikov et al. 2015

def test_novikov_network_figure_does_not_depend_on_the_rank():
    assert {round(novikov.network_compression(("FC6",), r), 2) for r in (1, 2, 4, 8)} == {3.89}
    assert {round(novikov.network_compression(("FC6", "FC7"), r), 2) for r in (1, 2, 4, 8)} == {7.35}


# ----------------------------------------------------------------------------- SVD-LLM

def test_svdllm_whitening_is_certified_and_never_worse_on_calibration_data():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 24, dtype=torch.float64)
    X_cal = torch.randn(200, 24, generator=gen, dtype=torch.float64) @ mixing
    X_eval = torch.randn(200, 24, generator=gen, dtype=torch.float64) @ mixing
    W = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    for rank in (1, 4, 8):
        row = svdllm.layer_errors(W, X_cal.T @ X_cal, X_eval.T @ X_eval, rank)
        assert svdllm.certified_ok(row)
        assert row["white_cal"] <= row["plain_cal"] + 1e-12
        assert math.isclose(row["certified"] / row["cal_norm"], row["white_cal"], rel_tol=1e-6)
    checks = svdllm.checks_for("synthetic", [dict(layer="w", fraction=0.5, **row)])
    assert failures(checks) == []
