"""optimize="speed" and the slower-than-dense check (layers.speed) for every method and layer kind.

The one measuring function, ``speed.time_modules``, is replaced by a fake whose verdicts the
tests choose, so no wall clock is asserted; the mechanism still runs every candidate module
once, and the returned module must compute what its own ``to_dense()`` computes."""
import warnings

import pytest
import torch
import torch.nn as nn

import decomp_toolkit.layers.speed as speed
from decomp_toolkit.layers.errors import UnsupportedLayerError
from decomp_toolkit.layers.speed import speed_info
from decomp_toolkit.layers import SlowerThanDenseWarning, available_methods, compress, decompose

# a small valid request per method (None: the method needs no rank spec)
REQUESTS = {
    "svd": dict(rank=4), "tucker": dict(rank=4), "cp": dict(rank=4, random_state=0), "tt": dict(rank=2),
    "btd": dict(rank=2, n_blocks=2, random_state=0), "pq": dict(bits=2, random_state=0),
    "toeplitz": {}, "circulant": {}, "ldr": dict(rank=1),
}
LAYERS = {
    "linear": lambda: nn.Linear(24, 16), 1: lambda: nn.Conv1d(12, 16, 3, padding=1),
    2: lambda: nn.Conv2d(12, 16, 3, padding=1), 3: lambda: nn.Conv3d(6, 8, 3, padding=1),
}
SHAPES = {"linear": (5, 24), 1: (2, 12, 9), 2: (2, 12, 7, 7), 3: (1, 6, 5, 5, 5)}


def cases():
    for method, entry in sorted(available_methods().items(), key=lambda kv: kv[0]):
        for kind in entry.builders:
            if kind in LAYERS and method in REQUESTS:
                yield pytest.param(method, kind, id=f"{method}-{kind}")


class FakeTiming:
    """``dense`` takes ``self.dense`` s; a candidate ``(rank, impl)`` takes ``self.cost(rank, impl)``."""

    def __init__(self):
        self.dense, self.calls = 2.0, []
        self.cost = lambda rank, impl: 1.0

    def __call__(self, modules, x, repeats=7, warmup=2):
        self.calls.append(list(modules))
        with torch.no_grad():
            for module in modules.values():  # the mechanism must be able to run each candidate
                module(x)
        return {k: self.dense if k == "dense" else self.cost(*self.key(k, modules[k])) for k in modules}

    @staticmethod
    def key(label, module):
        """Candidates come as (rank, implementation); the final verdict as "factorized"."""
        return label if isinstance(label, tuple) else (getattr(module, "rank", None),
                                                       getattr(module, "implementation", None))


@pytest.fixture
def fake(monkeypatch):
    timing = FakeTiming()
    monkeypatch.setattr(speed, "time_modules", timing)
    return timing


def _same_function(module, x):
    with torch.no_grad():
        y = module(x)
        expected = module.to_dense()(x)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("method,kind", list(cases()))
def test_optimize_speed_every_method_and_kind(fake, method, kind):
    torch.manual_seed(0)
    layer, shape = LAYERS[kind](), SHAPES[kind]
    module = decompose(layer, method=method, optimize="speed", input_shape=shape, **REQUESTS[method])
    info = speed_info(module)
    assert module.fit.speedup == pytest.approx(2.0) and info["slower_than_dense"] is False
    assert info["input_shape"] == shape and info["dense_ms"] == pytest.approx(2000.0)
    assert info["theoretical"] is None or info["theoretical"] > 0
    _same_function(module, torch.randn(shape))


@pytest.mark.parametrize("method,kind", list(cases()))
def test_without_optimize_nothing_is_timed(fake, method, kind):
    module = decompose(LAYERS[kind](), method=method, **REQUESTS[method])
    assert module.fit.speedup is None and speed_info(module) is None and not fake.calls


def test_rank_candidates_near_the_rank():
    assert speed.rank_candidates(13) == [16, 13]  # the nearest multiple of 8 first, then the rank
    candidates = speed.rank_candidates(104)
    assert candidates[0] == 104 and {96, 112, 128} <= set(candidates)  # 104 is itself a multiple of 8
    assert all(0.8 * 104 <= r <= 1.25 * 104 for r in candidates)
    pairs = speed.rank_candidates((13, 11))
    assert pairs[:2] == [(16, 8), (13, 11)]  # the nearest multiple of 8 per mode
    assert speed.rank_candidates(3) == [8, 3]  # nothing else kernel-friendly within [0.8 r, 1.25 r]


def test_optimize_speed_picks_the_fastest_rank_and_rebuilds_it(fake):
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 40, 3, padding=1)
    fake.cost = lambda rank, impl: 0.5 if rank == (16, 8) else 1.0
    module = decompose(conv, method="tucker", rank=(13, 11), optimize="speed", input_shape=(1, 32, 8, 8))
    assert module.rank == (16, 8) and module.fit.ranks == (16, 8)
    assert module.fit.speedup == pytest.approx(4.0) and speed_info(module)["candidates"]["rank=(16, 8)"] == 500.0
    _same_function(module, torch.randn(1, 32, 8, 8))
    exact = decompose(conv, method="tucker", rank=(16, 8))
    assert torch.allclose(module.dense_weight(), exact.dense_weight(), atol=1e-5)


