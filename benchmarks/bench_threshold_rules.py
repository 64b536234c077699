"""Decision-threshold rules scored on finished runs: which threshold, chosen on validation, does best on test.

    .venv/bin/python benchmarks/bench_threshold_rules.py runs/recipe14

Reads every ``<runs>/<dataset>/<method>/seed*/predictions.csv`` that ``bench_imbalance.py`` wrote (validation
and test rows, the positive-class probability in the last ``prob_*`` column). Each rule picks a threshold
from the validation rows only; the table gives the test balanced accuracy at that threshold, mean over
seeds. Rules: the validation maximum of balanced accuracy (what ``medimb.evaluation.operating_point`` does:
midpoint candidates, ties closest to 0.5), 0.5, the median over 300 bootstrap resamples of the validation
maximum, the threshold maximising the bootstrap-mean balanced-accuracy curve, the validation prevalence, and
the prior the final head was fitted under ("prior-matched", what ``medimb train --operating-point prior``
uses: 0.5 for a head re-trained with class-balanced sampling in stage 2 (cRT, LWS), the training split's
positive fraction for CE, none for tau-norm; read from each run's final.pt). For a calibrated probability p
of the positive class fitted under prior pi, balanced accuracy is maximised by predicting positive when
p > pi, so that rule needs no validation labels at all. A last table pairs every method with ``ce`` per
seed under that rule.
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


def shipped_head_prior(run_dir: Path) -> float | None:
    """The threshold of ``medimb train --operating-point prior`` for a finished run: the shipped rule
    (:func:`medimb.training.config.head_prior`) on the method and training class counts its final.pt
    records (checkpoints written before the rule existed have both)."""
    from medimb.networks import read_checkpoint_file
    from medimb.training import TrainConfig
    from medimb.training.config import head_prior

    meta = read_checkpoint_file(run_dir / "final.pt")
    return head_prior(TrainConfig.from_dict(meta["train_config"]).method, meta["class_counts"])


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
    prior_matched: dict = {}
    for path in sorted(args.runs.glob("*/*/seed*/predictions.csv")):
        run = load(path)
        key = path.parent.parent.relative_to(args.runs).as_posix()
        for name, rule in rules.items():
            t = rule(*run["validation"])
            table.setdefault(key, {}).setdefault(name, []).append(balanced_accuracy(*run["test"], t))
        prior = shipped_head_prior(path.parent)
        score = np.nan if prior is None else balanced_accuracy(*run["test"], prior)
        table[key].setdefault("prior-matched", []).append(score)
        if prior is not None:
            prior_matched[(key, path.parent.name)] = score
    rules["prior-matched"] = None
    print("| runs | seeds | " + " | ".join(rules) + " |")
    print("|---|---:|" + "---:|" * len(rules))
    for key, scores in table.items():
        print(f"| {key} | {len(scores['0.5'])} | " + " | ".join((f"{np.mean(v):.3f}" if np.isfinite(np.mean(v)) else "-") for v in scores.values()) + " |")
    print("\nPrior-matched thresholds, paired against ce (test balanced accuracy difference per seed, then mean):\n")
    print("| runs | per seed | mean |")
    print("|---|---|---:|")
    for (key, seed), score in sorted(prior_matched.items()):
        dataset, method = key.split("/", 1)
        if method == "ce" or seed != "seed0":
            continue
        diffs = [prior_matched[(key, s)] - prior_matched[(f"{dataset}/ce", s)]
                 for s in sorted(s for k, s in prior_matched if k == key) if (f"{dataset}/ce", s) in prior_matched]
        print(f"| {key} | " + ", ".join(f"{d:+.3f}" for d in diffs) + f" | {np.mean(diffs):+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
