"""Imbalanced-classification benchmark: every method x seeds on MedMNIST files or medimb datalists.

Each run trains with ``medimb.training.train`` (model chosen on val) and caches its result as JSON in
``--out/<dataset>/<method>[@<tag>]/seed<k>.json``; re-running skips finished runs, so the table can be built
up over several sessions. The table gives, per method (and variant ``--tag``), validation and test balanced
accuracy and AUC as mean +- sd over seeds with a 95 % t interval for the mean over seeds, test accuracy and
macro-F1, and the paired per-seed difference against ``ce`` (same seed, same data). ``--throughput``
measures stage-1 training samples/s with and without the metric loss (same network, interleaved in one
process so machine load hits both alike).

Datasets: a name is a MedMNIST file ``--data-dir/<name>.npz`` (e.g. ``adrenalmnist3d``,
``adrenalmnist3d_64``, ``breastmnist``), or a medimb datalist registered with ``--datalist NAME=PATH``;
``--make-synth DIR`` builds the synthetic DCE-MRI task (``medimb-prep synth`` + ``convert`` + ``datalist``,
each step skipped when its output exists) and registers it as ``synth_dce``.

Variants: ``--set FIELD=VALUE`` overrides method fields and ``--tag TAG`` files the run under
``<method>@<tag>`` so variants sit beside the defaults in one table. ``--stage2-from LABEL`` re-runs only
stage 2 of a two-stage method on the stage-1 model of the cached run ``LABEL`` (same dataset and seed; its
``stage1_best.pt`` is copied and the run resumed after stage 1, as ``bench_stage2_lr.py`` does), which makes
stage-2 variants (``stage2.rebalance=lws|tau_norm``, ``stage2.lr``) cost seconds instead of a full run.

Examples::

    python benchmarks/bench_imbalance.py --datasets adrenalmnist3d --methods ce two-stage cmsl --seeds 0 1 2
    python benchmarks/bench_imbalance.py --table-only
    python benchmarks/bench_imbalance.py --throughput --datasets adrenalmnist3d
    python benchmarks/bench_imbalance.py --make-synth /tmp/synth_dce --datasets synth_dce --spatial-size 32 \\
        --methods ce two-stage --seeds 0 1 2
    # stage 2 only, on the stage-1 models of the cached two-stage runs:
    python benchmarks/bench_imbalance.py --datasets adrenalmnist3d --methods two-stage --epochs 15 \\
        --stage2-epochs 5 --stage2-from two-stage --set stage2.rebalance=lws --tag lws
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
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
    "adrenalmnist3d_64": "ResNet-18+3D (64) 0.839/0.754, ResNet-50+3D (64) 0.818/0.751",
    "breastmnist": "ResNet-18 (28) 0.901/0.863, best published AUC 0.919",
}
SYNTH_DATASET = "synth_dce"
#: the synthetic DCE-MRI task of --make-synth: hard level (the benchmarks' level), 32x32 matrix, ~12 slices,
#: 3:1 benign:malignant (AdrenalMNIST3D 3.6:1, BreastMNIST 2.7:1), split 60/15/25 by subject, stratified
SYNTH_DEFAULTS = {"cases": 1000, "positive_fraction": 0.25, "difficulty": "hard", "matrix": 32, "slices": 12,
                  "seed": 0}


def run_label(method: str, tag: str | None) -> str:
    """The cache folder name of a run: ``method`` or ``method@tag`` (a variant)."""
    return f"{method}@{tag}" if tag else method


def dataset_path(dataset: str, args: argparse.Namespace) -> Path:
    """A registered datalist (``--datalist NAME=PATH``, ``--make-synth``) or ``--data-dir/<dataset>.npz``."""
    datalists = getattr(args, "datalists", {}) or {}
    return Path(datalists[dataset]) if dataset in datalists else Path(args.data_dir) / f"{dataset}.npz"


def prep(*cli: str) -> None:
    cmd = [sys.executable, "-m", "data_prep", *cli]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def make_synth(work: Path, cases: int, positive_fraction: float, difficulty: str, matrix: int, slices: int,
               seed: int, workers: int = 1) -> Path:
    """``medimb-prep synth`` -> ``convert`` -> ``datalist`` (60/15/25, stratified) under ``work``; each step
    is skipped when its output exists. Returns the datalist path (paths inside are relative to ``work``)."""
    synth, converted, datalist = work / "synth", work / "converted", work / "datalist.json"
    if not (synth / "labels.csv").exists():
        prep("synth", str(synth), "--cases", str(cases), "--positive-fraction", str(positive_fraction),
             "--seed", str(seed), "--matrix", str(matrix), "--slices", str(slices),
             "--difficulty", difficulty, "--workers", str(workers))
    if not (converted / "manifest.csv").exists():
        prep("convert", str(synth / "archive"), str(converted), "--no-progress", "-j", str(workers))
    if not datalist.exists():
        prep("datalist", str(converted), "--labels", str(synth / "labels.csv"), "--key", "case", "-o",
             str(datalist), "--val", "0.15", "--test", "0.25", "--seed", str(seed),
             "--class-names", "benign,malignant")
    return datalist


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


def copy_stage1(source: Path, run_dir: Path) -> None:
    """Seed ``run_dir`` with the finished stage 1 of the run folder ``source`` (``train(resume=True)`` then
    starts at stage 2, as ``bench_stage2_lr.py`` does)."""
    if not (source / "state" / "stage1.done").exists():
        raise SystemExit(f"--stage2-from: {source} has no finished stage 1 (state/stage1.done)")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "state").mkdir(parents=True)
    shutil.copy2(source / "stage1_best.pt", run_dir / "stage1_best.pt")
    shutil.copy2(source / "state" / "stage1.done", run_dir / "state" / "stage1.done")


def epoch_seconds(run_dir: Path) -> dict:
    """Median seconds per epoch of each stage (training + validation), from the wall times of the per-epoch
    validation scalars in the run's TensorBoard logs; {} when they cannot be read."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    out = {}
    for stage in ("stage1", "stage2"):
        folder = run_dir / "tensorboard" / stage
        if not folder.exists():
            continue
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        tags = [t for t in acc.Tags().get("scalars", []) if t.startswith("val_")]
        if not tags:
            continue
        times = sorted(e.wall_time for e in acc.Scalars(tags[0]))
        if len(times) > 1:
            out[stage] = round(statistics.median(b - a for a, b in zip(times, times[1:])), 2)
    return out