def test_ties_go_to_the_nearest_multiple_of_8(fake):
    torch.manual_seed(0)
    module = decompose(nn.Linear(64, 48), method="svd", rank=13, optimize="speed")
    assert module.rank == 16  # every candidate ties: the first in order of preference
    fake.cost = lambda rank, impl: 1.0 if rank == 13 else 1.02  # within the tie margin of 13
    assert decompose(nn.Linear(64, 48), method="svd", rank=13, optimize="speed").rank == 16
    fake.cost = lambda rank, impl: 1.0 if rank == 13 else 1.5
    assert decompose(nn.Linear(64, 48), method="svd", rank=13, optimize="speed").rank == 13


def test_a_rank_the_layer_cannot_take_is_skipped(fake):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)  # Tucker ranks at most (5, 6): 8 is out of reach
    module = decompose(conv, method="tucker", rank=3, optimize="speed", input_shape=(1, 6, 5, 5))
    assert module.rank == (3, 3)
    _same_function(module, torch.randn(1, 6, 5, 5))


def test_no_candidate_holds_more_parameters_than_the_dense_layer(fake):
    fake.cost = lambda rank, impl: 0.1 if rank == 8 else 1.0   # rank 8 would be the fastest
    dense = nn.Linear(12, 12)   # 156 parameters; rank 8 would hold 204
    module = decompose(dense, method="svd", rank=2, optimize="speed", input_shape=(64, 12))
    assert module.rank == 2 and list(speed_info(module)["candidates"]) == ["rank=2"]
    roomy = decompose(nn.Linear(40, 40), method="svd", rank=6, optimize="speed", input_shape=(64, 40))
    assert roomy.rank == 8   # 8 * 80 + 40 = 680 <= 1,640


def test_optimize_speed_picks_the_fastest_implementation(fake):
    torch.manual_seed(0)
    fake.cost = lambda rank, impl: 0.5 if impl == "fused" else 1.0
    module = decompose(nn.Conv2d(8, 8, 3, padding=1), method="cp", rank=4, random_state=0, optimize="speed",
                       input_shape=(1, 8, 6, 6))
    assert module.implementation == "fused"
    _same_function(module, torch.randn(1, 8, 6, 6))


def test_slower_layer_warns_or_raises(fake):
    fake.dense = 0.5
    linear = nn.Linear(64, 32)
    with pytest.warns(SlowerThanDenseWarning, match=r"\(Linear, weight \(32, 64\)\).*speedup 0.50x < 1"):
        module = decompose(linear, method="svd", rank=8, optimize="speed")
    assert speed_info(module)["slower_than_dense"] is True
    with pytest.raises(UnsupportedLayerError, match=r"speedup 0.50x < 1\); on_slower='raise'"):
        decompose(linear, method="svd", rank=8, optimize="speed", on_slower="raise")


def test_conv_needs_input_shape_and_bad_options_are_named():
    conv = nn.Conv2d(6, 8, 3)
    with pytest.raises(ValueError, match=r"\(Conv2d, weight \(8, 6, 3, 3\)\).*needs input_shape="):
        decompose(conv, method="svd", rank=2, optimize="speed")
    with pytest.raises(ValueError, match=r"optimize='fast' is not understood"):
        decompose(conv, method="svd", rank=2, optimize="fast")
    with pytest.raises(ValueError, match=r"on_slower='ignore' is not one of"):
        decompose(conv, method="svd", rank=2, optimize="speed", input_shape=(1, 6, 5, 5), on_slower="ignore")


def _model():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 6 * 6, 10))


def test_compress_with_example_input_times_and_reports_slower_layers(fake):
    fake.dense = 0.5  # every factorized layer "runs" slower than dense
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(SlowerThanDenseWarning):
        small, report = compress(_model(), method="svd", rank=2, example_input=x, progress=False)
    timed = [r for r in report.layers if r.replaced]
    assert timed and all(r.speedup == pytest.approx(0.5) for r in timed)
    assert all(r.theoretical_speedup == pytest.approx(r.flops_before / r.flops_after) for r in timed)
    assert any("SLOWER than dense" in note and timed[0].name in note for note in report.notes)
    assert "theoretical_speedup" in report.columns
    assert small(x).shape == (2, 10)


def test_compress_optimize_speed_keeps_slower_layers_dense(fake):
    fake.dense = 0.5
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    model = _model()
    small, report = compress(model, method="svd", rank=2, optimize="speed", example_input=x, progress=False)
    assert not report.replaced
    assert all("on_slower='raise'" in r.status for r in report.layers if r.status.startswith("skipped: the fact"))
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters())


def test_compress_optimize_speed_every_conv_kind(fake):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1))
    x = torch.randn(2, 4, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowerThanDenseWarning)
        small, report = compress(model, method="tucker", rank=4, optimize="speed", example_input=x, progress=False)
    assert [r.speedup for r in report.replaced] == [pytest.approx(2.0)] * len(report.replaced)
    assert report.replaced and small(x).shape == (2, 16, 10)
