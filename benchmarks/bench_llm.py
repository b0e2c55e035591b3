"""SmolLM2-135M: low-rank compression of the 210 decoder Linears, every method side by side in one run.

Protocol (zoo entry ``smollm2-135m``): calibration on the first 32 x 256 tokens of the
Wikipedia calibration split; perplexity over the first 32 non-overlapping 256-token windows
of the test split (8,160 predicted tokens); "X% removed": the factorized decoder Linears hold
(100 - X)% of those layers' dense parameters (embeddings and lm_head untouched). Rows:

* plain SVD            ``compress(method="svd", ratio=kept)``
* whitened uniform     ``compress(calibration=calibrate(...), ratio=kept)`` (SVD-LLM's truncation)
* whitened + budget    ``compress(calibration=..., budget=dict(params=...))`` (energy allocator)
* sequential uniform   ``compress_sequential(ratio=kept)``
* sequential + alloc   ``compress_sequential(budget=dict(layer_params=kept))`` (loss allocator)
* + recovery           ``recover(...)`` on the train split, when ``--recover-seconds`` > 0

Columns: kept / removed fraction, perplexity, compress time (calibration included, 1 thread),
forward speedup vs dense on one 256-token batch (interleaved rounds, median).

Run: ``python benchmarks/bench_llm.py`` (about an hour on 2 shared cores; ``--removed 0.2`` and
``--rows`` select a subset).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args  # noqa: E402

import torch  # noqa: E402

from decomp_toolkit.analysis.zoo import smollm2  # noqa: E402
from decomp_toolkit.layers import calibrate, compress  # noqa: E402
from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402

ROWS = ("sequential-budget", "sequential", "whitened", "whitened-budget", "plain", "recovered")
LINEARS = smollm2.DECODER_LINEARS


def linear_params(model):
    return sum(m.weight.numel() for n, m in model.named_modules()
               if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear))


def run_row(row, model, cal_tokens, kept, cache, args):
    """``(compressed model, seconds, note)`` for one row."""
    start = time.perf_counter()
    if row == "plain":
        small, _ = compress(model, method="svd", ratio=kept, include=[LINEARS], progress=False)
    elif row in ("whitened", "whitened-budget"):
        if "calibration" not in cache:
            t0 = time.perf_counter()
            cache["calibration"] = calibrate(model, cal_tokens, layers=LINEARS, batch_size=8, progress=False)
            cache["calibrate_s"] = time.perf_counter() - t0
        cal = cache["calibration"]
        if row == "whitened":
            small, _ = compress(model, method="svd", ratio=kept, calibration=cal, include=[LINEARS], progress=False)
        else:
            total, dense = sum(p.numel() for p in model.parameters()), linear_params(model)
            fraction = (total - (1 - kept) * dense) / total
            small, _ = compress(model, method="svd", budget=dict(params=fraction), calibration=cal,
                                include=[LINEARS], progress=False)
        seconds = time.perf_counter() - start + (cache["calibrate_s"] if row == "whitened" else 0.0)
        return small, seconds, ""
    elif row == "sequential":
        small, _ = compress_sequential(model, cal_tokens, ratio=kept, include=LINEARS, batch_size=8, progress=False)
    elif row == "sequential-budget":
        small, report = compress_sequential(model, cal_tokens, budget=dict(layer_params=kept), include=LINEARS,
                                            batch_size=8, progress=False, min_rank=MIN_RANKS)
        cache[("budget", kept)] = (small, report)
        return small, time.perf_counter() - start, rank_summary(report)
    elif row == "recovered":
        from decomp_toolkit.layers.recover import recover
        base, _ = cache.get(("budget", kept)) or run_row("sequential-budget", model, cal_tokens, kept, cache, args)[:2]
        small, log = recover(base, model, smollm2.token_windows("train", count=args.train_windows, length=256),
                             smollm2.token_windows("calibration", count=40, length=256)[32:],
                             seconds=args.recover_seconds, progress=False)
        return small, time.perf_counter() - start, log.summary()
    return small, time.perf_counter() - start, ""


MIN_RANKS = {"*": 0.05}


def rank_summary(report):
    """Per matrix type: layers kept dense, and the median / min / max rank of the others."""
    parts = []
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        rows = [r for r in report.layers if r.name.endswith(kind)]
        ranks = sorted(r.rank for r in rows if r.replaced)
        dense = len(rows) - len(ranks)
        text = f"{kind}: {dense} dense" + (f", rank median {ranks[len(ranks) // 2]} [{ranks[0]}-{ranks[-1]}]"
                                           if ranks else "")
        parts.append(text)
    return "; ".join(parts) + f"; timings {', '.join(f'{k} {v:.0f} s' for k, v in report.timings.items())}"


def speedup(bench, model, small, tokens):
    with torch.inference_mode():
        t = bench.compare({"dense": lambda: model(tokens), "small": lambda: small(tokens)}, repeats=bench.repeats)
    return bench.ratio(t["dense"], t["small"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser, repeats=7)
    parser.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--rows", nargs="+", default=list(ROWS[:-1]), choices=ROWS)
    parser.add_argument("--recover-seconds", type=float, default=0.0,
                        help="time budget of the recovery row per ratio (0: no recovery row)")
    parser.add_argument("--train-windows", type=int, default=2048)
    parser.add_argument("--tag", default="", help="suffix of the summary file (bench_llm-TAG.md), for split runs")
    parser.add_argument("--dense-ppl", type=float, default=None,
                        help="skip measuring the dense perplexity and print this value (for split runs)")
    args = parser.parse_args(argv)
    if args.recover_seconds > 0 and "recovered" not in args.rows:
        args.rows.append("recovered")
    bench = Bench("bench_llm" + (f"-{args.tag}" if args.tag else ""), args)
    model = smollm2.load_smollm2()
    cal_tokens = smollm2.token_windows("calibration", count=32, length=256)
    test = smollm2.token_windows("test", count=32, length=256)
    one_batch = test[:1]
    dense_ppl = args.dense_ppl if args.dense_ppl is not None else smollm2.perplexity(model, test)
    dense = linear_params(model)
    bench.note(f"dense perplexity {dense_ppl:.2f} (32 x 256 test windows); decoder Linear parameters {dense:,}")
    rows, cache = [], {}
    for removed in args.removed:
        kept = 1 - removed
        for row in args.rows:
            cpu0 = time.thread_time()
            small, seconds, note = run_row(row, model, cal_tokens, kept, cache, args)
            cpu = time.thread_time() - cpu0
            ppl = smollm2.perplexity(small, test)
            params = linear_params_after(small)
            ratio = speedup(bench, model, small, one_batch)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([f"{removed:.0%}", f"{kept:.0%}", row, f"{params / dense:.1%}", f"{ppl:,.2f}",
                         f"{seconds:.1f} ({cpu:.1f})", f"{ratio.median:.2f}x", f"{rss:,.0f}", note])
            print(" | ".join(rows[-1]), flush=True)
            write_table(bench, dense_ppl, rows)
        cache.pop(("budget", kept), None)


def write_table(bench, dense_ppl, rows):
    """(Re)write the summary after every row, so an interrupted run leaves what it measured."""
    bench.sections = bench.sections[:1]
    bench.section("SmolLM2-135M, decoder Linears compressed (perplexity, 32 x 256 Wikipedia test windows)",
                  ["removed", "kept", "method", "Linear params kept", "perplexity", "compress s wall (thread CPU)",
                   "forward speedup (1 x 256)", "peak RSS MB (process so far)", "note"], rows,
                  note=f"dense perplexity {dense_ppl:.2f}; SVD-LLM (its own code, same protocol): step 1 75.73 / "
                       f"236.12 / 930.64, step 2 67.83 / 208.12 / 804.79 at 20 / 40 / 60% removed. "
                       f"'compress s' of the whitened rows includes calibrate() once (first whitened row).")
    bench.write()


def linear_params_after(model):
    total = 0
    for name, module in model.named_modules():
        if not name.startswith("model.layers.") or name.count(".") != 4:
            continue
        total += sum(p.numel() for p in module.parameters())
    return total


if __name__ == "__main__":
    main()