def overrides_of(items: list[str]) -> dict:
    """``--set`` items as the ``{field: value}`` a record stores (values parsed as JSON, else text)."""
    out = {}
    for item in items:
        field, _, text = item.partition("=")
        try:
            out[field] = json.loads(text)
        except json.JSONDecodeError:
            out[field] = text
    return out


def run_one(dataset: str, method: str, seed: int, args: argparse.Namespace) -> dict:
    label = run_label(method, args.tag)
    cache = Path(args.out) / dataset / label / f"seed{seed}.json"
    if cache.exists():
        record = json.loads(cache.read_text())
        if record.get("overrides", {}) != overrides_of(args.set):
            raise SystemExit(f"{cache} was made with --set {record.get('overrides')}, "
                             f"not {overrides_of(args.set)}: use another --tag or --out")
        return record
    m = method_config(method)
    if args.epochs:
        m.stage1.epochs = args.epochs
    if args.stage2_epochs and m.stage2 is not None:
        m.stage2.epochs = args.stage2_epochs
    overrides = apply_overrides(m, args.set)
    run_dir = Path(args.out) / dataset / label / f"seed{seed}"
    resume = (run_dir / "config.json").exists()
    if args.stage2_from:
        if m.stage2 is None:
            raise SystemExit(f"--stage2-from: {method} has no stage 2")
        source = Path(args.out) / dataset / args.stage2_from / f"seed{seed}"
        copy_stage1(source, run_dir)
        resume = True
    size = tuple(args.spatial_size) * (3 // len(args.spatial_size)) if args.spatial_size else None  # N: N^3
    cfg = TrainConfig(data=str(dataset_path(dataset, args)), out=str(run_dir), method=m, network=args.network,
                      network_kwargs=json.loads(args.network_kwargs), seed=seed, device=args.device,
                      spatial_size=size)
    if args.stage2_from:  # the copied stage 1 must be the one this config would have trained
        src = json.loads((source / "config.json").read_text())
        mine = json.loads(json.dumps(cfg.to_dict()))  # as config.json holds it (tuples as lists)
        for key in ("network", "network_kwargs", "spatial_size"):
            if src.get(key) != mine.get(key):
                raise SystemExit(f"--stage2-from {args.stage2_from}: {key} differs "
                                 f"({src.get(key)} vs {mine.get(key)})")
        if any(src["method"][k] != mine["method"][k] for k in ("stage1", "head", "head_kwargs")):
            raise SystemExit(f"--stage2-from {args.stage2_from}: its stage 1 / head differ from {label}'s")
    started, load_start = datetime.now(timezone.utc), os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    res = train(cfg, resume=resume, progress=not args.no_progress)
    record = {
        "dataset": dataset, "method": method, "tag": args.tag, "label": label, "seed": seed,
        "data": cfg.data, "network": args.network, "network_kwargs": cfg.network_kwargs,
        "spatial_size": cfg.spatial_size, "flip_tta": cfg.flip_tta, "overrides": overrides,
        "stage2_from": args.stage2_from,
        "stage1_epochs": m.stage1.epochs, "stage2_epochs": m.stage2.epochs if m.stage2 else 0,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "torch_threads": torch.get_num_threads(), "started_utc": started.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "epoch_seconds": epoch_seconds(run_dir),
        "val": {k: res["validation"][k] for k in KEYS}, "test": {k: res["test"][k] for k in KEYS},
        "test_ci95": res["test"].get("ci95"), "threshold": res["test"].get("threshold"),
        "selection": res["selection"],
    }
    write_text_atomic(cache, json.dumps(record, indent=2))
    return record


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided ``level`` t interval for the mean of ``values`` (over seeds): mean +- t * sd / sqrt(n);
    (nan, nan) for fewer than two values."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return math.nan, math.nan
    half = t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return statistics.mean(values) - half, statistics.mean(values) + half


def summarise(values: list[float], ci: bool = True) -> str:
    """``mean ± sd [lo, hi]`` (the 95 % t interval of the mean; without ``ci``: ``mean ± sd``)."""
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{mean:.3f} ± {sd:.3f}"
    if ci and len(values) > 1:
        lo, hi = t_interval(values)
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def load_runs(out: Path, dataset: str, methods=None) -> dict[str, list[dict]]:
    """Cached records by run label (``method`` or ``method@tag``) of ``methods`` (None: all) and their
    variants, methods in METHODS order, each method's variants after it."""
    folder = out / dataset
    found = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.exists() else []
    order = {name: i for i, name in enumerate(METHODS)}
    labels = sorted((x for x in found if methods is None or x.split("@")[0] in methods),
                    key=lambda x: (order.get(x.split("@")[0], len(order)), "@" in x, x))
    runs = {}
    for label in labels:
        records = [json.loads(p.read_text()) for p in sorted((folder / label).glob("seed*.json"))]
        if records:
            runs[label] = sorted(records, key=lambda r: r["seed"])
    return runs


def balanced_accuracy_at_half(run_dir: Path, split: str = "test") -> float | None:
    """Balanced accuracy of a binary run's ``predictions.csv`` on ``split`` at threshold 0.5 (the argmax, as
    runs decided before the operating point was chosen on validation); None when not binary or missing."""
    import csv

    path = run_dir / "predictions.csv"
    if not path.exists():
        return None
    rows = [r for r in csv.DictReader(path.open()) if r["split"] == split]
    probs = [k for k in (rows[0] if rows else {}) if k.startswith("prob_")]
    if len(probs) != 2:
        return None
    recalls = []
    for label in (0, 1):
        hits = [float(r[probs[1]]) > 0.5 for r in rows if int(r["label"]) == label]
        recalls.append(sum(h == bool(label) for h in hits) / len(hits) if hits else math.nan)
    return statistics.mean(recalls)


def paired(runs: list[dict], base: list[dict], split: str, key: str) -> list[float]:
    """Per-seed differences ``run - base`` of ``split``/``key`` over the seeds both have."""
    by_seed = {r["seed"]: r for r in base}
    return [r[split][key] - by_seed[r["seed"]][split][key] for r in runs if r["seed"] in by_seed]


def table(out: Path, datasets, methods=None, baseline: str = "ce") -> str:
    """Markdown tables per dataset: val and test metrics (mean ± sd [95 % t interval of the mean over
    seeds]; binary runs also test balanced accuracy at threshold 0.5, from predictions.csv), then the paired per-seed differences against ``baseline``. ``methods``: the methods to show
    with their variants (None: every cached run)."""
    lines = []
    for dataset in datasets:
        runs = load_runs(out, dataset, methods)
        if not runs:
            continue
        lines += [f"\n**{dataset}** (model and threshold chosen on validation; test metrics with flip TTA; "
                  f"published MedMNIST v2 AUC/ACC: {PUBLISHED.get(dataset, '-')})\n",
                  "| method | seeds | epochs (s1+s2) | val bal. acc | val AUC | test bal. acc [95 % CI] | "
                  "test AUC [95 % CI] | test ACC | test macro-F1 | test bal. acc at 0.5 | min/run |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for label, rs in runs.items():
            ep = f"{rs[0]['stage1_epochs']}+{rs[0]['stage2_epochs']}"
            if rs[0].get("stage2_from"):
                ep += f" (s2 only, s1 of {rs[0]['stage2_from']})"
            cells = [summarise([r["val"]["balanced_accuracy"] for r in rs], ci=False),
                     summarise([r["val"]["auc"] for r in rs], ci=False),
                     summarise([r["test"]["balanced_accuracy"] for r in rs]),
                     summarise([r["test"]["auc"] for r in rs]),
                     summarise([r["test"]["accuracy"] for r in rs], ci=False),
                     summarise([r["test"]["macro_f1"] for r in rs], ci=False)]
            half = [balanced_accuracy_at_half(out / dataset / label / f"seed{r['seed']}") for r in rs]
            cells.append(summarise(half, ci=False) if None not in half else "-")
            minutes = statistics.mean(r["seconds"] for r in rs) / 60
            lines.append(f"| {label} | {len(rs)} | {ep} | " + " | ".join(cells) + f" | {minutes:.1f} |")
        base = runs.get(baseline)
        if not base or len(runs) < 2:
            continue
        lines += [f"\nPaired against `{baseline}` (same seed; difference per seed, then mean "
                  "[95 % t interval]):\n",
                  "| method | seeds | val bal. acc diff | test bal. acc diff per seed | test bal. acc diff | "
                  "test AUC diff per seed | test AUC diff |",
                  "|---|---:|---:|---|---:|---|---:|"]
        for label, rs in runs.items():
            if label == baseline:
                continue
            dv = paired(rs, base, "val", "balanced_accuracy")
            db = paired(rs, base, "test", "balanced_accuracy")
            da = paired(rs, base, "test", "auc")
            if not db:
                continue
            lines.append(f"| {label} | {len(db)} | {statistics.mean(dv):+.3f} | "
                         + ", ".join(f"{d:+.3f}" for d in db) + f" | {_diff(db)} | "
                         + ", ".join(f"{d:+.3f}" for d in da) + f" | {_diff(da)} |")
    return "\n".join(lines)


def recipe_table(out: Path, datasets, methods=None, baseline: str = "ce", target: float = 0.03) -> str:
    """Which recipe validation picks across ``datasets``: for every run label cached on all of them (besides
    ``baseline``), the paired mean differences against ``baseline`` per dataset (validation balanced accuracy;
    test balanced accuracy and AUC), and whether it meets the target (test balanced accuracy >= ``target``
    above the baseline and AUC not below it, on every dataset, as 3-seed means). The pick is the label with
    the highest validation balanced accuracy averaged over the datasets (each a mean over seeds); test
    figures are reported beside it and never used to choose."""
    runs = {d: load_runs(out, d, methods) for d in datasets}
    runs = {d: r for d, r in runs.items() if baseline in r}
    if len(runs) < 2:
        return ""
    labels = [label for label in next(iter(runs.values()))
              if label != baseline and all(label in r for r in runs.values())]
    if not labels:
        return ""
    lines = [f"\nRecipe choice across {', '.join(runs)} (paired mean difference against `{baseline}` per "
             "dataset: val bal. acc / test bal. acc / test AUC; the pick: highest validation balanced accuracy "
             "averaged over the datasets):\n",
             "| method | " + " | ".join(runs) + " | mean val bal. acc | target met (test) |",
             "|---|" + "---:|" * len(runs) + "---:|---|"]
    score = {}
    for label in labels:
        cells, met = [], True
        for d, r in runs.items():
            dv = statistics.mean(paired(r[label], r[baseline], "val", "balanced_accuracy"))
            db = statistics.mean(paired(r[label], r[baseline], "test", "balanced_accuracy"))
            da = statistics.mean(paired(r[label], r[baseline], "test", "auc"))
            met = met and db >= target and da >= 0
            cells.append(f"{dv:+.3f} / {db:+.3f} / {da:+.3f}")
        score[label] = statistics.mean(statistics.mean(x["val"]["balanced_accuracy"] for x in r[label])
                                       for r in runs.values())
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {score[label]:.3f} | "
                     + ("yes" if met else "no") + " |")
    base = statistics.mean(statistics.mean(x["val"]["balanced_accuracy"] for x in r[baseline])
                           for r in runs.values())
    pick = max(score, key=score.get)
    lines.append(f"\nValidation picks **{pick}** (mean val bal. acc {score[pick]:.3f}; "
                 f"`{baseline}` {base:.3f}).")
    return "\n".join(lines)


def _diff(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:+.3f}"
    lo, hi = t_interval(values)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


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
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                   help="methods to train (default: all); the table shows these (with their variants), "
                        "or every cached run when not given")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, help="stage-1 epochs (default: each method's default)")
    p.add_argument("--stage2-epochs", type=int)
    p.add_argument("--network", default="cpunet")
    p.add_argument("--network-kwargs", default="{}", help='JSON for create_model, e.g. \'{"stem_width": 8}\'')
    p.add_argument("--device", default="auto")
    p.add_argument("--spatial-size", type=int, nargs="+", help="network input for datalists: N or X Y Z "
                   "(default: the network's, 64^3 for cpunet); MedMNIST files keep their own size")
    p.add_argument("--datalist", nargs="+", default=[], metavar="NAME=PATH",
                   help="a medimb datalist as dataset NAME")
    p.add_argument("--make-synth", type=Path, metavar="DIR",
                   help=f"build the synthetic DCE-MRI task under DIR (synth, convert, datalist; each step "
                        f"skipped when done) and register it as dataset {SYNTH_DATASET!r}; "
                        "its size: --synth-*")
    for key, value in SYNTH_DEFAULTS.items():
        p.add_argument(f"--synth-{key.replace('_', '-')}", type=type(value), default=value,
                       help=f"--make-synth: medimb-prep synth --{key.replace('_', '-')} (default {value})")
    p.add_argument("--tag", help="variant label: runs are cached under METHOD@TAG (use with --set)")
    p.add_argument("--stage2-from", metavar="LABEL",
                   help="re-run only stage 2 on the stage-1 model of the cached run LABEL (e.g. two-stage) "
                        "of the same dataset and seed")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override method fields, e.g. head_kwargs.scale=32 stage1.loss_kwargs.margin=0.35 "
                        "stage1.metric_weight=0.3 (sweeps: a --tag or an --out per setting; the cache keys on "
                        "the folder, and a cached run made with other overrides is refused)")
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
    args.datalists = {}
    for item in args.datalist:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--datalist {item!r}: expected NAME=PATH")
        args.datalists[name] = str(Path(path).resolve())
    if args.make_synth and not args.table_only:
        args.datalists[SYNTH_DATASET] = str(make_synth(
            args.make_synth.resolve(), args.synth_cases, args.synth_positive_fraction, args.synth_difficulty,
            args.synth_matrix, args.synth_slices, args.synth_seed))
    if args.stage2_from and not args.tag:
        raise SystemExit("--stage2-from needs --tag (the variant's own cache folder)")
    datasets = list(args.datasets)
    if not args.table_only:
        missing = [d for d in datasets if not dataset_path(d, args).exists()]
        if missing:
            print(f"skipping datasets not found: {missing}", file=sys.stderr)
        datasets = [d for d in datasets if d not in missing]
        for dataset in datasets:
            for seed in args.seeds:  # seeds outermost: every method gets seed 0 before any gets seed 1
                for method in args.methods or list(METHODS):
                    r = run_one(dataset, method, seed, args)
                    print(f"{dataset} {r.get('label', method)} seed{seed}: "
                          + " ".join(f"{k}={r['test'][k]:.3f}" for k in KEYS)
                          + f" ({r['seconds']:.0f} s)", flush=True)
    print(table(Path(args.out), datasets, args.methods))
    print(recipe_table(Path(args.out), datasets, args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
