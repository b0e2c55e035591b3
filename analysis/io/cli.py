"""The ``decomp`` console script.

::

    decomp analyze MODEL [--thresholds 0.8 0.9 0.95 0.99] [--scheme channel|spatial] [--plots DIR]
    decomp compress MODEL --method svd [--energy E | --tol T | --ratio R | --rank K |
                    --budget-params F | --budget-flops F | --budget-latency F] [--include PAT ...]
                    [--exclude PAT ...]
                    [--set KEY=VALUE ...] -o OUT [--format pt2|onnx|dir|ts] [--static-shapes] [--eval]
                    [--report-json FILE]
    decomp demo [--limit N] [--plots DIR | --no-plots]
    decomp zoo

    decomp info FILE

MODEL is a zoo name (``decomp zoo`` lists them) or a file: a ``torch.export`` archive
(``.pt2``), a TorchScript file (needs ``--input-shape``), a ``save_compressed`` folder, or a
whole pickled model (only with ``--trust-pickle``). ``compress`` writes OUT in the format
its extension names: ``.pt2`` (torch.export with a dynamic batch dim, and a dynamic sequence
dim for token inputs), ``.onnx`` (checked in onnxruntime against torch), ``.ts``, or a folder
(``--format dir``: safetensors + JSON manifest); a ``.pt`` name (a pickle) is refused unless
``--format pickle`` asks for it. The report travels inside the file: ``decomp info FILE``. Bad input
exits with status 2 and one line on stderr (set ``DECOMP_DEBUG=1`` for the traceback); so
does a request that compresses nothing (OUT is then not written).
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

from ..zoo import ZOO, MissingZooPackage

SPEC_FLAGS = ("energy", "tol", "ratio", "rank", "budget_params", "budget_flops", "budget_latency")


class CLIError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


# --------------------------------------------------------------------------- helpers

def _load(args):
    from . import model_io

    return model_io.load(args.model, trust_pickle=getattr(args, "trust_pickle", False),
                         input_shapes=getattr(args, "input_shape", None))


def _parse_set(items) -> dict:
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--set {item!r}: write KEY=VALUE, e.g. --set scheme=spatial")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def _spec_kwargs(args) -> dict:
    if args.budget_params is not None:
        return dict(budget=dict(params=args.budget_params))
    if args.budget_flops is not None:
        return dict(budget=dict(flops=args.budget_flops))
    if args.budget_latency is not None:
        return dict(budget=dict(latency=args.budget_latency))
    return {k: getattr(args, k) for k in ("energy", "tol", "ratio", "rank") if getattr(args, k) is not None}


def _format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _output_check(model, reference, example) -> dict:
    """Max abs and relative Frobenius difference of the outputs on the example input."""
    import torch

    with torch.no_grad():
        out, ref = model(*example), reference(*example)
    out, ref = (out[0], ref[0]) if isinstance(out, (tuple, list)) else (out, ref)
    diff = (out.float() - ref.float())
    norm = float(ref.float().norm())
    return {"max_abs_diff": float(diff.abs().max()), "rel_diff": float(diff.norm()) / norm if norm else 0.0}


# --------------------------------------------------------------------------- commands

def _analyze(args) -> int:
    import torch

    from ..spectra import energy_table

    torch.set_num_threads(max(1, args.threads))
    loaded = _load(args)
    table = energy_table(loaded.model, thresholds=tuple(args.thresholds), scheme=args.scheme)
    print(f"{loaded.source} ({loaded.format}): {sum(p.numel() for p in loaded.model.parameters()):,} parameters")
    print(table)
    if args.plots:
        try:
            from ..plots import plot_energy, plot_spectrum
        except ImportError as err:
            print(f"decomp: plots unavailable ({err}); install matplotlib (pip install matplotlib)", file=sys.stderr)
            return 1
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(str(loaded.source)).stem.replace(" ", "_")
        files = [out / f"{name}_energy.png", out / f"{name}_spectrum.png"]
        plot_energy(loaded.model, scheme=args.scheme, thresholds=tuple(args.thresholds), save=files[0])
        plot_spectrum(loaded.model, scheme=args.scheme, save=files[1])
        print("plots: " + ", ".join(str(f) for f in files))
    return 0


def _compress(args) -> int:
    import torch

    from decomp_toolkit.layers import compress

    from . import export, model_io

    torch.set_num_threads(max(1, args.threads))
    out_format = export.format_for_output(args.output, args.format)   # refused before any work
    options = _parse_set(args.set)
    spec = _spec_kwargs(args)
    methods = _method_names()
    if args.method not in methods:
        raise CLIError(f"--method {args.method!r} is not a method; available: {', '.join(methods)}")
    if not spec and _needs_spec(args.method):
        raise CLIError(f"method {args.method!r} needs a rank specification: pass one of the arguments --energy --tol "
                       f"--ratio --rank --budget-params --budget-flops --budget-latency")
    if "budget" not in spec and spec:
        from decomp_toolkit.decomp.rank import parse_rank_spec

        parse_rank_spec(**spec, allow_tuple=True, context="compress")   # one clear error before any loading
    loaded = _load(args)
    timed = args.budget_flops is not None or args.budget_latency is not None
    if loaded.example_input is None and (timed or out_format not in ("pickle", "dir")):
        raise CLIError("this model needs example inputs (for FLOPs, layer times or to export it): pass "
                       "--input-shape, e.g. --input-shape 1,3,224,224")
    if not Path(args.output.rstrip("/") or ".").parent.exists():
        raise CLIError(f"-o {args.output!r}: the directory {str(Path(args.output).parent)!r} does not exist")
    data = None
    if args.eval and loaded.entry is not None:
        data = loaded.entry.load_eval_data(args.eval_limit)
        print(f"before: {_format_metrics(loaded.entry.evaluate(loaded.model, data, reference=loaded.model))}")
    start = time.perf_counter()
    small, report = compress(loaded.model, method=args.method, include=tuple(args.include or ("*",)),
                             exclude=tuple(args.exclude or ()), example_input=loaded.example_input,
                             progress=not args.quiet, **spec, **options)
    seconds = time.perf_counter() - start
    print(report)
    if not report.replaced:
        reasons = sorted({r.status.removeprefix("skipped: ") for r in report.layers})
        raise CLIError(f"nothing was compressed (every layer kept dense: {'; '.join(reasons)[:300]}); "
                       f"{args.output} not written")
    print(f"compressed {len(report.replaced)} of {len(report.layers)} layers in {seconds:.2f} s")
    if args.eval:
        if loaded.entry is not None:
            print(f"after:  {_format_metrics(loaded.entry.evaluate(small, data, reference=loaded.model))}")
        elif loaded.example_input is not None:
            print(f"output vs original on the example input: "
                  f"{_format_metrics(_output_check(small, loaded.model, loaded.example_input))}")
        else:
            print("--eval: no evaluation data for this model (pass --input-shape to compare outputs)")
    _save_and_check(small, report, args, out_format, loaded)
    if args.report_json:
        Path(args.report_json).write_text(report.to_json(indent=2))
    return 0


def _save_and_check(small, report, args, out_format, loaded):
    """Write OUT and run it back against the model in memory (torch.export / onnxruntime)."""
    from . import export

    base = {"zoo": loaded.source} if loaded.format == "zoo" else None
    static = args.static_shapes or (loaded.static_shapes and out_format in ("export", "onnx"))
    if static and not args.static_shapes:
        print(f"note: {loaded.source} was traced at fixed shapes {_shapes(loaded.example_input)}, so {args.output} "
              f"has them too; export your model with dynamic_shapes for a dynamic batch")
    export.save(small, args.output, out_format, loaded.example_input, report=report, base=base, static=static)
    print(f"saved {args.output} ({FORMAT_LABELS[out_format]}{'' if static else _dynamic_note(out_format)})")
    if out_format in ("export", "onnx") and loaded.example_input is not None:
        batches = (loaded.example_input[0].shape[0],) if static else (1, 2, 7)
        check = export.check_export if out_format == "export" else export.check_onnx
        diffs = check(args.output, small, loaded.example_input, batches)
        what = "torch.export program" if out_format == "export" else "onnxruntime"
        print(f"checked {what} against torch at batch " + ", ".join(
            f"{b}: max abs diff {d:.2e}" for b, d in diffs.items()))


FORMAT_LABELS = {"export": "torch.export", "onnx": "ONNX", "dir": "save_compressed folder: safetensors + manifest",
                 "torchscript": "TorchScript, static shapes", "pickle": "pickle"}


def _shapes(example) -> str:
    return ", ".join("x".join(str(d) for d in x.shape) for x in example)


def _dynamic_note(fmt) -> str:
    return "; dynamic batch dim (and sequence dim of token inputs)" if fmt in ("export", "onnx") else ""


def _info(args) -> int:
    from .info import describe

    print(describe(args.file))
    return 0


def _demo(args) -> int:
    from ..demo import run_demo

    run_demo(limit=args.limit, plots_dir=None if args.no_plots else args.plots)
    return 0


def _zoo(args) -> int:
    for name, entry in ZOO.items():
        state = "installed" if entry.installed() else f"not installed: {entry.install}"
        print(f"{name:14s} {entry.description}  [metric: {entry.metric}; {state}]")
    return 0


# --------------------------------------------------------------------------- parser

def _model_arguments(p):
    p.add_argument("model", metavar="MODEL", help=f"zoo name ({', '.join(ZOO)}) or a model file "
                                                  f"(.pt2 torch.export, TorchScript, pickled model)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="example input shape, e.g. 1,3,224,224 or 1,128:int64 (repeat per input); needed for "
                        "TorchScript files and .pt2 files without stored example inputs")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (unpickling can run arbitrary code)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("DECOMP_THREADS", "2")),
                   help="torch threads (default 2)")


def _needs_spec(method) -> bool:
    from decomp_toolkit.layers import available_methods

    return bool(getattr(available_methods()[method], "spec_required", True))


def _method_names() -> list:
    from decomp_toolkit.layers import available_methods

    return sorted(available_methods())


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="decomp", description="Decompose Linear/Conv layers of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    analyze = sub.add_parser("analyze", help="per-layer table: svd rank needed for each energy threshold")
    _model_arguments(analyze)
    analyze.add_argument("--thresholds", type=_fraction, nargs="+", default=[0.8, 0.9, 0.95, 0.99],
                         metavar="E", help="energy fractions in (0, 1] (default 0.8 0.9 0.95 0.99)")
    analyze.add_argument("--scheme", choices=("channel", "spatial"), default="channel",
                         help="svd scheme for conv layers (default channel)")
    analyze.add_argument("--plots", metavar="DIR", help="also write energy / spectrum plots (PNG) into DIR")
    analyze.set_defaults(func=_analyze)

    comp = sub.add_parser("compress", help="factorize the layers of a model and save it")
    _model_arguments(comp)
    comp.add_argument("--method", default="svd",
                      help=f"decomposition method, one of: {', '.join(_method_names())} (default svd)")
    spec = comp.add_mutually_exclusive_group()
    spec.add_argument("--energy", type=_fraction, help="keep this fraction of each layer's spectral energy")
    spec.add_argument("--tol", type=_fraction, help="relative Frobenius error bound per layer")
    spec.add_argument("--ratio", type=_fraction, help="fraction of each layer's parameters to keep")
    spec.add_argument("--rank", type=int, help="the same rank for every layer")
    spec.add_argument("--budget-params", type=_fraction, metavar="F",
                      help="global budget: keep at most this fraction of the parameters (ranks allocated globally)")
    spec.add_argument("--budget-flops", type=_fraction, metavar="F",
                      help="global budget: keep at most this fraction of the Linear/Conv MACs")
    spec.add_argument("--budget-latency", type=_fraction, metavar="F",
                      help="global budget: keep at most this fraction of the layers' time measured on the example "
                           "input (this machine, 1 torch thread by default)")
    comp.add_argument("--include", nargs="+", metavar="PATTERN", help="only layers matching these fnmatch patterns")
    comp.add_argument("--exclude", nargs="+", metavar="PATTERN", help="keep layers matching these patterns dense")
    comp.add_argument("--set", nargs="+", metavar="KEY=VALUE",
                      help="extra method options, e.g. --set scheme=spatial random_state=0")
    comp.add_argument("-o", "--output", required=True, metavar="OUT",
                      help="output: .pt2 (torch.export, dynamic batch), .onnx (checked in onnxruntime), .ts "
                           "(TorchScript) or a folder with --format dir (safetensors + manifest, no pickle)")
    comp.add_argument("--format", choices=("pt2", "onnx", "dir", "ts", "pickle"),
                      help="output format; must agree with OUT's extension (default: from the extension)")
    comp.add_argument("--static-shapes", action="store_true",
                      help="export .pt2 / .onnx at the example input's shapes (no dynamic batch dim)")
    comp.add_argument("--eval", action="store_true", help="print the zoo metric before and after")
    comp.add_argument("--eval-limit", type=int, default=None, metavar="N", help="evaluate on the first N samples")
    comp.add_argument("--report-json", metavar="FILE", help="also write the report as JSON")
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    comp.set_defaults(func=_compress)

    demo = sub.add_parser("demo", help="compress the pretrained MNIST CNN with every method and report")
    demo.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    demo.add_argument("--plots", default="demo-out", help="folder for the PNG plots (default: demo-out)")
    demo.add_argument("--no-plots", action="store_true", help="do not write plots")
    demo.set_defaults(func=_demo)

    info = sub.add_parser("info", help="what a compressed file or folder holds: inputs, modules, report")
    info.add_argument("file", metavar="FILE", help=".pt2, .onnx, .ts file or save_compressed folder")
    info.set_defaults(func=_info)

    zoo = sub.add_parser("zoo", help="list the zoo models and whether their packages are installed")
    zoo.set_defaults(func=_zoo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, MissingZooPackage, ValueError, TypeError, OSError, KeyError, RuntimeError, MemoryError) as err:
        if os.environ.get("DECOMP_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError) and not isinstance(err, CLIError):
            message = f"{getattr(err, 'filename', '') or ''}: {err.strerror or message}".lstrip(": ")
        print(f"decomp: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
