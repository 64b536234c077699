"""Localisation benchmark: COAM vs CAM vs Grad-CAM on one trained model, with known lesion masks.

Steps (each skipped when its output already exists in --work, so a run can be resumed):
1. ``medimb-prep synth`` a synthetic breast DCE-MRI archive with lesion masks in ``truth/``;
2. ``medimb-prep convert`` it to NIfTI;
3. a datalist (``medimb-prep datalist`` when available, else built here from manifest.csv +
   labels.csv: DCE phases as channels, stratified 60/15/25 split);
4. train with ``medimb.training.train`` (default method ``cmsl``);
5. for every positive (malignant) test case, on the same model and the same preprocessed input:
   COAM, multi-scale COAM (``coam_ms``: the last two resolution levels fused), CAM and Grad-CAM (class
   "malignant"), each inverted to the source NIfTI grid with
   ``medimb.explain.invert_to_source``; the truth mask is resampled onto that grid in world space
   (SimpleITK, nearest neighbour). Scores: pointing game, centre-of-mass distance (mm; map voxels
   >= 0.5), Dice of ``map >= 0.5``; and, as a diagnostic, how often the map peaks on the scan's outer
   faces (against the faces' share of the voxels: more means the map follows the field-of-view edge);
6. time per volume of a plain forward pass, COAM, multi-scale COAM, CAM and Grad-CAM (network grid, batch 1,
   interleaved, median of --repeats), all in this one process.

Paired comparisons on the same cases (exact McNemar test on the pointing-game hits, :func:`paired_hits`):
COAM and multi-scale COAM each against Grad-CAM, and multi-scale COAM against COAM.

Sanity rows scored through the very same path (``ORACLES``): ``oracle_mask``, the truth mask pushed
through the checkpoint's geometric preprocessing onto the network grid (must score pointing game ~1,
else the geometry is broken), and ``oracle_featuregrid``, that mask averaged onto the model's last
feature-map grid and upsampled like the maps (the best any map at that resolution can do). A map that
is all zero on the source grid counts as a miss and is reported under "empty maps".

The defaults are the configuration of the results in docs/benchmarks.md: 1000 synthetic cases (32x32
matrix, ~12 slices), a ``cpunet`` whose last feature map stays at 1/2 of the input
(``DEFAULT_NETWORK_KWARGS``) with global average pooling, cross-entropy, 60 epochs, batch 16, 32x32x32
input. About 15 minutes on two cores (training 12, explanation 2).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_localization.py --work /tmp/bench_loc --json /tmp/bench_loc/summary.json
    .venv/bin/python benchmarks/bench_localization.py --work /tmp/quick --cases 200 --epochs 10   # a quick look
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_localization.py --work /tmp/bench_mf --lesions multifocal \
        --cases 400   # the second phantom family (docs/benchmarks.md)

Prints a JSON summary and a Markdown table (for docs/benchmarks.md); ``--json PATH`` saves the summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from medimb.data.transforms import build_eval_transforms
from medimb.evaluation.localization import localization_scores
from medimb.explain import (
    FeatureMapClassifier,
    create_explainer,
    forward_to_network_grid,
    invert_to_source,
    minmax_per_volume,
    upsample_to,
)
from medimb.explain.pipeline import preprocess
from medimb.networks import load_checkpoint, predict_proba

METHODS = ("coam", "coam_ms", "cam", "gradcam")
#: (a, b) pairs compared case by case (McNemar)
PAIRS = (("coam", "gradcam"), ("coam_ms", "gradcam"), ("coam_ms", "coam"))
EXTRA_METHODS = ("coam_cosine", "gradcampp")  # reported for information, not part of the targets
# sanity rows: known maps through the same preprocess -> network grid -> invert -> score path
ORACLES = ("oracle_mask", "oracle_featuregrid")
THRESHOLD = 0.5
#: last feature map at 1/2 of the input (a perfect map at that resolution scores ~0.95, at cpunet's default
#: 1/8 only ~0.03) with the default global average pooling (see docs/benchmarks.md)
DEFAULT_NETWORK_KWARGS = {"stem_width": 16, "widths": [32], "depths": [2]}


def paired_hits(per_case: list[dict], a: str = "coam", b: str = "gradcam") -> dict:
    """Pointing-game hits of methods ``a`` and ``b`` on the same cases: the discordant counts and the exact
    McNemar p-value (two-sided binomial test on the discordant pairs; scipy)."""
    from scipy.stats import binomtest

    only_a = sum(1 for r in per_case if r[a]["pointing_game"] and not r[b]["pointing_game"])
    only_b = sum(1 for r in per_case if r[b]["pointing_game"] and not r[a]["pointing_game"])
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {f"only_{a}": only_a, f"only_{b}": only_b, "mcnemar_p": float(p)}


def prep_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "data_prep", *args]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def has_datalist_command() -> bool:
    done = subprocess.run(prep_command("datalist", "--help"), capture_output=True, text=True)
    return done.returncode == 0


def build_datalist(converted: Path, labels_csv: Path, out: Path, seed: int) -> None:
    """Fallback datalist: one item per subject, its DCE phases (pre first) as channels, stratified split."""
    labels = {r["case"]: int(r["label"]) for r in csv.DictReader(labels_csv.open())}
    phases: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for r in csv.DictReader((converted / "manifest.csv").open()):
        if r["kind"] == "dce_phase" and r["subject"] in labels:
            phases[r["subject"]].append((int(r["phase"]), r["path"]))
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {"training": [], "validation": [], "test": []}
    for label in sorted(set(labels.values())):
        subjects = sorted(s for s in phases if labels[s] == label)
        rng.shuffle(subjects)
        n_val, n_test = round(0.15 * len(subjects)), round(0.25 * len(subjects))
        for i, s in enumerate(subjects):
            split = "validation" if i < n_val else "test" if i < n_val + n_test else "training"
            paths = [str(Path("converted") / p) for _, p in sorted(phases[s])]
            splits[split].append({"image": paths, "label": label, "subject": s})
    splits["class_names"] = ["benign", "malignant"]
    out.write_text(json.dumps(splits, indent=1))


def truth_on_grid(mask_path: Path, reference_path: str) -> np.ndarray:
    """The truth mask resampled (world space, nearest) onto the reference NIfTI's grid, as (i, j, k)."""
    reference = sitk.ReadImage(reference_path)
    mask = sitk.ReadImage(str(mask_path))
    resampled = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0) > 0


