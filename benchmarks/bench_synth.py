"""Synthetic archive benchmark: speed of `medimb-prep synth`, and how hard its classification task is.

1. Wall and CPU time of ``synthesize_archive`` for the demo archive (default 40 cases, 64x64x~28).
2. AUC of global intensity statistics of the subtraction images (max and mean of phase 1 - phase 0
   and of last - phase 0) over ``--auc-cases`` cases per seed: should be near 0.5 (at most 0.75).
3. AUC of oracle lesion features computed inside the truth mask (wash-out ratio, compactness):
   the signal a model has to find.
4. With ``--cnn``: a small 3D CNN (torch) trained on in-memory phantoms (balanced classes) and its
   held-out AUC: the task is learnable from the images alone.

Usage::

    python benchmarks/bench_synth.py [--cases 40] [--auc-cases 60] [--seeds 0,1,2] [--cnn]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from data_prep.synth import PhantomConfig, synthesize_archive, synthesize_case


def bench_speed(cases: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        summary = synthesize_archive(Path(tmp) / "out", cases=cases, seed=0)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        size = sum(p.stat().st_size for p in (Path(tmp) / "out").rglob("*") if p.is_file())
    return {"cases": cases, "series": summary.series, "dicom_files": summary.dicom_files,
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "size_mb": round(size / 2**20, 1)}


def _compactness(mask: np.ndarray, spacing) -> float:
    """Volume / surface^1.5 (scale-free; higher = rounder)."""
    eroded = ndimage.binary_erosion(mask)
    surface = (mask & ~eroded).sum() * np.mean(spacing) ** 2
    return float(mask.sum() * np.prod(spacing) / max(surface, 1e-6) ** 1.5)


def bench_difficulty(n: int, seeds: list[int], config: PhantomConfig) -> list[dict]:
    results = []
    for seed in seeds:
        labels = (np.random.default_rng(seed).random(n) < 0.35).astype(int)
        feats, lesion_feats = [], []
        for i, label in enumerate(labels):
            case = synthesize_case(np.random.default_rng([seed, i]), int(label), config)
            early, late = case.phases[1] - case.phases[0], case.phases[-1] - case.phases[0]
            feats.append([early.max(), early.mean(), late.max(), late.mean()])
            if case.lesion_mask.any():
                m = case.lesion_mask
                lesion_feats.append([label, late[m].mean() / early[m].mean(),
                                     _compactness(m, case.geometry.spacing_zyx), early[m].mean(), m.sum()])
        feats, lesion_feats = np.array(feats), np.array(lesion_feats)
        row = {"seed": seed, "cases": n, "positives": int(labels.sum())}
        for name, column in zip(("early_max", "early_mean", "late_max", "late_mean"), feats.T):
            row[name] = round(roc_auc_score(labels, column), 3)
        y = lesion_feats[:, 0]
        row["lesion_washout"] = round(roc_auc_score(y, -lesion_feats[:, 1]), 3)
        row["lesion_compactness"] = round(roc_auc_score(y, -lesion_feats[:, 2]), 3)
        row["lesion_early_mean"] = round(roc_auc_score(y, lesion_feats[:, 3]), 3)
        row["lesion_voxels"] = round(roc_auc_score(y, lesion_feats[:, 4]), 3)
        results.append(row)
        print(row, flush=True)
    return results


def bench_cnn(n_train: int, n_test: int, config: PhantomConfig, epochs: int, seed: int = 100) -> dict:
    """Small 3D CNN on (phase-normalised) volumes: held-out AUC."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def make(n, offset):
        xs, ys = [], []
        for i in range(n):
            label = i % 2
            case = synthesize_case(np.random.default_rng([seed, offset + i]), label, config)
            v = case.phases / (np.percentile(case.phases[0], 99) + 1e-6)
            z = v.shape[1]
            zs = config.slices - config.slice_jitter
            start = (z - zs) // 2
            xs.append(v[:, start:start + zs])
            ys.append(label)
        return torch.tensor(np.stack(xs), dtype=torch.float32), torch.tensor(ys, dtype=torch.float32)

    t0 = time.perf_counter()
    x_train, y_train = make(n_train, 0)
    x_test, y_test = make(n_test, 10_000)
    channels = x_train.shape[1]
    model = nn.Sequential(
        nn.Conv3d(channels, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
        nn.Conv3d(16, 32, 3, stride=(1, 2, 2), padding=1), nn.BatchNorm3d(32), nn.ReLU(),
        nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.BatchNorm3d(64), nn.ReLU(),
        nn.Conv3d(64, 64, 3, stride=2, padding=1), nn.BatchNorm3d(64), nn.ReLU(),
        nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(64, 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for b in range(0, len(perm), 16):
            idx = perm[b:b + 16]
            x = x_train[idx]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            opt.zero_grad()
            loss = loss_fn(model(x).squeeze(1), y_train[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(x_test[b:b + 32]).squeeze(1) for b in range(0, len(x_test), 32)])
        auc = roc_auc_score(y_test.numpy(), scores.numpy())
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} held-out AUC {auc:.3f}", flush=True)
    return {"train": n_train, "test": n_test, "epochs": epochs, "auc": round(auc, 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--auc-cases", type=int, default=60)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cnn", action="store_true")
    parser.add_argument("--cnn-train", type=int, default=160)
    parser.add_argument("--cnn-test", type=int, default=80)
    parser.add_argument("--cnn-epochs", type=int, default=8)
    parser.add_argument("--cnn-matrix", type=int, default=PhantomConfig.matrix)
    parser.add_argument("--cnn-slices", type=int, default=PhantomConfig.slices)
    parser.add_argument("--difficulty", default="hard", help="phantom difficulty of the AUC and CNN checks "
                        "(default hard: the level the published figures were measured at)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-auc", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        print("speed:", bench_speed(args.cases), flush=True)
    if not args.skip_auc:
        bench_difficulty(args.auc_cases, [int(s) for s in args.seeds.split(",")],
                         PhantomConfig(difficulty=args.difficulty))
    if args.cnn:
        config = PhantomConfig(matrix=args.cnn_matrix, slices=args.cnn_slices,
                               slice_jitter=min(4, args.cnn_slices - 8), difficulty=args.difficulty)
        print("cnn:", bench_cnn(args.cnn_train, args.cnn_test, config, args.cnn_epochs))


if __name__ == "__main__":
    main()
