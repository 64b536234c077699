"""Shared by the PACS benchmarks (bench_pacs_pull.py, bench_dicom_export.py): the synthetic-archive
options and a fresh work folder holding that archive."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def synth_archive_parser(doc: str) -> argparse.ArgumentParser:
    """``--cases --matrix --slices`` of the synthetic archive and ``--work`` (replaced on every run)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    return parser


def fresh_synth_archive(args: argparse.Namespace, *extra: str) -> tuple[Path, float]:
    """Empty ``args.work``, write ``medimb-prep synth`` (2 post-contrast phases, ``extra`` options) into
    ``work/syn``; returns the archive folder and the seconds synth took. Exits when synth fails."""
    from data_prep.cli import main as prep

    shutil.rmtree(args.work, ignore_errors=True)
    start = time.perf_counter()
    if prep(["synth", str(args.work / "syn"), "--cases", str(args.cases), "--matrix", str(args.matrix),
             "--slices", str(args.slices), "--post-phases", "2", *extra]) != 0:
        raise SystemExit("synth failed")
    return args.work / "syn" / "archive", round(time.perf_counter() - start, 2)
