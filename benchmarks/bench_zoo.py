"""Quality vs size on the real zoo models, and the time to compress them.

Run: .venv/bin/python benchmarks/bench_zoo.py [--threads 1] [--quick]
(harness: benchmarks/_timing.py, 1 torch thread by default; writes benchmarks/results/bench_zoo.md)

* MiniLM (all-MiniLM-L6-v2, 36 Linear layers): mean cosine similarity of the compressed
  model's embeddings to the original's on the 64 evaluation sentences, against the
  fraction of Linear parameters kept (0.75 / 0.5 / 0.3), for three ways of choosing the
  svd ranks at the same size:
    - uniform: ``ratio=f`` on every layer;
    - energy: one ``energy=e`` for every layer, e bisected (on the spectra) so that the
      Linear layers keep ~f of their parameters;
    - budget: ``budget=dict(params=...)`` (global greedy allocation), the model fraction
      set so that the Linear layers keep f (embeddings and LayerNorms stay dense).
* MobileNetV2: top-1 / top-5 agreement with the original model (and top-5 accuracy) on
  foolbox's 20 ImageNet images against the fraction of Linear/Conv MACs kept, for
  ``budget=dict(flops=f)`` and for uniform energies.
* Time to compress each zoo model (one run each; compress includes the deep copy).
Prints markdown tables. ``compress`` is given ``example_input`` in the timing table, so its
time includes timing every factorized layer against its dense one (layers.speed.check_speed).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args, markdown_table  # noqa: E402

from decomp_toolkit.analysis.spectra import spectrum, svd_layer_params  # noqa: E402
from decomp_toolkit.analysis.zoo import ZOO  # noqa: E402
from decomp_toolkit.decomp.rank import parse_rank_spec, select_rank  # noqa: E402
from decomp_toolkit.layers import compress  # noqa: E402
from decomp_toolkit.layers._accounting import count_params  # noqa: E402
from decomp_toolkit.layers.kinds import is_candidate  # noqa: E402


def _timed_compress(model, with_cpu=False, **kwargs):
    start, cpu = time.perf_counter(), time.process_time()
    small, report = compress(model, progress=False, **kwargs)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return (small, report, wall, cpu) if with_cpu else (small, report, wall)


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if is_candidate(m) and n]


def energy_for_fraction(model, fraction, scheme="channel"):
    """The energy e whose per-layer svd ranks keep ~``fraction`` of the layers' parameters."""
    layers = _layers(model)
    spectra = {n: spectrum(m, scheme) for n, m in layers}
    dense = sum(count_params(m) for _, m in layers)

    def kept(e):
        spec, total = parse_rank_spec(energy=e), 0
        for name, layer in layers:
            s = spectra[name]
            max_rank = s.shape[-1]
            rank = select_rank(spec, s, max_rank=max_rank)
            total += min(svd_layer_params(layer, rank, scheme), count_params(layer))
        return total / dense

    low, high = 1e-4, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if kept(mid) <= fraction else (low, mid)
    return low


def bench_minilm(fractions, out):
    entry = ZOO["minilm"]
    if not entry.installed():
        out(f"minilm: not installed ({entry.install})\n")
        return []
    model, data = entry.load_model(), entry.load_eval_data()
    example = entry.example_input()
    total = sum(p.numel() for p in model.parameters())
    linear = sum(count_params(m) for _, m in _layers(model))
    rows, times = [], []
    for f in fractions:
        e = energy_for_fraction(model, f)
        runs = [("uniform ratio", dict(ratio=f)), (f"energy={e:.4f}", dict(energy=e)),
                ("global budget", dict(budget=dict(params=(total - linear + f * linear) / total)))]
        for label, kwargs in runs:
            small, report, seconds = _timed_compress(model, method="svd", example_input=example, **kwargs)
            t = report.totals()
            metrics = entry.evaluate(small, data, reference=model)
            rows.append([f"{f:.2f}", label, f"{t['params_after'] / t['params_before']:.3f}",
                         f"{metrics['cosine']:.4f}", f"{metrics['min_cosine']:.4f}", len(report.replaced),
                         f"{seconds:.2f}"])
            times.append(seconds)
    out(f"## MiniLM (all-MiniLM-L6-v2): cosine to the original embeddings, 64 sentences\n\n"
        f"{total:,} parameters, {linear:,} in {len(_layers(model))} Linear layers\n")
    out(markdown_table(["target Linear params kept", "rank choice", "Linear params kept", "mean cosine",
                        "min cosine", "layers replaced", "compress s"], rows) + "\n")
    return rows


