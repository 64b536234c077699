"""The options every torch command shares, spelled the same everywhere (``--device``, ``--workers``,
``--no-progress``, the datalist split names)."""

from __future__ import annotations

import argparse

#: split names, as in the datalist (``medimb-prep datalist``), metrics.json and predictions.csv
SPLITS = ("training", "validation", "test")


def add_runtime_options(parser: argparse.ArgumentParser, workers: bool = True) -> None:
    """``--device``, ``--workers/-j`` (commands that load data in batches) and ``--no-progress``."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:1 ... (default auto: cuda when available, else cpu)")
    if workers:
        parser.add_argument("--workers", "-j", type=int, default=0, metavar="N",
                            help="data loading worker processes (default 0: load in the main process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_splits_option(parser: argparse.ArgumentParser, default: list[str] | None, what: str) -> None:
    """``--splits`` (datalist split names)."""
    shown = " ".join(default) if default else "all"
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=default, metavar="SPLIT",
                        help=f"{what}: any of {', '.join(SPLITS)} (default: {shown})")


def check_workers(workers: int) -> None:
    from medimb.errors import UserError

    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
