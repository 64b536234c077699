"""Time and size the per-case 3D Slicer scenes (``<case>.mrb``, :mod:`medimb.explain.scene`).

    .venv/bin/python benchmarks/bench_slicer_scenes.py --explained OUT --datalist DATALIST [--split test]
    .venv/bin/python benchmarks/bench_slicer_scenes.py --clinical /tmp/bench_scene

``--explained``: an existing ``medimb explain`` output folder (e.g. the demo's overlays, 2 methods on the first
post-contrast phase) and the datalist it was made from; every case's scene is rewritten in place from the files
there (the source scans, the heatmaps and regions, the truth masks) and timed. ``--clinical``: one case at a
clinical size (448 x 448 x 160 int16 noise scan, two smooth maps, their regions, a truth mask) written into the
given folder first. Prints one line per measurement: seconds per case and MB per bundle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medimb.explain.export import write_heatmap, write_label
from medimb.explain.scene import write_case_scene

METHODS = ("coam", "gradcam")


def explained_rows(datalist: Path, out: Path, split: str, background: str) -> list[dict]:
    """The write_case rows of an explain output made from ``datalist`` (background channel 1, the methods above)."""
    items = json.loads(datalist.read_text())[split]
    rows = []
    for item in items:
        images = [str(datalist.parent / p) for p in item["image"]]
        case = Path(images[0]).name[: -len(".nii.gz")]
        rows.append({"case": case, "source": images[0], "prediction": "",
                     "background": {"name": background, "path": images[1], "in_output": False},
                     "heatmaps": {m: f"{case}_{m}_on-{background}.nii.gz" for m in METHODS},
                     "labels": {m: f"{case}_{m}_on-{background}_label.nii.gz" for m in METHODS},
                     "truth": str(datalist.parent / item["mask"]) if item.get("mask") else None})
    return rows


def clinical_row(folder: Path, shape=(448, 448, 160)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    scan = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(300, 60, shape).astype(np.int16), affine), str(scan))
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    heat = np.exp(-((axes[0][:, None, None] - 0.2) ** 2 + axes[1][None, :, None] ** 2
                    + axes[2][None, None, :] ** 2) / 0.1)
    row = {"case": "clinical", "source": str(scan), "prediction": "", "heatmaps": {}, "labels": {},
           "background": {"name": "ch0", "path": str(scan), "in_output": False}, "truth": str(folder / "mask.nii.gz")}
    for m in METHODS:
        write_heatmap(folder / f"clinical_{m}.nii.gz", heat, scan)
        write_label(folder / f"clinical_{m}_label.nii.gz", (heat >= 0.5).astype(np.uint8), scan)
        row["heatmaps"][m], row["labels"][m] = f"clinical_{m}.nii.gz", f"clinical_{m}_label.nii.gz"
    nib.save(nib.Nifti1Image((heat >= 0.7).astype(np.uint8), affine), row["truth"])
    return row


def time_rows(folder: Path, rows: list[dict]) -> str:
    seconds, sizes = [], []
    for row in rows:
        start = time.perf_counter()
        entry = write_case_scene(folder, row, display_threshold=0.3, opacity=0.4, threshold=0.5)
        seconds.append(time.perf_counter() - start)
        sizes.append((folder / entry["scene"]).stat().st_size / 1e6)
    return (f"{len(rows)} scene(s): {sum(seconds):.1f} s, {np.mean(seconds):.2f} s/case (max {max(seconds):.2f}); "
            f"{sum(sizes):.1f} MB, {np.mean(sizes):.2f} MB/case (max {max(sizes):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explained", type=Path, help="a medimb explain output folder")
    parser.add_argument("--datalist", type=Path, help="the datalist it was made from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--background", default="phase-01", help="the background tag in its file names")
    parser.add_argument("--clinical", type=Path, help="a scratch folder for the clinical-size case")
    args = parser.parse_args()
    if args.explained:
        print("explained:", time_rows(args.explained, explained_rows(args.datalist, args.explained, args.split,
                                                                    args.background)))
    if args.clinical:
        print("clinical 448x448x160:", time_rows(args.clinical, [clinical_row(args.clinical)]))


if __name__ == "__main__":
    main()
