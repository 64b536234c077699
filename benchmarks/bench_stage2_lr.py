"""Stage-2 learning-rate sweep on a finished two-stage run: re-run only stage 2 from its stage-1 model.

Stage 1 is the expensive part; this copies ``RUN/stage1_best.pt`` (and its ``state/stage1.done`` marker)
into one folder per learning rate under ``--out`` and resumes, so only the classifier re-balancing runs.
``--lrs 0`` evaluates the stage-1 model without stage 2. ``--seeds`` repeats stage 2 with other random
states (head initialisation, class-balanced batches) on the same stage-1 model, which shows how much of a
stage-2 result is chance. Prints one Markdown row per learning rate (val and test balanced accuracy and
AUC, test accuracy and macro-F1; mean +- std over the seeds).

Example::

    python benchmarks/bench_stage2_lr.py runs/bench_imbalance_e12/adrenalmnist3d/two-stage/seed0 --lrs 0 1e-3 1e-2 3e-2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from medimb.training.config import TrainConfig
from medimb.training.workflow import train


def rerun_stage2(run: Path, out: Path, lr: float, seed: int | None = None) -> dict:
    """Stage 2 of ``run``'s config at learning rate ``lr`` (0: no stage 2) on its stage-1 model;
    ``seed`` replaces the run's seed (stage 1 is loaded, not re-trained, so only stage 2 changes)."""
    if out.exists():
        shutil.rmtree(out)
    (out / "state").mkdir(parents=True)
    shutil.copy2(run / "stage1_best.pt", out / "stage1_best.pt")
    shutil.copy2(run / "state" / "stage1.done", out / "state" / "stage1.done")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    cfg.out = str(out)
    if seed is not None:
        cfg.seed = seed
    if lr > 0:
        cfg.method.stage2.lr = lr
    else:
        cfg.method.stage2 = None
    return train(cfg, resume=True, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="finished two-stage run folder (medimb train --out)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 3e-2])
    parser.add_argument("--seeds", type=int, nargs="+", help="stage-2 seeds (default: the run's own seed)")
    parser.add_argument("--out", type=Path, default=Path("runs/stage2_lr"))
    args = parser.parse_args()
    seeds = args.seeds or [None]
    print(f"seeds: {seeds}")
    print("| stage-2 lr | val bal. acc | val AUC | test bal. acc | test AUC | test ACC | test macro-F1 | s/run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    cols = [("validation", "balanced_accuracy"), ("validation", "auc"), ("test", "balanced_accuracy"), ("test", "auc"),
            ("test", "accuracy"), ("test", "macro_f1")]
    for lr in args.lrs:
        t0, results = time.time(), []
        for seed in seeds if lr > 0 else seeds[:1]:  # no stage 2: nothing random left
            results.append(rerun_stage2(args.run, args.out / f"lr{lr:g}_seed{seed}", lr, seed))
        cells = []
        for split, key in cols:
            vals = [r[split][key] for r in results]
            sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.3f}{sd}")
        name = "none (stage 1 only)" if lr == 0 else f"{lr:g}"
        print(f"| {name} | " + " | ".join(cells) + f" | {(time.time() - t0) / len(results):.0f} |", flush=True)


if __name__ == "__main__":
    main()