def oracle_maps(mask_net: torch.Tensor, feature_shape) -> dict[str, torch.Tensor]:
    """Known maps on the network grid, ``(1, *S_net)`` each, to run through the same export and scoring:

    - ``oracle_mask``: the truth mask itself; must score pointing game 1 (else geometry is broken);
    - ``oracle_featuregrid``: the mask averaged onto the model's feature-map grid and upsampled back
      the way COAM/CAM are (trilinear): the best a perfect map at that resolution can do.
    """
    coarse = torch.nn.functional.adaptive_avg_pool3d(mask_net[None], tuple(feature_shape))
    return {"oracle_mask": mask_net,
            "oracle_featuregrid": minmax_per_volume(upsample_to(coarse, mask_net.shape[1:]))[0]}


def source_affine(path: str) -> np.ndarray:
    import nibabel as nib

    return nib.load(path).affine


def time_methods(model, x: torch.Tensor, explainers: dict, repeats: int) -> dict[str, float]:
    """Median seconds per volume of forward / each explainer, interleaved so load changes hit all alike."""

    def forward():
        with torch.no_grad():
            model(x)

    calls = {"forward": forward, **{m: (lambda e=e: e(x, class_idx=1)) for m, e in explainers.items()}}
    for fn in calls.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="working folder (reused when it exists)")
    parser.add_argument("--cases", type=int, default=1000, help="synthetic cases (default 1000: 600 train)")
    parser.add_argument("--positive-fraction", type=float, default=0.5,
                        help="share of malignant cases (localisation needs lesions; default 0.5)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--matrix", type=int, default=32, help="synth in-plane size (default 32)")
    parser.add_argument("--slices", type=int, default=12, help="synth nominal slices (default 12)")
    parser.add_argument("--workers", type=int, default=2, help="medimb-prep synth worker processes (default 2)")
    parser.add_argument("--difficulty", default="hard",
                        help="medimb-prep synth --difficulty (default hard: the level of the published results)")
    parser.add_argument("--lesions", default="single",
                        help="medimb-prep synth --lesions: 'single' (default, the published results) or "
                        "'multifocal' (the second localisation task: 2-3 foci per malignant case)")
    parser.add_argument("--method", default="ce", help="medimb training method (default ce)")
    parser.add_argument("--network", default="cpunet", help="backbone name (default cpunet)")
    parser.add_argument("--network-kwargs", type=json.loads, default=DEFAULT_NETWORK_KWARGS,
                        help='JSON for create_model, e.g. \'{"stem_width": 16, "widths": [32], "global_pool": "max"}\'')
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="stage-1 batch size (default 16)")
    parser.add_argument("--lr", type=float, default=None, help="stage-1 learning rate (default: the method's)")
    parser.add_argument("--spatial-size", type=int, nargs=3, default=(32, 32, 32))
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per volume (default 3)")
    parser.add_argument("--max-positives", type=int, default=None,
                        help="score only the first N malignant test cases (quick checks; default all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    synth, converted = work / "synth", work / "converted"
    datalist, train_dir = work / "datalist.json", work / "train"
    if not (synth / "labels.csv").exists():
        size = [*(["--matrix", str(args.matrix)] if args.matrix else []),
                *(["--slices", str(args.slices)] if args.slices else [])]
        run(prep_command("synth", str(synth), "--cases", str(args.cases), "--seed", str(args.seed),
                         "--positive-fraction", str(args.positive_fraction), "--workers", str(args.workers),
                         "--difficulty", args.difficulty, "--lesions", args.lesions, *size))
    if not (converted / "manifest.csv").exists():
        run(prep_command("convert", str(synth / "archive"), str(converted)))
    if not datalist.exists():
        if has_datalist_command():
            run(prep_command("datalist", str(converted), "--labels", str(synth / "labels.csv"),
                             "--key", "case", "--output", str(datalist), "--val", "0.15", "--test", "0.25",
                             "--seed", str(args.seed), "--class-names", "benign,malignant"))
        else:
            print("medimb-prep datalist not available: building the datalist in the benchmark", flush=True)
            build_datalist(converted, synth / "labels.csv", datalist, args.seed)
    t_data = time.perf_counter() - t0

    checkpoint = train_dir / "final.pt"
    if not checkpoint.exists():
        from medimb.training.config import TrainConfig, method_config

        method = method_config(args.method)
        method.stage1.epochs = args.epochs
        method.stage1.batch_size = args.batch_size
        if args.lr is not None:
            method.stage1.lr = args.lr
        if method.stage2 is not None:
            method.stage2.epochs = max(2, args.epochs // 4)
        config = TrainConfig(data=str(datalist), out=str(train_dir), method=method, seed=args.seed,
                             device="cpu", amp=False, spatial_size=tuple(args.spatial_size),
                             network=args.network, network_kwargs=dict(args.network_kwargs))
        from medimb.training.workflow import train

        result = train(config, progress=True)
        print("test metrics:", json.dumps(result["test"], default=float)[:400], flush=True)
    t_train = time.perf_counter() - t0 - t_data

    model, meta = load_checkpoint(checkpoint)
    torch.manual_seed(args.seed)
    transform = build_eval_transforms(meta["preprocessing"])
    items = json.loads(datalist.read_text())["test"]
    base = datalist.parent
    truth_dir = synth / "truth"
    explainers = {m: create_explainer(m, model) for m in (*METHODS, *EXTRA_METHODS)}
    per_case, timings = [], []
    n_test, correct = 0, 0
    for item in items:
        paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
        images = [str(base / p) for p in paths]
        case = item.get("subject") or Path(images[0]).name.split("_")[0]
        data = preprocess(transform, {"image": images, "case": case})
        x = data["image"].as_tensor().unsqueeze(0).float()
        with torch.no_grad():
            proba = predict_proba(model, model(x))[0]
        if n_test == 0:  # CAM/Grad-CAM re-route the model: check it still gives the model's logits
            FeatureMapClassifier(model).check_matches(x)
        n_test += 1
        correct += int(int(proba.argmax()) == int(item["label"]))
        if int(item["label"]) != 1 or (args.max_positives is not None and len(per_case) >= args.max_positives):
            continue
        mask = truth_on_grid(truth_dir / f"{case}_lesion.nii.gz", images[0])
        affine = source_affine(images[0])
        row = {"case": case, "p_malignant": float(proba[1]), "lesion_voxels": int(mask.sum()),
               # share of the scan's voxels on its outer faces: the chance level of "peak_on_border"
               "border_share": 1.0 - float(np.prod([max(n - 2, 0) for n in mask.shape])) / mask.size}
        with torch.no_grad():
            feature_shape = model.forward_features(x).shape[2:]
        mask_net = forward_to_network_grid(truth_dir / f"{case}_lesion.nii.gz", meta["preprocessing"])
        maps = {name: explainer(x, class_idx=1)[0] for name, explainer in explainers.items()}
        maps.update(oracle_maps(mask_net, feature_shape))
        for name, net_map in maps.items():
            heat = invert_to_source(net_map, data, transform)
            if float(heat.max()) <= 0:  # e.g. a Grad-CAM whose ReLU removed everything: no peak, a miss
                row[name] = {"pointing_game": 0.0, "com_distance_mm": float("nan"), "dice": 0.0,
                             "peak_on_border": float("nan"), "empty": 1.0}
                continue
            heat = heat / float(heat.max())  # resampling can shave the peak below 1
            row[name] = {**localization_scores(heat, mask, affine, THRESHOLD), "empty": 0.0}
        timed = {m: explainers[m] for m in ("coam", "coam_ms", "gradcam", "cam")}
        timings.append(time_methods(model, x, timed, args.repeats))
        per_case.append(row)
        print(f"{case}: " + ", ".join(
            f"{m} pg={row[m]['pointing_game']:.0f} d={row[m]['com_distance_mm']:.1f}mm "
            f"dice={row[m]['dice']:.2f}"
            for m in (*METHODS, "oracle_mask")), flush=True)
    if not per_case:
        print("no positive test cases: nothing to score", file=sys.stderr)
        return 1

    def mean(method: str, key: str) -> float:
        """Mean over cases; the CoM distance of an empty (all-zero) map is undefined and left out."""
        return float(np.nanmean([r[method][key] for r in per_case]))

    time_ms = {k: 1000 * float(np.median([t[k] for t in timings])) for k in timings[0]}
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "cases": args.cases, "positive_fraction": args.positive_fraction, "lesions": args.lesions,
        "method": args.method,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "spatial_size": list(args.spatial_size),
        "network": meta.get("config", {}).get("name"), "head": meta.get("config", {}).get("head"),
        "network_config": meta.get("config", {}),
        "preprocessing": {k: meta["preprocessing"].get(k)
                          for k in ("spatial_size", "pixdim", "intensity", "pad_mode")},
        "border_share": float(np.mean([r["border_share"] for r in per_case])),
        "test_cases": n_test, "test_accuracy": correct / max(n_test, 1), "positive_test_cases": len(per_case),
        "scores": {m: {k: mean(m, k) for k in ("pointing_game", "com_distance_mm", "dice", "peak_on_border", "empty")}
                   for m in (*METHODS, *EXTRA_METHODS, *ORACLES)},
        "time_ms_per_volume": time_ms,
        "coam_over_forward": time_ms["coam"] / time_ms["forward"],
        "coam_over_gradcam": time_ms["coam"] / time_ms["gradcam"],
        "coam_ms_over_forward": time_ms["coam_ms"] / time_ms["forward"],
        **{f"{a}_vs_{b}": paired_hits(per_case, a, b) for a, b in PAIRS},
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                    "explain": round(time.perf_counter() - t0 - t_data - t_train, 1)},
        "per_case": per_case,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "per_case"}, indent=1))
    print("\n| method | pointing game | CoM distance (mm) | Dice @0.5 | peak on scan border "
          f"(chance {summary['border_share']:.2f}) | empty maps |\n|---|---|---|---|---|---|")
    for m in (*METHODS, *EXTRA_METHODS, *ORACLES):
        s = summary["scores"][m]
        print(f"| {m} | {s['pointing_game']:.3f} | {s['com_distance_mm']:.1f} | {s['dice']:.3f} "
              f"| {s['peak_on_border']:.3f} | {s['empty'] * len(per_case):.0f} |")
    print("\n| pair (a vs b) | only a hits | only b hits | McNemar p |\n|---|---|---|---|")
    for a, b in PAIRS:
        pair = summary[f"{a}_vs_{b}"]
        print(f"| {a} vs {b} | {pair[f'only_{a}']} | {pair[f'only_{b}']} | {pair['mcnemar_p']:.3g} |")
    print("\n| per volume (batch 1) | ms |\n|---|---|")
    for k, v in time_ms.items():
        print(f"| {k} | {v:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
