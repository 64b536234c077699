"""``medimb evaluate --checkpoint CKPT --data PATH --out DIR``: the evaluation output of a trained model.

Writes DIR/metrics.json, DIR/predictions.csv and DIR/plots/<split>/ (:mod:`medimb.evaluation.report`), the
same files ``medimb train`` writes into its run folder and the bundles' evaluate step into theirs. Binary
models decide at the checkpoint's operating point (chosen on validation by ``medimb train``); ``--threshold``
overrides it.
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
    p.add_argument("--threshold", "--decision-threshold", dest="threshold", type=float, default=None, metavar="T",
                   help="binary models: call the positive class (class 1) when its probability > T (default: the "
                   "checkpoint's operating point, chosen on validation; 0.5 for checkpoints without one)")
    add_splits_option(p, ["validation", "test"], "splits to evaluate")
    add_runtime_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not Path(args.data).exists():
        raise UserError(f"--data does not exist: {args.data}")
    check_workers(args.workers)
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    from medimb.data.errors import surface_data_errors
    from medimb.evaluation.evaluate import evaluate_checkpoint
    from medimb.evaluation.report import interval_lines, summary_line

    with surface_data_errors():  # a DataError is a UserError: one line, no traceback
        result = evaluate_checkpoint(args.checkpoint, args.data, args.out, args.splits, args.device, args.workers,
                                     threshold=args.threshold)
    print(f"{summary_line(result, args.splits)} -> {Path(args.out) / 'metrics.json'}", file=sys.stdout)
    for line in interval_lines(result, args.splits):
        print(f"  {line}", file=sys.stdout)
    return 0
