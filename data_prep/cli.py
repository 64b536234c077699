"""`medimb-prep` command line (also `python -m data_prep`).

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; the parser it
adds sets ``func(args) -> int`` (the exit status). User mistakes raise :class:`UserError`, printed
as one line without a traceback (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: subcommand modules, in the order `--help` lists them
COMMAND_MODULES = (
    "data_prep.synth.command",
    "data_prep.scan_command",
    "data_prep.convert_command",
    "data_prep.datalist_command",
)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medimb-prep",
        description="DICOM archive -> NIfTI + de-identified sidecars + MONAI datalists.",
    )
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"medimb-prep {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
