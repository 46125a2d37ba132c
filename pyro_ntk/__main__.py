"""Command line: ``python -m pyro_ntk demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="python -m pyro_ntk", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small network, linearize it, print NTK figures")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyro_ntk.demo import run

        return run(seed=args.seed)
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
