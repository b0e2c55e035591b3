"""SmolLM2-135M: low-rank compression of the 210 decoder Linears, every method side by side in one run.

Protocol (zoo entry ``smollm2-135m``): calibration on the first 32 x 256 tokens of the
Wikipedia calibration split; perplexity over the first 32 non-overlapping 256-token windows
of the test split (8,160 predicted tokens); "X% removed": the factorized decoder Linears hold
(100 - X)% of those layers' dense parameters (embeddings and lm_head untouched). Rows:

* plain SVD            ``compress(method="svd", ratio=kept)``
* whitened uniform     ``compress(calibration=calibrate(...), ratio=kept)`` (SVD-LLM's truncation)
* whitened + energy budget ``compress(calibration=calibrate(...), budget=dict(params=...))`` (relative output
  energy allocator)
* whitened + budget    ``compress(calibration=calibrate(..., fisher=True), budget=dict(params=..., min_rank=0.05))``
  (loss allocator on the calibration Fisher)
* whitened + latency budget ``budget=dict(latency=kept, min_rank=0.05)``: the same loss estimates, the decoder
  Linears' time measured on one 256-token window (layers.latency) instead of their parameters
* sequential uniform   ``compress_sequential(ratio=kept)``
* sequential + alloc   ``compress_sequential(budget=dict(layer_params=kept))`` (loss allocator)
* sequential + pairs   the same with ``pairs="auto"``: each MLP keeps ``kept`` of its hidden units (gate/up rows,
  down columns refitted; ``layers.interpolative``), the attention projections share the rest on the loss
* + recovery           ``recover(...)`` on the train split, when ``--recover-seconds`` > 0

Columns: kept / removed fraction, perplexity, compress time (calibration included, 1 thread),
forward speedup vs dense on one 256-token batch (interleaved rounds, median).

Run: ``python benchmarks/bench_llm.py`` (about an hour on 2 shared cores; ``--removed 0.2`` and
``--rows`` select a subset).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Bench, add_bench_args  # noqa: E402

import torch  # noqa: E402

from decomp_toolkit.analysis.zoo import smollm2  # noqa: E402
from decomp_toolkit.layers import SlowerThanDenseWarning, calibrate, compress  # noqa: E402
from decomp_toolkit.layers.sequential import compress_sequential  # noqa: E402

ROWS = ("sequential-budget", "sequential-budget-pairs", "sequential", "whitened", "whitened-budget", "whitened-energy-budget", "plain",
        "whitened-latency-budget", "recovered")
LINEARS = smollm2.DECODER_LINEARS


def peak_rss_mb(reset=False):
    """The process's peak resident set (VmHWM, MB) since the last reset (Linux; None elsewhere)."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            line = next(row for row in f if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def linear_params(model):
    return sum(m.weight.numel() for n, m in model.named_modules()
               if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear))


def run_row(row, model, cal_tokens, kept, cache, args):
    """``(compressed model, seconds, note)`` for one row."""
    start = time.perf_counter()
    if row == "plain":
        small, _ = compress(model, method="svd", ratio=kept, include=[LINEARS], progress=False)
    elif row in ("whitened", "whitened-budget", "whitened-energy-budget", "whitened-latency-budget"):
        fisher = row in ("whitened-budget", "whitened-latency-budget")
        key = ("calibration", fisher)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = calibrate(model, cal_tokens, include=LINEARS, batch_size=8, progress=False, fisher=fisher)
            cache[("calibrate_s", fisher)] = time.perf_counter() - t0
            first = True
        else:
            first = False
        cal = cache[key]
        if row == "whitened":
            small, _ = compress(model, method="svd", ratio=kept, calibration=cal, include=[LINEARS], progress=False)
            note = ""
        else:  # the latency row: the decoder Linears' time measured on one window (layers.latency)
            timed = dict(example_input=cal_tokens[:1]) if row == "whitened-latency-budget" else {}
            budget = {"latency" if timed else "params": kept, **(dict(min_rank=MIN_RANKS) if fisher else {})}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SlowerThanDenseWarning)
                small, report = compress(model, method="svd", budget=budget, calibration=cal, include=[LINEARS],
                                         progress=False, **timed)
            note = rank_summary(report)
        calibrate_s = cache[("calibrate_s", fisher)] if first else 0.0
        return small, time.perf_counter() - start + calibrate_s, note + (
            f" (includes calibrate {calibrate_s:.0f} s)" if first else "")
    elif row == "sequential":
        small, _ = compress_sequential(model, cal_tokens, ratio=kept, include=LINEARS, batch_size=8, progress=False)
    elif row in ("sequential-budget", "sequential-budget-pairs"):
        pairs = "auto" if row.endswith("pairs") else None   # the MLPs keep `kept` of their hidden units
        small, report = compress_sequential(model, cal_tokens, budget=dict(layer_params=kept), include=LINEARS,
                                            batch_size=8, progress=False, min_rank=MIN_RANKS, pairs=pairs)
        if pairs is None:
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
    timings = getattr(report, "timings", None)
    return "; ".join(parts) + (f"; timings {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}"
                               if timings else "")


