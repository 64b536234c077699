"""PNG previews (axial, coronal, sagittal through the map's peak) and an ``index.html`` of all cases.

Slices are cut from the source grid after reorienting it to the closest RAS axes (nibabel), and
drawn in radiological convention like 3D Slicer (patient right on the left of the screen), with
each panel's aspect ratio set from the voxel spacing.
"""

from __future__ import annotations

import html
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from medimb.atomic import atomic_output  # noqa: E402

HEATMAP_CMAP = "inferno"
#: colour of the truth (lesion mask) outline in the previews; the thresholded region is cyan
TRUTH_COLOUR = "lime"
#: index.html row order: the datalist's splits, then files and folders (no split)
SPLIT_ORDER = ("training", "validation", "test", "")


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(*S)`` array on a grid with ``affine`` -> (array with axes closest to R, A, S; voxel sizes)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[ornt[:, 0].astype(int).argsort()]
    return ras, zooms


def _window(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1)


def save_preview(
    path: str | os.PathLike,
    image: np.ndarray,
    heat: np.ndarray,
    affine: np.ndarray,
    title: str,
    display_threshold: float = 0.3,
    region_threshold: float = 0.5,
    truth: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """Write a 3-panel PNG; returns the peak voxel (RAS-reoriented index) the slices pass through.

    Args:
        image: ``(*S_src)`` background (a channel or the subtraction). heat: ``(*S_src)`` map in [0, 1] on
            the same grid. truth: optional ``(*S_src)`` truth mask on the same grid, outlined in green.
        affine: the source's voxel-to-RAS affine.
    """
    img, zooms = to_ras(np.asarray(image, dtype=np.float32), affine)
    hm, _ = to_ras(np.asarray(heat, dtype=np.float32), affine)
    gt = to_ras(np.asarray(truth, dtype=np.float32) > 0.5, affine)[0] if truth is not None else None
    img = _window(img)
    peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(hm)), hm.shape))
    i, j, k = peak
    # (2D slice, heat slice, pixel size (horizontal, vertical), name, edge letters (left, right, top))
    cuts = [(slice(None), slice(None), k), (slice(None), j, slice(None)), (i, slice(None), slice(None))]
    panels = [
        (img[c], hm[c], None if gt is None else gt[c], size, name, letters)
        for c, size, name, letters in zip(
            cuts, ((zooms[0], zooms[1]), (zooms[0], zooms[2]), (zooms[1], zooms[2])),
            (f"axial k={k}", f"coronal j={j}", f"sagittal i={i}"),
            (("R", "L", "A"), ("R", "L", "S"), ("P", "A", "S")))
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=72)
    for ax, (im2, hm2, gt2, (dx, dy), name, letters) in zip(axes, panels):
        ax.imshow(im2.T, cmap="gray", origin="lower", aspect=dy / dx, interpolation="nearest")
        shown = np.ma.masked_less(hm2.T, display_threshold)
        ax.imshow(shown, cmap=HEATMAP_CMAP, vmin=0, vmax=1, alpha=0.45, origin="lower", aspect=dy / dx,
                  interpolation="nearest")
        if hm2.max() >= region_threshold > hm2.min():
            ax.contour(hm2.T >= region_threshold, levels=[0.5], colors="cyan", linewidths=0.8)
        if gt2 is not None and gt2.any() and not gt2.all():
            ax.contour(gt2.T.astype(np.float32), levels=[0.5], colors=TRUTH_COLOUR, linewidths=1.0)
        if name.startswith(("axial", "coronal")):
            ax.invert_xaxis()  # radiological: patient right on the screen's left
        for (x, y), letter in zip(((0.02, 0.5), (0.98, 0.5), (0.5, 0.97)), letters):
            ax.text(x, y, letter, transform=ax.transAxes, color="yellow", fontsize=8, ha="center",
                    va="center")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return peak


def sort_key(row: dict) -> tuple:
    """index.html order: split (training, validation, test, then no split), then the probability the rows
    are ranked by (:func:`ranking_probability`) from high to low, then the case."""
    split = row.get("split") or ""
    rank = SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)
    return (rank, split, -ranking_probability(row), row["case"])


def ranking_probability(row: dict) -> float:
    """Binary models: the probability of class 1 (e.g. malignant); more classes: the predicted class's."""
    probs = row["probabilities"]
    return float(probs[1]) if len(probs) == 2 else float(probs[row["predicted"]])


def render_index(rows: list[dict], methods: list[str], class_names: list[str], notes: list[str] | None = None,
                 truth: bool = False) -> str:
    """``index.html`` text: one table row per case (sorted by :func:`sort_key`) with split, true label,
    prediction, whether it is correct, class probabilities and previews.

    ``rows``: ``[{"case", "split", "predicted", "probabilities": [K floats], "label": int | None,
    "previews": {method: relative png path}}]``; ``notes``: lines shown above the table (background, scale);
    ``truth``: some previews outline the truth mask (the legend says so).
    """
    esc = html.escape

    def name(index):
        return class_names[index] if 0 <= index < len(class_names) else str(index)

    ranked_by = f"p({name(1)})" if len(class_names) == 2 else "p(predicted)"
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    body = []
    for r in sorted(rows, key=sort_key):
        probs = ", ".join(f"{esc(n)} {p:.3f}" for n, p in zip(class_names, r["probabilities"]))
        label = "" if r.get("label") is None else esc(name(r["label"]))
        cells = "".join(
            f'<td><a href="{esc(r["previews"][m])}"><img src="{esc(r["previews"][m])}" width="420"></a></td>'
            if m in r["previews"] else "<td></td>"
            for m in methods
        )
        ok, verdict = "", ""
        if r.get("label") is not None:
            right = r["label"] == r["predicted"]
            ok = ' class="right"' if right else ' class="wrong"'
            verdict = "&#10003; correct" if right else "&#10007; wrong"
        body.append(
            f"<tr><td>{esc(r.get('split') or '')}</td><td><b>{esc(r['case'])}</b></td><td>{label}</td>"
            f"<td{ok}>{esc(name(r['predicted']))}</td><td{ok}>{verdict}</td>"
            f"<td>{ranking_probability(r):.3f}</td><td>{probs}</td>{cells}</tr>"
        )
    legend = ("the cyan outline is the thresholded region (label map)"
              + (f"; the <span style='color:#0a0'>green</span> outline is the truth (the datalist's mask)"
                 if truth else ""))
    extra = "".join(f"<p>{esc(line)}</p>\n" for line in notes or [])
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>medimb explain</title>\n"
        "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        " table{border-collapse:collapse} .right{background:#dfd} .wrong{background:#fdd}"
        "</style></head><body>\n<h1>medimb attention maps</h1>\n"
        "<p>Heatmaps (inferno, 1 = most attended) over the scan; values below "
        f"the display threshold are hidden; {legend}. Slices "
        "pass through each map's peak; radiological convention (patient right on the left). "
        f"Rows: by split, then {esc(ranked_by)} from high to low.</p>\n"
        + extra
        + f"<table><tr><th>split</th><th>case</th><th>label</th><th>predicted</th><th>correct</th>"
        f"<th>{esc(ranked_by)}</th><th>probabilities</th>{head}</tr>\n"
        + "\n".join(body)
        + "\n</table></body></html>\n"
    )
