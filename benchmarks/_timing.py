"""The benchmark harness: every script in benchmarks/ times through it.

Usage in a benchmark::

    from _timing import Bench, add_bench_args
    parser = argparse.ArgumentParser(); add_bench_args(parser); args = parser.parse_args()
    bench = Bench("bench_layers", args)          # sets threads (1 by default), seeds, GPU mode
    t = bench.compare({"dense": lambda: dense(x), "svd": lambda: small(x)})   # interleaved A B / B A rounds
    bench.ratio(t["dense"], t["svd"])            # median of per-round ratios, with its spread
    bench.section("Layers", header, rows)        # a markdown table, printed and kept
    bench.write()                                # benchmarks/results/<name>.md (+ raw JSON, git-ignored)

Statistics (:mod:`decomp_toolkit.layers.timing`): each A/B set is interleaved in rounds,
``--repeats`` (default 9, at least 7) rounds after ``--warmup`` calls; tables show the
median wall time with its relative inter-quartile range ("±"), the measuring thread's CPU
time (``time.thread_time``) beside it, and ratios as medians of per-round ratios.

Options every benchmark takes (:func:`add_bench_args`): ``--threads`` (1), ``--repeats``,
``--warmup``, ``--device cpu|cuda``, ``--dtype float32|float16|bfloat16``, ``--no-write``.

GPU mode (``--device cuda``): cuDNN benchmark mode on, modules and inputs moved to the
device and ``--dtype``, samples timed with CUDA events after a synchronize (thread CPU is
then the host's launch cost). The same tables are printed. This path has not been run on
the project's CPU-only machines; :func:`Bench.environment` says which device ran.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from decomp_toolkit.layers.timing import Timing, compare, paired_ratio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RAW = RESULTS / "raw"  # git-ignored; the <name>.md summaries are committed
MIN_REPEATS = 7
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WARMED = False


def add_bench_args(parser, threads: int = 1, repeats: int = 9):
    parser.add_argument("--threads", type=int, default=threads, help="torch threads (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds, >= 7 (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each callable first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/")
    return parser


def warm_up_process() -> None:
    """Run a few convolutions and matmuls once per process: the first timed case of a run
    otherwise also pays for waking the thread pool and building oneDNN primitives."""
    global _WARMED
    if _WARMED:
        return
    with torch.inference_mode():
        conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(4, 64, 32, 32)
        a = torch.randn(512, 512)
        for _ in range(10):
            conv(x)
            a @ a
    _WARMED = True


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(timing: Timing) -> str:
    """``"12.3 ±4%"``: median wall milliseconds and relative IQR."""
    return f"{timing.median * 1e3:.3g} ±{timing.spread:.0%}"


def cpu_ms(timing: Timing) -> str:
    return f"{timing.cpu_median * 1e3:.3g}"


def rank_label(rank) -> str:
    """``"64x64"`` for a tuple rank, ``"64"`` for an int."""
    return "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)


class Bench:
    """One benchmark run: settings, timing, the sections it prints and the files it writes."""

    def __init__(self, name: str, args=None, threads: int = 1, repeats: int = 9, device: str = "cpu",
                 dtype: str = "float32", write: bool = True, seed: int = 0):
        if args is not None:
            threads, repeats, device, dtype = args.threads, args.repeats, args.device, args.dtype
            write, self.warmup = not args.no_write, args.warmup
        else:
            self.warmup = 2
        if repeats < MIN_REPEATS:
            raise ValueError(f"{name}: --repeats {repeats} < {MIN_REPEATS}: medians of fewer rounds are noise")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{name}: --device cuda but torch.cuda.is_available() is False")
        self.name, self.repeats, self.device, self.write_files = name, repeats, torch.device(device), write
        self.dtype = DTYPES[dtype]
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.sections, self.raw, self.started = [], [], time.time()
        warm_up_process()

    # ---------------------------------------------------------------- timing
    def prepare(self, module, *shape_or_tensor):
        """``module`` (deep-copied) and an input moved to the run's device and dtype.

        Pass a shape (ints) for a random input or a tensor; the module is put in eval mode."""
        import copy
        module = copy.deepcopy(module).to(self.device, self.dtype).eval()
        if len(shape_or_tensor) == 1 and torch.is_tensor(shape_or_tensor[0]):
            x = shape_or_tensor[0].to(self.device)
            x = x.to(self.dtype) if x.is_floating_point() else x
        else:
            x = torch.randn(*shape_or_tensor, device=self.device, dtype=self.dtype)
        return module, x

    def compare(self, fns: dict, tag: str = "", min_sample_s: float = 0.002, repeats: int | None = None) -> dict:
        """Interleaved timing of ``{label: zero-arg callable}``; ``{label: Timing}``, kept for the raw file."""
        timings = compare(fns, repeats=repeats or self.repeats, warmup=self.warmup, min_sample_s=min_sample_s,
                          device=self.device)
        self.raw.append(dict(tag=tag, timings={k: dict(wall=t.wall, cpu=t.cpu, number=t.number)
                                               for k, t in timings.items()}))
        return timings

    def time_once(self, fn):
        """``(result, wall seconds, thread-CPU seconds)`` of one call (for slow one-shot steps)."""
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - wall0, time.thread_time() - cpu0

    @staticmethod
    def ratio(numerator: Timing, denominator: Timing, cpu: bool = False):
        return paired_ratio(numerator, denominator, cpu=cpu)

    # ---------------------------------------------------------------- output
    def environment(self) -> str:
        device = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() \
            or platform.machine()
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        return (f"torch {torch.__version__}, device {self.device} ({device}), dtype {str(self.dtype)[6:]}, "
                f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {load}; "
                f"{self.repeats} interleaved rounds after {self.warmup} warm-up calls; "
                f"'±' = inter-quartile range / median")

    def note(self, text: str):
        print(text + "\n", flush=True)
        self.sections.append(text)

    def section(self, title: str, header, rows, note: str = ""):
        text = f"## {title}\n\n" + (note + "\n\n" if note else "") + markdown_table(header, rows)
        self.note(text)
        return text

    def capture(self):
        """Context manager: everything printed inside is shown and also kept as one section of the summary."""
        import contextlib
        import io

        bench = self

        class _Tee(io.StringIO):
            def write(self, text):
                sys.__stdout__.write(text)
                return super().write(text)

        @contextlib.contextmanager
        def tee():
            buffer = _Tee()
            with contextlib.redirect_stdout(buffer):
                yield
            bench.sections.append(buffer.getvalue().strip())
        return tee()

    def write(self, command: str | None = None):
        """Write ``benchmarks/results/<name>.md`` (the summary) and a raw JSON under results/raw/."""
        if not self.write_files:
            return None
        command = command or "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}"] + sys.argv[1:])
        body = (f"# {self.name}\n\nCommand: `{command}`\n\n{self.environment()}\n\n"
                f"Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.started))}, "
                f"{time.time() - self.started:.0f} s.\n\n" + "\n\n".join(self.sections) + "\n")
        RESULTS.mkdir(exist_ok=True)
        RAW.mkdir(exist_ok=True)
        suffix = "" if self.device.type == "cpu" else f"-{self.device.type}-{str(self.dtype)[6:]}"
        summary = RESULTS / f"{self.name}{suffix}.md"
        summary.write_text(body)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(self.started))
        (RAW / f"{self.name}{suffix}-{stamp}.json").write_text(json.dumps(
            dict(command=command, environment=self.environment(), sections=self.sections, timings=self.raw)))
        print(f"wrote {summary.relative_to(RESULTS.parent.parent)}")
        return summary


def median_time(fn, *args, repeats: int = 9, warmup: int = 2) -> float:
    """Median wall seconds of ``fn(*args)`` (inference mode); prefer :meth:`Bench.compare` for A/B."""
    warm_up_process()
    return compare({"fn": lambda: fn(*args)}, repeats=repeats, warmup=warmup)["fn"].median


__all__ = ["Bench", "add_bench_args", "markdown_table", "ms", "cpu_ms", "median_time", "warm_up_process"]