def bench_mobilenet(budgets, energies, out):
    entry = ZOO["mobilenet-v2"]
    if not entry.installed():
        out(f"mobilenet-v2: not installed ({entry.install})\n")
        return []
    model, data = entry.load_model(), entry.load_eval_data()
    example = entry.example_input()
    rows = []
    runs = [(f"budget flops={f}", dict(budget=dict(flops=f))) for f in budgets]
    runs += [(f"energy={e}", dict(energy=e)) for e in energies]
    for label, kwargs in runs:
        small, report, seconds = _timed_compress(model, method="svd", example_input=example, **kwargs)
        t = report.totals()
        m = entry.evaluate(small, data, reference=model)
        rows.append([label, f"{t['flops_after'] / t['flops_before']:.3f}",
                     f"{t['params_after'] / t['params_before']:.3f}", f"{m['top1_agreement']:.2f}",
                     f"{m['top5_agreement']:.2f}", f"{m['top5']:.2f}", len(report.replaced), f"{seconds:.2f}"])
    base = entry.evaluate(model, data, reference=model)
    out(f"## MobileNetV2: agreement with the original on foolbox's {len(data[1])} ImageNet images\n\n"
        f"original: top-1 {base['top1']:.2f}, top-5 {base['top5']:.2f}\n")
    out(markdown_table(["setting", "MACs kept", "params kept", "top-1 agreement", "top-5 agreement",
                        "top-5 accuracy", "layers replaced", "compress s"], rows) + "\n")
    return rows


def bench_times(out):
    rows = []
    for name, entry in ZOO.items():
        if not entry.installed():
            continue
        model, example = entry.load_model(), entry.example_input()
        layers = len(_layers(model))
        for label, kwargs in (("energy=0.95", dict(energy=0.95)), ("ratio=0.5", dict(ratio=0.5)),
                              ("budget params=0.9", dict(budget=dict(params=0.9)))):
            _, report, wall, cpu = _timed_compress(model, True, method="svd", example_input=example, **kwargs)
            rows.append([name, layers, label, len(report.replaced), f"{wall:.2f}", f"{cpu:.2f}"])
    out("## Time to compress (svd, one run, includes the deep copy)\n\n"
        "CPU s = process CPU time (all threads): on a shared machine wall time also counts waiting.\n")
    out(markdown_table(["model", "Linear/Conv layers", "setting", "replaced", "wall s", "CPU s"], rows) + "\n")
    return rows


def main(argv=None):
    parser = add_bench_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--quick", action="store_true", help="one fraction / budget each")
    parser.add_argument("--only", choices=("times", "minilm", "mobilenet"), help="run one part only")
    args = parser.parse_args(argv)
    bench = Bench("bench_zoo" + ("_quick" if args.quick else ""), args)
    bench.note(bench.environment())
    out = bench.note
    if args.only in (None, "times"):
        bench_times(out)
    if args.only in (None, "minilm"):
        bench_minilm((0.5,) if args.quick else (0.75, 0.5, 0.3), out)
    if args.only in (None, "mobilenet"):
        bench_mobilenet((0.8,) if args.quick else (0.95, 0.9, 0.8, 0.7),
                        () if args.quick else (0.99, 0.95, 0.9), out)
    bench.write()


if __name__ == "__main__":
    main()
