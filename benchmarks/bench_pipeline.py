"""SmolLM2-135M pipeline speed: calibrate, whitened compress and (``--sequential``) compress_sequential.

Protocol (zoo entry ``smollm2-135m``, as :mod:`bench_llm`): calibration on 32 x 256 tokens of
the calibration split, the 210 decoder Linears compressed, perplexity over the first 32
256-token test windows. Each step is run once (``Bench.time_once``: wall and thread-CPU
seconds, 1 torch thread by default):

* ``calibrate(model, cal, include=LINEARS, batch_size=8)``
* ``compress(model, method="svd", ratio=R, calibration=..., include=[LINEARS])`` (whitened SVD)
* the same two with ``calibrate(..., gram_precision="float32")`` (float32 products over blocks of
  ``GRAM_BLOCK_ROWS`` = 2048 rows, float64 sums; SVD-LLM's own profiling is all float32)
* with ``--sequential``: ``compress_sequential(model, cal, ratio=R, ...)`` and
  ``compress_sequential(model, cal, budget=dict(layer_params=R), min_rank={"*": 0.05}, ...)``
* with ``--svdllm DIR`` (a checkout of SVD-LLM's code): its own profiling and truncation on the
  same tokens and batches, in the same process (:mod:`_svdllm_peer`), and the ratio of the totals

The ``ranks`` column is a digest of the per-layer ranks (equal digests: identical ranks).

Run: ``python benchmarks/bench_pipeline.py [--sequential] [--ratio 0.8] [--svdllm DIR]`` (about 2 minutes, 15 with
``--sequential``, on an idle core).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args  # noqa: E402

from decomp_toolkit.analysis.zoo import smollm2  # noqa: E402
from decomp_toolkit.layers import calibrate, compress  # noqa: E402
from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402

LINEARS = smollm2.DECODER_LINEARS
MIN_RANKS = {"*": 0.05}


def rank_digest(report) -> str:
    """Short digest of ``name:rank`` over the report's layers (rank None = dense)."""
    text = ";".join(f"{r.name}:{r.rank if r.replaced else None}" for r in report.layers)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def steps(model, cal_tokens, ratio, sequential, svdllm=None):
    """``{label: zero-argument callable}`` of the timed steps, in order; compress reuses calibrate's result."""
    done = {}

    def run_calibrate(precision):
        done[precision] = calibrate(model, cal_tokens, include=LINEARS, batch_size=8, progress=False,
                                    gram_precision=precision)
        return None, None

    def run_compress(precision):
        return compress(model, method="svd", ratio=ratio, calibration=done[precision], include=[LINEARS],
                        progress=False)

    plan = {}
    for precision, label in (("float64", ""), ("float32", " gram_precision=float32")):
        plan["calibrate" + label] = lambda p=precision: run_calibrate(p)
        plan["compress (whitened svd)" + label] = lambda p=precision: run_compress(p)
    if sequential:
        plan["compress_sequential ratio"] = lambda: compress_sequential(
            model, cal_tokens, ratio=ratio, include=LINEARS, batch_size=8, progress=False)
        plan["compress_sequential budget"] = lambda: compress_sequential(
            model, cal_tokens, budget=dict(layer_params=ratio), include=LINEARS, batch_size=8, progress=False,
            min_rank=MIN_RANKS)
    if svdllm:
        from _svdllm_peer import load_svdllm, svdllm_steps
        plan.update(svdllm_steps(load_svdllm(svdllm), model, cal_tokens, ratio))
    return plan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser, repeats=7)
    parser.add_argument("--ratio", type=float, default=0.8, help="kept fraction of the Linear parameters")
    parser.add_argument("--sequential", action="store_true", help="also time compress_sequential (ratio, budget)")
    parser.add_argument("--svdllm", metavar="DIR", help="a checkout of SVD-LLM's code: also time its profiling "
                        "and truncation on the same tokens (peer rows)")
    parser.add_argument("--tag", default="", help="suffix of the summary file (bench_pipeline-TAG.md)")
    args = parser.parse_args(argv)
    bench = Bench("bench_pipeline" + (f"-{args.tag}" if args.tag else ""), args)
    model = smollm2.load_smollm2()
    cal_tokens = smollm2.token_windows("calibration", count=32, length=256)
    test = smollm2.token_windows("test", count=32, length=256)
    rows, totals, peer_wall, peer_cpu = [], {}, 0.0, 0.0
    for label, step in steps(model, cal_tokens, args.ratio, args.sequential, args.svdllm).items():
        (small, report), wall, cpu = bench.time_once(step)
        if label.startswith("SVD-LLM truncation"):
            from _svdllm_peer import dense_equivalent
            small = dense_equivalent(small, model)
        ppl = f"{smollm2.perplexity(small, test):.4f}" if small is not None else ""
        timings = ", ".join(f"{k} {v:.1f}" for k, v in getattr(report, "timings", {}).items())
        rows.append([label, f"{wall:.1f}", f"{cpu:.1f}", ppl, rank_digest(report) if report else "", timings])
        if label.startswith(("calibrate", "compress (whitened svd)")):
            key = label.partition(" gram_precision")[1:]
            previous = totals.get(key, (0.0, 0.0))
            totals[key] = (previous[0] + wall, previous[1] + cpu)
        if label.startswith("SVD-LLM"):
            peer_wall, peer_cpu = peer_wall + wall, peer_cpu + cpu
        print(" | ".join(rows[-1]), flush=True)
    for at, (key, (wall, cpu)) in zip((2, 5), totals.items()):
        rows.insert(at, ["calibrate + compress" + "".join(key), f"{wall:.1f}", f"{cpu:.1f}", "", "", ""])
    if args.svdllm:
        rows.append(["SVD-LLM profiling + truncation", f"{peer_wall:.1f}", f"{peer_cpu:.1f}", "", "", ""])
        for key, (_, cpu) in totals.items():
            rows.append(["ours" + "".join(key) + " / SVD-LLM (thread CPU)", "", f"{cpu / peer_cpu:.2f}", "", "", ""])
    bench.section(f"SmolLM2-135M pipeline, ratio {args.ratio} (each step once)",
                  ["step", "wall s", "thread CPU s", "perplexity (32 x 256 test)", "ranks", "report timings (s)"],
                  rows)
    bench.write()


if __name__ == "__main__":
    main()
