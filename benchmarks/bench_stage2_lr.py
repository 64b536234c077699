"""Stage-2 learning-rate sweep on a finished two-stage run: re-run only stage 2 from its stage-1 model.

Stage 1 is the expensive part; this copies ``RUN/stage1_best.pt`` (and its ``state/stage1.done`` marker)
into one folder per learning rate under ``--out`` and resumes, so only the classifier re-balancing runs.
``--lrs 0`` evaluates the stage-1 model without stage 2. Prints one Markdown row per learning rate
(val and test balanced accuracy and AUC, test accuracy and macro-F1).

Example::

    python benchmarks/bench_stage2_lr.py runs/bench_imbalance_e12/adrenalmnist3d/two-stage/seed0 --lrs 0 1e-3 1e-2 3e-2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from medimb.training.config import TrainConfig
from medimb.training.workflow import train


def rerun_stage2(run: Path, out: Path, lr: float) -> dict:
    """Stage 2 of ``run``'s config at learning rate ``lr`` (0: no stage 2) on its stage-1 model."""
    if out.exists():
        shutil.rmtree(out)
    (out / "state").mkdir(parents=True)
    shutil.copy2(run / "stage1_best.pt", out / "stage1_best.pt")
    shutil.copy2(run / "state" / "stage1.done", out / "state" / "stage1.done")
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    cfg.out = str(out)
    if lr > 0:
        cfg.method.stage2.lr = lr
    else:
        cfg.method.stage2 = None
    return train(cfg, resume=True, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="finished two-stage run folder (medimb train --out)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 3e-2])
    parser.add_argument("--out", type=Path, default=Path("runs/stage2_lr"))
    args = parser.parse_args()
    print("| stage-2 lr | val bal. acc | val AUC | test bal. acc | test AUC | test ACC | test macro-F1 | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for lr in args.lrs:
        t0 = time.time()
        r = rerun_stage2(args.run, args.out / f"lr{lr:g}", lr)
        v, t = r["val"], r["test"]
        print(f"| {'none (stage 1 only)' if lr == 0 else f'{lr:g}'} | {v['balanced_accuracy']:.3f} | {v['auc']:.3f} | "
              f"{t['balanced_accuracy']:.3f} | {t['auc']:.3f} | {t['accuracy']:.3f} | {t['macro_f1']:.3f} | "
              f"{time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
