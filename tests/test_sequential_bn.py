"""compress_sequential on CNNs with BatchNorm: BN-aware fits, BN folding, and a compress() report as the rank plan."""
import torch
import torch.nn as nn

from decomp_toolkit.layers import calibrate, compress
from decomp_toolkit.layers.sequential import compress_sequential, planned_ranks


def bn_cnn(seed=0):
    """conv-BN-ReLU x 2, then a classifier; BN statistics far from identity (scales 1e-2 .. 1e1)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.logspace(-2, 1, n)[torch.randperm(n, generator=g)])
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def images(n=24, seed=2):
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _bn_output_error(model, small, x, bn_index=1):
    """||BN(conv'(x)) - BN(conv(x))||_F of the first conv-BN pair: what the ReLU after it sees."""
    with torch.no_grad():
        return float((small[:bn_index + 1](x) - model[:bn_index + 1](x)).norm())


def test_bn_aware_fit_is_never_worse_in_the_bn_output_scale():
    model, x = bn_cnn(), images()
    ranks = {"0": 3, "3": 4, "7": None}
    aware, report = compress_sequential(model, x, ranks=ranks, batch_size=12, blocks=[""], progress=False)
    plain, _ = compress_sequential(model, x, ranks=ranks, batch_size=12, blocks=[""], progress=False,
                                   bn_aware=False)
    # the first conv sees the same inputs in both: the BN-aware fit is the optimum of the BN-scaled error
    assert _bn_output_error(model, aware, x) <= _bn_output_error(model, plain, x) * (1 + 1e-6)
    assert _bn_output_error(model, aware, x) < 0.9 * _bn_output_error(model, plain, x)  # scales 1e-2..1e1 matter
    assert any("bn_aware" in note and "1 into 0" in note for note in report.notes)


def test_input_model_unchanged_and_function_kept_by_the_bn_rescaling():
    model, x = bn_cnn(), images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = {"0": 16, "3": 16, "7": None}  # every conv at full rank: the fits are exact, so is the BN rescaling
    small, _ = compress_sequential(model, x, ranks=full, batch_size=12, blocks=[""], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref, got = model(x), small(x)
    assert float((got - ref).norm()) <= 1e-4 * float(ref.norm())
    assert type(small[0]).__name__ != "Conv2d" and isinstance(small[1], nn.BatchNorm2d)


def test_fold_bn_replaces_the_batchnorms_by_identity_and_reports_them():
    model, x = bn_cnn(), images()
    small, report = compress_sequential(model, x, ranks={"0": 3, "3": 4, "7": None}, batch_size=12, blocks=[""],
                                        progress=False, fold_bn=True)
    assert isinstance(small[1], nn.Identity) and isinstance(small[4], nn.Identity)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert any(note.startswith("fold_bn: folded 2") for note in report.notes)


def test_a_compress_report_is_a_rank_plan():
    model, x = bn_cnn(), images()
    cal = calibrate(model, x, batch_size=12, progress=False)
    one_shot, plan = compress(model, method="svd", budget=dict(flops=0.5), calibration=cal, example_input=x[:1],
                              progress=False, time_layers=False)
    small, report = compress_sequential(model, x, ranks=plan, batch_size=12, blocks=[""], progress=False)
    wanted, got = planned_ranks(plan), planned_ranks(report)
    assert got == wanted and any(v is not None for v in got.values())
    # same ranks, same layer kinds: the same parameter count as the one-shot model
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in one_shot.parameters())


def test_ranks_of_a_wrong_type_are_rejected():
    model, x = bn_cnn(), images()
    try:
        compress_sequential(model, x, ranks=[3, 4], progress=False)
    except TypeError as err:
        assert "ranks=" in str(err) and "list" in str(err)
    else:
        raise AssertionError("ranks=[3, 4] was accepted")


def test_loss_budget_does_not_favour_layers_that_saw_more_rows():
    """The loss estimate is per Gram row: a layer whose Gram (and row count) is 4x larger, as a
    high-resolution conv's is, with the same Fisher, gets the same ranks."""
    model, x = bn_cnn(), images()
    cal = calibrate(model, x, batch_size=12, progress=False, fisher=True)
    budget = dict(flops=0.4, min_rank=1)
    _, plan = compress(model, method="svd", budget=budget, calibration=cal, example_input=x[:1], progress=False,
                       time_layers=False)
    cal.grams["0"], cal.sums["0"], cal.samples["0"] = 4 * cal.grams["0"], 4 * cal.sums["0"], 4 * cal.samples["0"]
    _, again = compress(model, method="svd", budget=budget, calibration=cal, example_input=x[:1], progress=False,
                        time_layers=False)
    assert [r.rank for r in again.layers] == [r.rank for r in plan.layers]
    assert any(r.replaced for r in plan.layers)
