"""Imbalanced-classification benchmark: every method x seeds on MedMNIST files, official test split.

Each run trains with ``medimb.training.train`` (model chosen on val) and caches its result as JSON in
``--out/<dataset>/<method>/seed<k>.json``; re-running skips finished runs, so the table can be built up
over several sessions. The table (mean +- std over seeds of test balanced accuracy, AUC, accuracy,
macro-F1) is printed as Markdown. ``--throughput`` measures stage-1 training samples/s with and without
the metric loss (same network, interleaved in one process so machine load hits both alike).

Examples::

    python benchmarks/bench_imbalance.py --datasets adrenalmnist3d --methods ce two-stage cmsl --seeds 0 1 2
    python benchmarks/bench_imbalance.py --table-only
    python benchmarks/bench_imbalance.py --throughput --datasets adrenalmnist3d
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from medimb.atomic import write_text_atomic
from medimb.training import METHODS, TrainConfig, method_config, train

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDIMB_SHARED_DATA", REPO.parent / "shared" / "data"))
DATASETS = ("adrenalmnist3d", "breastmnist")
KEYS = ("balanced_accuracy", "auc", "accuracy", "macro_f1")
PUBLISHED = {  # MedMNIST v2 (Yang et al., Sci. Data 2023), test split: (AUC, ACC)
    "adrenalmnist3d": "ResNet-18+3D 0.827/0.721, ResNet-50+3D 0.828/0.745, best published ACC 0.802",
    "breastmnist": "ResNet-18 (28) 0.901/0.863, best published AUC 0.919",
}


def apply_overrides(method, overrides: list[str]) -> dict:
    """``["head_kwargs.scale=32", "stage1.loss_kwargs.margin=0.35"]`` -> set those fields of a MethodConfig
    (values parsed as JSON, else kept as text); returns ``{field: value}`` for the record."""
    applied = {}
    for item in overrides:
        field, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, last = field.split(".")
        obj = method
        for part in parents:
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part, None)
            if obj is None:
                raise SystemExit(f"--set {item!r}: {method.name} has no field {part!r}")
        if isinstance(obj, dict):
            obj[last] = value
        elif hasattr(obj, last):
            setattr(obj, last, value)
        else:
            raise SystemExit(f"--set {item!r}: {method.name} has no field {last!r}")
        applied[field] = value
    return applied


def run_one(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    cache = Path(args.out) / dataset / method / f"seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    m = method_config(method)
    if args.epochs:
        m.stage1.epochs = args.epochs
    if args.stage2_epochs and m.stage2 is not None:
        m.stage2.epochs = args.stage2_epochs
    overrides = apply_overrides(m, args.set)
    run_dir = Path(args.out) / dataset / method / f"seed{seed}"
    cfg = TrainConfig(data=str(Path(args.data_dir) / f"{dataset}.npz"), out=str(run_dir), method=m,
                      network=args.network, network_kwargs=json.loads(args.network_kwargs), seed=seed,
                      device=args.device)
    start = time.perf_counter()
    res = train(cfg, resume=(run_dir / "config.json").exists(), progress=not args.no_progress)
    record = {
        "dataset": dataset, "method": method, "seed": seed, "network": args.network,
        "network_kwargs": cfg.network_kwargs, "flip_tta": cfg.flip_tta, "overrides": overrides,
        "stage1_epochs": m.stage1.epochs, "stage2_epochs": m.stage2.epochs if m.stage2 else 0,
        "seconds": round(time.perf_counter() - start, 1), "load_avg_end": os.getloadavg(),
        "val": {k: res["validation"][k] for k in KEYS}, "test": {k: res["test"][k] for k in KEYS},
        "selection": res["selection"],
    }
    write_text_atomic(cache, json.dumps(record, indent=2))
    return record


def table(out: Path, datasets, methods) -> str:
    lines = []
    for dataset in datasets:
        lines += [f"\n**{dataset}** (test split; published MedMNIST v2 AUC/ACC: {PUBLISHED.get(dataset, '-')})\n",
                  "| method | seeds | epochs (s1+s2) | balanced acc | AUC | ACC | macro-F1 | min/run |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for method in methods:
            runs = [json.loads(p.read_text()) for p in sorted((out / dataset / method).glob("seed*.json"))]
            if not runs:
                continue
            cells = []
            for k in KEYS:
                vals = [r["test"][k] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f}")
            ep = f"{runs[0]['stage1_epochs']}+{runs[0]['stage2_epochs']}"
            minutes = statistics.mean(r["seconds"] for r in runs) / 60
            lines.append(f"| {method} | {len(runs)} | {ep} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


def throughput(dataset: str, args: argparse.Namespace, steps: int = 10, repeats: int = 3) -> dict:
    """Stage-1 samples/s, CE vs CE + supervised contrastive (two-stage default), interleaved."""
    from medimb.data import BatchAugmentation, load_splits
    from medimb.training import build_stage1_loss
    from medimb.training.engines import AugmentingPrepareBatch, OutputsLoss
    from medimb.training.workflow import build_model

    torch.manual_seed(0)
    splits = load_splits(Path(args.data_dir) / f"{dataset}.npz")
    m = method_config("two-stage")
    cfg = TrainConfig(data="", out="", method=m, network=args.network)
    model = build_model(cfg, splits)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    bs = m.stage1.batch_size
    prep = AugmentingPrepareBatch(BatchAugmentation(splits.preprocessing.augmentation, splits.preprocessing.spatial_dims))
    losses = {
        "ce": OutputsLoss(build_stage1_loss("ce", splits.class_counts)),
        "ce+supcon": OutputsLoss(build_stage1_loss("ce", splits.class_counts, "supcon", m.stage1.metric_weight)),
    }
    batch = torch.utils.data.default_collate([splits.train[i] for i in range(bs)])
    model.train()
    times = {k: [] for k in losses}
    for _ in range(repeats + 1):  # first round is warm-up
        for name, loss_fn in losses.items():
            t = time.perf_counter()
            for _ in range(steps):
                x, y = prep(batch)
                opt.zero_grad(set_to_none=True)
                loss_fn(model.forward_all(x), y).backward()
                opt.step()
            times[name].append(steps * bs / (time.perf_counter() - t))
    rates = {k: statistics.median(v[1:]) for k, v in times.items()}
    rates["overhead_percent"] = 100 * (rates["ce"] / rates["ce+supcon"] - 1)
    rates["load_avg"] = os.getloadavg()
    return rates


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(SHARED / "medmnist"))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="stage-1 epochs (default: each method's default)")
    p.add_argument("--stage2-epochs", type=int)
    p.add_argument("--network", default="cpunet")
    p.add_argument("--network-kwargs", default="{}", help='JSON for create_model, e.g. \'{"stem_width": 8}\'')
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override method fields, e.g. head_kwargs.scale=32 stage1.loss_kwargs.margin=0.35 "
                        "stage1.metric_weight=0.3 (sweeps: one --out per setting, the cache does not key on it)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_imbalance"), help="run folders + result cache")
    p.add_argument("--table-only", action="store_true", help="print the table of cached results, train nothing")
    p.add_argument("--throughput", action="store_true", help="stage-1 samples/s with and without the metric loss")
    p.add_argument("--throughput-steps", type=int, default=10, help="steps per timed round (--throughput)")
    p.add_argument("--throughput-repeats", type=int, default=3, help="timed rounds per loss (--throughput)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.throughput:
        for dataset in args.datasets:
            print(dataset, json.dumps(throughput(dataset, args, args.throughput_steps, args.throughput_repeats)))
        return 0
    missing = [d for d in args.datasets if not (Path(args.data_dir) / f"{d}.npz").exists()]
    if missing:
        print(f"skipping datasets not found in {args.data_dir}: {missing}", file=sys.stderr)
    datasets = [d for d in args.datasets if d not in missing]
    if not args.table_only:
        for dataset in datasets:
            for seed in args.seeds:  # seeds outermost: every method gets seed 0 before any gets seed 1
                for method in args.methods:
                    r = run_one(dataset, method, seed, args)
                    print(f"{dataset} {method} seed{seed}: " + " ".join(f"{k}={r['test'][k]:.3f}" for k in KEYS)
                          + f" ({r['seconds']:.0f} s)", flush=True)
    print(table(Path(args.out), datasets, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
