"""Whole-model speedup of compressed zoo CNNs against their MAC ratio: torch eager, torch.compile, onnxruntime.

Run: .venv/bin/python benchmarks/bench_realized_e2e.py [--models mnist-cnn craft] [--batch 64]
     [--craft-size 240 320] [--channels-last] [--no-compile] [--no-onnx] [--threads 1] [--variants ...]

For each model: ``compress(model, method, budget=dict(flops=0.5), example_input=x)`` (the
Linear/Conv MACs halved by the global allocation) with and without ``optimize="speed"``,
``budget=dict(latency=0.5)`` (the targeted layers' measured time halved, layers.latency), and
``compress_sequential(ratio=0.6, pairs="auto")`` (60% of the hidden units of every conv chain kept,
layers.interpolative: plain narrower convs), then dense vs compressed timed in interleaved rounds (harness: benchmarks/_timing.py, 1
thread) in torch eager, ``torch.compile`` (inductor) and onnxruntime (1 intra-op thread, no
spinning, exported with ``torch.onnx.export``); each runtime's objects exist only while it is
timed. ``MAC ratio`` = dense / compressed MACs of the Linear/Conv layers (the report's
count); ``realized`` = dense / compressed time, median of per-round ratios, on the measuring
thread's CPU time in eager (the figure other processes on a shared machine cannot inflate)
and on wall time for compile/onnxruntime (their worker threads are not the measuring
thread); ``eff`` = realized / MAC ratio. Time outside Linear/Conv layers (pooling,
activations) does not shrink, so eff < 1 even for perfect layers. CRAFT runs at
``--craft-size`` (default 240x320, a quarter of its 480x640 pages, to bound the run on a
2-core machine; its convs keep their channel counts). The latency benchmark of the
compressed models is bench_e2e.py. Writes benchmarks/results/bench_realized_e2e.md.
"""
from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args  # noqa: E402

from decomp_toolkit.analysis.zoo import ZOO  # noqa: E402
from decomp_toolkit.layers import SlowerThanDenseWarning, compress  # noqa: E402
from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402


def example(name, batch, craft_size):
    if name == "craft":
        return torch.randn(1, 3, *craft_size)
    x = ZOO[name].example_input()[0]
    return x.expand(batch, *x.shape[1:]).contiguous() if x.shape[0] != batch else x


VARIANTS = {"budget flops=0.5": dict(budget=dict(flops=0.5)),
            "budget flops=0.5, optimize='speed'": dict(budget=dict(flops=0.5), optimize="speed"),
            "budget latency=0.5": dict(budget=dict(latency=0.5)),
            "pairs ratio=0.6": dict(ratio=0.6, pairs="auto")}   # compress_sequential: hidden-unit selection


def variants(model, name, x, method, labels):
    """``{label: (module, report)}``: compress at 50% of the MACs (as built, with optimize='speed') or of the
    targeted layers' measured time (``budget=dict(latency=0.5)``, layers.latency), or keep 60% of the hidden
    units of every conv chain / MLP (``compress_sequential(pairs="auto")``, fitted on calibration pages for
    CRAFT, on the example input otherwise)."""
    out = {}
    for label in labels:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowerThanDenseWarning)
            if "pairs" in VARIANTS[label]:
                small, report = compress_sequential(model, calibration_data(name, x), batch_size=2, progress=False,
                                                    example_input=x, **VARIANTS[label])
            else:
                small, report = compress(model, method=method, example_input=x, progress=False, **VARIANTS[label])
        out[label] = (small.eval(), report)
    return out


def calibration_data(name, x):
    if name == "craft":
        from decomp_toolkit.analysis.zoo import craft
        return craft.load_pages(8, split="calibration", size=(320, 240))[0]
    return x


def onnx_session(model, x, threads):
    import onnxruntime as ort

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting worker threads
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


def runtimes(dense, small, x, args):
    """Yield ``(runtime, (dense fn, compressed fn, use cpu time) | failure text)``, one runtime at a time."""
    yield "eager", (lambda: dense(x), lambda: small(x), True)
    if not args.no_compile:
        try:
            cd, cs = torch.compile(copy.deepcopy(dense)), torch.compile(copy.deepcopy(small))
            with torch.inference_mode():
                cd(x), cs(x)
            yield "torch.compile", (lambda: cd(x), lambda: cs(x), False)
        except Exception as err:  # report, do not crash the benchmark
            yield "torch.compile", f"failed: {type(err).__name__}: {str(err)[:80]}"
        finally:
            torch._dynamo.reset()
    if not args.no_onnx:
        try:
            sessions = onnx_session(dense, x, args.threads), onnx_session(small, x, args.threads)
        except Exception as err:
            yield "onnxruntime", f"failed: {type(err).__name__}: {str(err)[:80]}"
        else:
            yield "onnxruntime", (*sessions, False)


def run_model(bench, name, args, rows):
    entry = ZOO[name]
    if not entry.installed():
        rows.append([name, "not installed", "", "", "", "", "", ""])
        return
    model = entry.load_model().eval()
    x = example(name, args.batch, args.craft_size)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    shape = "x".join(map(str, x.shape)) + (" channels-last" if args.channels_last else "")
    for label, (small, report) in variants(model, name, x, args.method, args.variants).items():
        totals = report.totals()
        mac_ratio = totals["flops_before"] / totals["flops_after"]
        slower = [f"{r.name} {r.speedup:.2f}x" for r in report.layers
                  if r.replaced and r.speedup is not None and r.speedup < 1]
        for runtime, fns in runtimes(model, small, x, args):
            if isinstance(fns, str):
                rows.append([name, shape, label, runtime, f"{mac_ratio:.2f}x", fns, "", ""])
                continue
            dense_fn, small_fn, use_cpu = fns
            t = bench.compare({"dense": dense_fn, "compressed": small_fn}, tag=f"{name} {label} {runtime}")
            ratio = bench.ratio(t["dense"], t["compressed"], cpu=use_cpu)
            clock = "cpu" if use_cpu else "wall"
            rows.append([name, shape, label, runtime, f"{mac_ratio:.2f}x",
                         f"{t['dense'].median * 1e3:.3g} / {t['compressed'].median * 1e3:.3g}",
                         f"{ratio} ({clock})", f"{ratio.median / mac_ratio:.2f}"])
            print("  " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
        rows.append([name, "", label, "layers slower than dense (compress timing)", "", "",
                     ", ".join(slower) or "none", ""])


def main():
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--models", nargs="*", default=["mnist-cnn"])
    parser.add_argument("--method", default="svd")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--craft-size", nargs=2, type=int, default=(240, 320))
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels-last")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    bench = Bench("bench_realized_e2e" + ("_channels_last" if args.channels_last else ""), args)
    bench.note(bench.environment())
    rows = []
    for name in args.models:
        run_model(bench, name, args, rows)
    bench.section("Whole-model speedup at 50% of the Linear/Conv MACs", [
        "model", "input", "compress", "runtime", "MAC ratio", "dense / compressed ms (wall)", "realized", "eff"],
        rows, note="eff = realized / MAC ratio; target >= 0.85 in torch eager.")
    bench.write()


if __name__ == "__main__":
    main()
