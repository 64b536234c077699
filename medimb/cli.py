"""`medimb` command line: `medimb train ...`, `medimb evaluate ...`, `medimb explain ...`, `medimb predict ...`.

Each subcommand lives in :mod:`medimb.commands` and exposes ``add_parser(subparsers)``; the parser sets
``func(args) -> int``. Parsing imports no torch (``medimb --help`` is instant); a command imports what it
needs when it runs. User mistakes raise :class:`medimb.errors.UserError` and are printed as one line
(exit status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from medimb import __version__
from medimb.commands import evaluate, explain, export_dicom, predict, train
from medimb.errors import UserError

COMMANDS = (train, evaluate, explain, predict, export_dicom)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medimb", description="Class-imbalanced medical image classification.")
    parser.add_argument("--version", action="version", version=f"medimb {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="more logging, every library warning, tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        from medimb.runtime import quiet_library_warnings

        quiet_library_warnings()
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
