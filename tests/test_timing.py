"""The timing harness (layers.timing, benchmarks/_timing.py): statistics against numpy, the
interleaving order, per-call normalisation and the results files. A fake clock replaces the
real one, so nothing here depends on how fast the machine is."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import decomp_toolkit.layers.timing as timing
from decomp_toolkit.layers.timing import Timing, compare, paired_ratio, quantile, relative_iqr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _timing as harness  # noqa: E402

samples = st.lists(st.floats(1e-6, 10.0, allow_nan=False), min_size=1, max_size=40)


@given(samples, st.floats(0, 1))
def test_quantile_matches_numpy(values, q):
    assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)), rel=1e-12, abs=1e-15)


@given(samples)
def test_relative_iqr_matches_numpy(values):
    expected = 0.0 if len(values) < 2 else \
        (np.quantile(values, 0.75) - np.quantile(values, 0.25)) / np.median(values)
    assert relative_iqr(values) == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


def test_timing_statistics_and_paired_ratio():
    a = Timing("a", wall=[1.0, 2.0, 3.0, 4.0, 100.0], cpu=[1.0, 1.0, 1.5, 2.0, 2.0])
    b = Timing("b", wall=[0.5, 1.0, 1.5, 2.0, 1.0], cpu=[1.0] * 5)
    assert a.median == 3.0 and a.cpu_median == 1.5
    assert a.spread == pytest.approx((4.0 - 2.0) / 3.0)
    assert a.off_cpu == pytest.approx(0.5)
    ratio = paired_ratio(a, b)
    assert ratio.samples == [2.0, 2.0, 2.0, 2.0, 100.0] and ratio.median == 2.0 and ratio.spread == 0.0
    assert paired_ratio(a, b, cpu=True).median == 1.5
    with pytest.raises(ValueError, match="one compare"):
        paired_ratio(a, Timing("c", wall=[1.0], cpu=[1.0]))


class FakeClock:
    """Each call of a callable advances a fake clock by its cost; records the call order."""

    def __init__(self, monkeypatch, costs):
        self.now, self.cpu, self.calls, self.costs = 0.0, 0.0, [], costs
        monkeypatch.setattr(timing.time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(timing.time, "thread_time", lambda: self.cpu)

    def fn(self, label):
        def call():
            self.calls.append(label)
            self.now += self.costs[label]
            self.cpu += self.costs[label] / 2  # half of the wall time on the CPU
        return call


def test_compare_interleaves_warms_up_and_normalises(monkeypatch):
    clock = FakeClock(monkeypatch, {"A": 0.003, "B": 0.001})
    timings = compare({"A": clock.fn("A"), "B": clock.fn("B")}, repeats=4, warmup=1, min_sample_s=0.002)
    assert timings["A"].number == 1 and timings["B"].number == 2
    # warm-up (1 call) and the calibration call of each, then rounds A B | B A | A B | B A
    timed = clock.calls[4:]
    assert timed == ["A", "B", "B", "B", "B", "A", "A", "B", "B", "B", "B", "A"]
    assert timings["A"].wall == pytest.approx([0.003] * 4) and timings["B"].wall == pytest.approx([0.001] * 4)
    assert timings["B"].cpu == pytest.approx([0.0005] * 4) and timings["B"].off_cpu == pytest.approx(0.5)


def test_compare_rejects_bad_counts():
    with pytest.raises(ValueError, match="repeats=0"):
        compare({"a": lambda: None}, repeats=0)


def test_bench_writes_summary_and_raw(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(harness, "RAW", tmp_path / "raw")
    args = harness.add_bench_args(argparse.ArgumentParser()).parse_args(["--repeats", "7"])
    bench = harness.Bench("unit", args)
    assert torch.get_num_threads() == 1
    conv, x = bench.prepare(torch.nn.Conv2d(2, 2, 1), 1, 2, 3, 3)
    timings = bench.compare({"dense": lambda: conv(x), "same": lambda: conv(x)}, tag="t", min_sample_s=0)
    assert len(timings["dense"].wall) == 7 and len(timings["dense"].cpu) == 7
    bench.section("A table", ["layer", "ms"], [["conv", harness.ms(timings["dense"])]])
    summary = bench.write(command="python benchmarks/x.py")
    text = summary.read_text()
    assert "Command: `python benchmarks/x.py`" in text and "| conv |" in text and "torch threads 1" in text
    raw = json.loads(next((tmp_path / "raw").glob("unit-*.json")).read_text())
    assert len(raw["timings"][0]["timings"]["same"]["wall"]) == 7


def test_bench_refuses_too_few_repeats():
    with pytest.raises(ValueError, match="< 7"):
        harness.Bench("unit", repeats=3, write=False)


def test_gitignore_keeps_summaries_and_ignores_raw():
    ignore = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().split()
    assert "benchmarks/results/raw/" in ignore and "benchmarks/results/" not in ignore


def test_cuda_clock_times_with_events(monkeypatch):
    """The GPU path (no GPU here): samples are CUDA-event intervals after a synchronize, per call."""
    now = {"t": 0.0}
    synced = []

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = now["t"]

        def elapsed_time(self, end):  # milliseconds, like torch.cuda.Event
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: synced.append(now["t"]))

    def kernel():
        now["t"] += 0.004

    timings = compare({"k": kernel}, repeats=7, warmup=1, device="cuda")
    assert timings["k"].device == "cuda" and timings["k"].wall == pytest.approx([0.004] * 7)
    assert len(synced) >= 14  # before and after every sample
