"""End-to-end latency of each zoo model, dense vs compressed, in torch eager, torch.compile and onnxruntime.

Compressed: ``compress(model, method="svd", budget=dict(params=0.5))`` (half of the targeted
layers' parameters, ranks allocated globally), the model's own example input (MNIST: one
28x28 image; MiniLM: 8 tokenized sentences; MobileNetV2: one 224x224 image). The six
callables of a model (dense / compressed x eager / compile / onnxruntime) are timed in the
SAME interleaved rounds (benchmarks/_timing.py), one thread everywhere (torch threads,
onnxruntime intra- and inter-op threads). ``speedup`` is the median of per-round ratios
dense / compressed, of wall time and of the measuring thread's CPU time (on a shared machine
the CPU-time ratio is the one to read: wall time includes waiting for a core). torch.compile uses the default Inductor backend (its compile time is
reported, not timed; the first compile of a process also pays Inductor's start-up); ONNX files come from the dynamo exporter (``analysis.io.export``).

Run: .venv/bin/python benchmarks/bench_e2e.py [--models mnist-cnn minilm mobilenet-v2] [--no-compile]
     [--no-onnx] [--repeats 9]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args, cpu_ms, ms  # noqa: E402

from decomp_toolkit.analysis import zoo  # noqa: E402
from decomp_toolkit.analysis.io import export  # noqa: E402
from decomp_toolkit.layers import compress  # noqa: E402


def _onnx_runner(model, example, folder, name):
    """A zero-argument callable running the model's ONNX export in onnxruntime (1 thread) and the max |diff|."""
    import onnxruntime as ort

    path = Path(folder) / f"{name}.onnx"
    export.save_onnx(model, path, example)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example)}
    diff = max(export.check_onnx(path, model, example, batches=(example[0].shape[0],)).values())
    return (lambda: session.run(None, feeds)), diff


def _compiled(bench, model, example):
    """``(callable, compile seconds)``: torch.compile (Inductor), compiled by its first call."""
    compiled = torch.compile(model)

    def run():
        with torch.inference_mode():
            return compiled(*example)
    _, wall, _ = bench.time_once(run)
    return run, wall


def _eager(model, example):
    def run():
        with torch.inference_mode():
            return model(*example)
    return run


def bench_model(bench, name, args, folder):
    entry = zoo.ZOO[name]
    dense = entry.load_model().eval()
    example = tuple(entry.example_input())
    small, report = compress(dense, method="svd", budget=dict(params=0.5), example_input=example, progress=False)
    small.eval()
    targeted = report.targeted_totals("params")
    data = entry.load_eval_data(None)
    metric = entry.evaluate(small, data, reference=dense)
    fns, notes = {}, []
    for label, model in (("dense", dense), ("compressed", small)):
        fns[f"eager {label}"] = _eager(model, example)
        if not args.no_compile:
            try:
                fns[f"compile {label}"], seconds = _compiled(bench, model, example)
                notes.append(f"torch.compile {label}: {seconds:.1f} s to compile")
            except Exception as err:  # a backend failure is a result to report, not a crash
                notes.append(f"torch.compile {label} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        if not args.no_onnx:
            fns[f"onnxruntime {label}"], diff = _onnx_runner(model, example, folder, f"{name}-{label}")
            notes.append(f"onnxruntime {label}: max abs diff vs torch {diff:.1e}")
    timings = bench.compare(fns, tag=name)
    rows = []
    for engine in ("eager", "compile", "onnxruntime"):
        d, c = timings.get(f"{engine} dense"), timings.get(f"{engine} compressed")
        if d is None or c is None:
            continue
        rows.append([name, engine, ms(d), cpu_ms(d), ms(c), cpu_ms(c), str(bench.ratio(d, c)),
                     str(bench.ratio(d, c, cpu=True))])
    shapes = ", ".join("x".join(str(s) for s in x.shape) for x in example)
    summary = (f"{name}: input {shapes}; targeted params {targeted[0]:,} -> {targeted[1]:,} "
               f"({targeted[1] / targeted[0]:.1%}), model {report.model_params_before:,} -> "
               f"{report.model_params_after:,}; {entry.metric} vs dense: "
               + ", ".join(f"{k} {v:.4f}" for k, v in metric.items()))
    return rows, [summary] + notes


def main(argv=None):
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--models", nargs="+", default=[n for n in ("mnist-cnn", "minilm", "mobilenet-v2")
                                                        if n in zoo.ZOO and zoo.ZOO[n].installed()])
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    args = parser.parse_args(argv)
    bench = Bench("bench_e2e", args)
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            model_rows, model_notes = bench_model(bench, name, args, folder)
            rows += model_rows
            notes += model_notes
            print("\n".join(model_notes), flush=True)
    header = ["model", "engine", "dense ms", "dense cpu ms", "compressed ms", "compressed cpu ms",
              "speedup (wall)", "speedup (thread cpu)"]
    bench.section("End-to-end latency, dense vs svd budget params=0.5 (targeted layers)", header, rows,
                  note="\n".join(f"- {n}" for n in notes))
    bench.write()


if __name__ == "__main__":
    main()
