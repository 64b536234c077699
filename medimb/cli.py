"""`medimb` command line: `medimb train ...`, `medimb explain ...`, `medimb evaluate ...`.

Each subcommand lives beside the code it drives and exposes ``add_parser(subparsers)``; the parser
sets ``func(args) -> int``. User mistakes raise :class:`UserError` and are printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "medimb.training.command",
    "medimb.explain.command",
    "medimb.evaluation.command",
)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medimb", description="Class-imbalanced medical image classification.")
    parser.add_argument("--verbose", "-v", action="store_true", help="more logging; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subcommand still being built must not break the others
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"medimb {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
