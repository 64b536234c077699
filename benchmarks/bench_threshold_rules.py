"""Decision-threshold rules scored on finished runs: which threshold, chosen on validation, does best on test.

    .venv/bin/python benchmarks/bench_threshold_rules.py runs/recipe14

Reads every ``<runs>/<dataset>/<method>/seed*/predictions.csv`` that ``bench_imbalance.py`` wrote (validation
and test rows, the positive-class probability in the last ``prob_*`` column). Each rule picks a threshold
from the validation rows only; the table gives the test balanced accuracy at that threshold, mean over
seeds. Rules: the validation maximum of balanced accuracy (what ``medimb.evaluation.operating_point`` does:
midpoint candidates, ties closest to 0.5), 0.5, the median over 300 bootstrap resamples of the validation
maximum, the threshold maximising the bootstrap-mean balanced-accuracy curve, and the validation prevalence.
Seeded (the bootstrap draws run in the order printed), so the table is reproducible.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def balanced_accuracy(y: np.ndarray, p: np.ndarray, t: float) -> float:
    pred = p > t
    return 0.5 * (pred[y == 1].mean() + (~pred[y == 0]).mean())


def load(path: Path) -> dict:
    rows = list(csv.DictReader(open(path)))
    column = [c for c in rows[0] if c.startswith("prob_")][-1]
    return {split: (np.array([int(r["label"]) for r in rows if r["split"] == split]),
                    np.array([float(r[column]) for r in rows if r["split"] == split]))
            for split in ("validation", "test")}


def max_balanced_accuracy(y, p):
    u = np.unique(p)
    cands = np.concatenate([[u[0] / 2], (u[:-1] + u[1:]) / 2, [(u[-1] + 1) / 2]])
    scores = np.array([balanced_accuracy(y, p, t) for t in cands])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    return cands[best[np.argmin(np.abs(cands[best] - 0.5))]], cands


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--bootstrap", type=int, default=300)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    def resamples(y):
        for _ in range(args.bootstrap):
            i = rng.integers(0, len(y), len(y))
            if y[i].min() != y[i].max():
                yield i

    def bagged_median(y, p):
        return float(np.median([max_balanced_accuracy(y[i], p[i])[0] for i in resamples(y)]))

    def bagged_curve(y, p):
        cands = max_balanced_accuracy(y, p)[1]
        curves = [[balanced_accuracy(y[i], p[i], t) for t in cands] for i in resamples(y)]
        return cands[int(np.argmax(np.sum(curves, axis=0)))]

    rules = {"validation max BA (now)": lambda y, p: max_balanced_accuracy(y, p)[0], "0.5": lambda y, p: 0.5,
             "bootstrap median": bagged_median, "bootstrap mean curve": bagged_curve,
             "validation prevalence": lambda y, p: y.mean()}
    table: dict = {}
    for path in sorted(args.runs.glob("*/*/seed*/predictions.csv")):
        run = load(path)
        for name, rule in rules.items():
            t = rule(*run["validation"])
            table.setdefault(path.parent.parent.relative_to(args.runs).as_posix(), {}).setdefault(name, []).append(
                balanced_accuracy(*run["test"], t))
    print("| runs | seeds | " + " | ".join(rules) + " |")
    print("|---|---:|" + "---:|" * len(rules))
    for key, scores in table.items():
        print(f"| {key} | {len(scores['0.5'])} | " + " | ".join(f"{np.mean(v):.3f}" for v in scores.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
