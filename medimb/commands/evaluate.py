"""``medimb evaluate --checkpoint CKPT --data PATH --out DIR``: the evaluation output of a trained model.

Writes DIR/metrics.json, DIR/predictions.csv and DIR/plots/<split>/ (:mod:`medimb.evaluation.report`), the
same files ``medimb train`` writes into its run folder and the bundles' evaluate step into theirs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medimb.commands.options import add_runtime_options, add_splits_option, check_workers
from medimb.errors import UserError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="metrics, predictions and plots of a checkpoint on a MedMNIST .npz or datalist",
                              description="Evaluate a trained checkpoint; writes DIR/metrics.json, DIR/predictions.csv "
                              "and DIR/plots/<split>/.")
    p.add_argument("--checkpoint", required=True, help="checkpoint from medimb train (e.g. RUN/final.pt) or a bundle")
    p.add_argument("--data", required=True, help="MedMNIST .npz or datalist JSON")
    p.add_argument("--out", required=True, help="output folder")
    add_splits_option(p, ["validation", "test"], "splits to evaluate")
    add_runtime_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not Path(args.data).exists():
        raise UserError(f"--data does not exist: {args.data}")
    check_workers(args.workers)
    from medimb.data.errors import surface_data_errors
    from medimb.evaluation.evaluate import evaluate_checkpoint
    from medimb.evaluation.report import summary_line

    with surface_data_errors():  # a DataError is a UserError: one line, no traceback
        result = evaluate_checkpoint(args.checkpoint, args.data, args.out, args.splits, args.device, args.workers)
    print(f"{summary_line(result, args.splits)} -> {Path(args.out) / 'metrics.json'}", file=sys.stdout)
    return 0
