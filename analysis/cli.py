"""The ``decomp`` console script."""
from __future__ import annotations

import argparse
import sys

from .zoo import MissingZooPackage


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(limit=args.limit)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decomp", description="Decompose Linear/Conv layers of PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the pretrained MNIST CNN with every method and report")
    demo.add_argument("--limit", type=int, default=None, help="evaluate on the first N images only")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MissingZooPackage as err:
        print(f"decomp: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