def linear_macs_per_token(model):
    """MACs per token of every ``nn.Linear`` (factorized layers are chains of them; lm_head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def speed_section(bench, model, tokens, kept_values):
    """Whole-model forward speedup vs the Linear-MAC ratio (eager, 1 thread) for uniform SVD ratios."""
    rows = []
    for kept, label in itertools.product(kept_values, ("uniform ratio", "budget latency")):
        options = dict(ratio=kept) if label == "uniform ratio" else dict(budget=dict(latency=kept),
                                                                         example_input=tokens[:1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowerThanDenseWarning)
            small, _ = compress(model, method="svd", include=[LINEARS], progress=False, **options)
        ratio = linear_macs_per_token(model) / linear_macs_per_token(small)
        for batch in (tokens[:1], tokens[:8]):
            realized = speedup(bench, model, small, batch)
            rows.append([f"{kept:.0%}", label, f"{len(batch)} x {batch.shape[1]}", f"{ratio:.2f}x",
                         f"{realized.median:.2f}x", f"{realized.median / ratio:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
        del small
    bench.section("Whole-model speedup vs MAC ratio (torch eager, 1 thread)",
                  ["decoder Linear MACs (or time) kept", "ranks", "input",
                   "MAC ratio (all Linears, lm_head included)",
                   "realized (thread CPU)", "realized / MAC ratio"], rows,
                  note="plain-SVD ranks (speed does not depend on the values): uniform ratio, or "
                       "budget=dict(latency=f) (the decoder Linears' time measured on one 256-token window, "
                       "layers.latency); attention, norms and the embedding lookup do not shrink")


def speedup(bench, model, small, tokens):
    with torch.inference_mode():
        t = bench.compare({"dense": lambda: model(tokens), "small": lambda: small(tokens)}, repeats=bench.repeats)
    return bench.ratio(t["dense"], t["small"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser, repeats=7)
    parser.add_argument("--removed", type=float, nargs="*", default=[0.2, 0.4, 0.6],
                        help="fractions of the decoder Linear parameters removed (none: the speed section only)")
    parser.add_argument("--rows", nargs="+", default=list(ROWS[:-1]), choices=ROWS)
    parser.add_argument("--recover-seconds", type=float, default=0.0,
                        help="time budget of the recovery row per ratio (0: no recovery row)")
    parser.add_argument("--train-windows", type=int, default=2048)
    parser.add_argument("--long-windows", type=int, default=4,
                        help="2048-token test windows (default 4: the same 8,192 tokens) for dense and the rows "
                             "of the first --removed (0: off)")
    parser.add_argument("--speed-kept", type=float, nargs="*", default=[0.5],
                        help="decoder-MAC fractions of the whole-model speed section (none: skip it)")
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
    long = smollm2.token_windows("test", count=args.long_windows, length=2048) if args.long_windows else None
    long_text = (f"; 2048-token windows ({args.long_windows} x 2048): {smollm2.perplexity(model, long, batch_size=1):.2f}"
                 if long is not None else "")
    bench.note(f"dense perplexity {dense_ppl:.2f} (32 x 256 test windows){long_text}; "
               f"decoder Linear parameters {dense:,}")
    if args.speed_kept:
        speed_section(bench, model, test, args.speed_kept)
    rows, cache, kept_sections = [], {}, len(bench.sections)
    for removed in args.removed:
        kept = 1 - removed
        for row in args.rows:
            cpu0, rss0 = time.thread_time(), peak_rss_mb(reset=True)
            small, seconds, note = run_row(row, model, cal_tokens, kept, cache, args)
            cpu, rss = time.thread_time() - cpu0, peak_rss_mb()
            ppl = smollm2.perplexity(small, test)
            if long is not None and removed == args.removed[0]:
                note = f"2048-token windows: {smollm2.perplexity(small, long, batch_size=1):.2f}; " + note
            params = linear_params_after(small)
            ratio = speedup(bench, model, small, one_batch)
            rss_text = f"{rss:,.0f} ({rss - rss0:+,.0f})" if rss is not None else "n/a"
            rows.append([f"{removed:.0%}", f"{kept:.0%}", row, f"{params / dense:.1%}", f"{ppl:,.2f}",
                         f"{seconds:.1f} ({cpu:.1f})", f"{ratio.median:.2f}x", rss_text, note])
            print(" | ".join(rows[-1]), flush=True)
            write_table(bench, dense_ppl, rows, kept_sections)
        cache.pop(("budget", kept), None)
    if not rows:  # the speed section alone
        bench.write()


def write_table(bench, dense_ppl, rows, kept_sections):
    """(Re)write the summary after every row, so an interrupted run leaves what it measured."""
    bench.sections = bench.sections[:kept_sections]
    bench.section("SmolLM2-135M, decoder Linears compressed (perplexity, 32 x 256 Wikipedia test windows)",
                  ["removed", "kept", "method", "Linear params kept", "perplexity", "compress s wall (thread CPU)",
                   "forward speedup (1 x 256)", "peak RSS MB while compressing (above the resident model)", "note"], rows,
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
