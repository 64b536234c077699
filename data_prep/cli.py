"""`medimb-prep` command line (also `python -m data_prep`).

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``; the parser it
adds sets ``func(args) -> int`` (the exit status). User mistakes raise :class:`UserError`, printed
as one line without a traceback (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

#: subcommand modules, in the order `--help` lists them
COMMAND_MODULES = (
    "data_prep.synth.command",
    "data_prep.pull_command",
    "data_prep.scan_command",
    "data_prep.convert_command",
    "data_prep.datalist_command",
    "data_prep.locate_command",
)


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def command_name(module: str) -> str:
    """``data_prep.scan_command`` -> ``scan``; ``data_prep.synth.command`` -> ``synth``."""
    parts = module.split(".")
    return parts[-2] if parts[-1] == "command" else parts[-1].removesuffix("_command")


def _requested(argv: list[str] | None) -> str | None:
    """The subcommand named on the command line, if it is one of ours (then only it is imported:
    some subcommands pull in heavy libraries, and start-up time counts when converting)."""
    names = {command_name(m) for m in COMMAND_MODULES}
    for token in sys.argv[1:] if argv is None else argv:
        if not token.startswith("-"):
            return token if token in names else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medimb-prep",
        description="DICOM archive -> NIfTI + de-identified sidecars + MONAI datalists.",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="more logging; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = _requested(argv)
    for name in COMMAND_MODULES:
        if wanted is not None and command_name(name) != wanted:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a subcommand still being built must not break the others
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    # pydicom's value-validation warnings quote DICOM values (a birth date, a name) and source paths:
    # they go through logging (shown with --verbose only) and every log line through the PHI scrubber
    # (pydicom's import resets its logger to WARNING, so import it first; decoder errors are in the report)
    import pydicom  # noqa: F401

    logging.getLogger("pydicom").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL + 1)
    from data_prep.deid import install_log_scrubbing

    install_log_scrubbing()
    if hasattr(signal, "SIGTERM"):  # a killed run (SIGTERM) still writes report.json on its way out
        signal.signal(signal.SIGTERM, _terminate)
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


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
