"""``medimb evaluate --checkpoint CKPT --data PATH --out DIR``: metrics.json + plots of a trained model.

The data is preprocessed with the checkpoint's own ``preprocessing`` (exactly as in training), so a
datalist with other channels than the model was trained on is rejected with one line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medimb.cli import UserError

SPLITS = ("train", "val", "test")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="metrics and plots of a checkpoint on a MedMNIST .npz or datalist",
                              description="Evaluate a trained checkpoint; writes DIR/metrics.json and DIR/plots/.")
    p.add_argument("--checkpoint", required=True, help="checkpoint from medimb train (e.g. DIR/final.pt)")
    p.add_argument("--data", required=True, help="MedMNIST .npz or datalist JSON")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--splits", nargs="+", default=["val", "test"], choices=SPLITS, help="splits (default: val test)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=run)
    return p


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, splits=("val", "test"),
             device: str = "auto") -> dict:
    """Metrics per split (``medimb.evaluation.compute_metrics``) + plots per split; returns the metrics dict."""
    from medimb.data import load_splits
    from medimb.evaluation import compute_metrics
    from medimb.networks import CheckpointError, load_checkpoint
    from medimb.training.workflow import predict, resolve_device, uses_flip_tta, write_json, write_plots

    dev = resolve_device(device)
    try:
        model, meta = load_checkpoint(checkpoint, map_location=dev)
    except (FileNotFoundError, CheckpointError) as exc:
        raise UserError(str(exc)) from exc
    if "preprocessing" not in meta:
        raise UserError(f"{checkpoint}: checkpoint has no 'preprocessing'; it was not written by medimb train")
    data_splits = load_splits(data, preprocessing=meta["preprocessing"], cache="none")
    if data_splits.num_classes != model.config["num_classes"]:
        raise UserError(f"{data}: {data_splits.num_classes} classes, the model predicts {model.config['num_classes']}")
    names = meta.get("class_names") or data_splits.class_names
    out = Path(out)
    # evaluate the way training reported its metrics (flip TTA unless the run turned it off)
    tta = uses_flip_tta(meta.get("train_config", {}).get("flip_tta", False), data_splits.preprocessing)
    result: dict = {"checkpoint": str(Path(checkpoint).resolve()), "method": meta.get("method"), "flip_tta": tta}
    for split in splits:
        dataset = data_splits.train_eval if split == "train" else getattr(data_splits, split)
        p = predict(model, dataset, dev, flip_tta=tta)
        result[split] = compute_metrics(p["labels"], p["proba"])
        write_plots(p, names, out / "plots" / split)
    write_json(out / "metrics.json", result)
    return result


def run(args: argparse.Namespace) -> int:
    from medimb.data.errors import surface_data_errors

    if not Path(args.data).exists():
        raise UserError(f"--data does not exist: {args.data}")
    with surface_data_errors():  # a DataError is a UserError: one line, no traceback
        result = evaluate(args.checkpoint, args.data, args.out, args.splits, args.device)
    keys = ("balanced_accuracy", "auc", "accuracy", "macro_f1")
    parts = [f"{s} " + " ".join(f"{k}={result[s][k]:.3f}" for k in keys if result[s].get(k) is not None)
             for s in args.splits]
    print(" | ".join(parts) + f" -> {Path(args.out) / 'metrics.json'}", file=sys.stdout)
    return 0
