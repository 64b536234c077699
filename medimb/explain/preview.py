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
) -> tuple[int, int, int]:
    """Write a 3-panel PNG; returns the peak voxel (RAS-reoriented index) the slices pass through.

    Args:
        image: ``(*S_src)`` source scan (first channel). heat: ``(*S_src)`` map in [0, 1] on the same grid.
        affine: the source's voxel-to-RAS affine.
    """
    img, zooms = to_ras(np.asarray(image, dtype=np.float32), affine)
    hm, _ = to_ras(np.asarray(heat, dtype=np.float32), affine)
    img = _window(img)
    peak = tuple(int(v) for v in np.unravel_index(int(np.argmax(hm)), hm.shape))
    i, j, k = peak
    # (2D slice, heat slice, pixel size (horizontal, vertical), name, edge letters (left, right, top))
    panels = [
        (img[:, :, k], hm[:, :, k], (zooms[0], zooms[1]), f"axial k={k}", ("R", "L", "A")),
        (img[:, j, :], hm[:, j, :], (zooms[0], zooms[2]), f"coronal j={j}", ("R", "L", "S")),
        (img[i, :, :], hm[i, :, :], (zooms[1], zooms[2]), f"sagittal i={i}", ("P", "A", "S")),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=72)
    for ax, (im2, hm2, (dx, dy), name, letters) in zip(axes, panels):
        ax.imshow(im2.T, cmap="gray", origin="lower", aspect=dy / dx, interpolation="nearest")
        shown = np.ma.masked_less(hm2.T, display_threshold)
        ax.imshow(shown, cmap=HEATMAP_CMAP, vmin=0, vmax=1, alpha=0.45, origin="lower", aspect=dy / dx,
                  interpolation="nearest")
        if hm2.max() >= region_threshold > hm2.min():
            ax.contour(hm2.T >= region_threshold, levels=[0.5], colors="cyan", linewidths=0.8)
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


def render_index(rows: list[dict], methods: list[str], class_names: list[str]) -> str:
    """``index.html`` text: one table row per case with prediction, probabilities, label and previews.

    ``rows``: ``[{"case", "predicted", "probabilities": [K floats], "label": int | None,
    "previews": {method: relative png path}}]``.
    """
    esc = html.escape
    head = "".join(f"<th>{esc(m)}</th>" for m in methods)
    body = []
    for r in rows:
        probs = ", ".join(f"{esc(n)} {p:.3f}" for n, p in zip(class_names, r["probabilities"]))
        label = "" if r.get("label") is None else esc(class_names[r["label"]] if r["label"] < len(class_names)
                                                        else str(r["label"]))
        cells = "".join(
            f'<td><a href="{esc(r["previews"][m])}"><img src="{esc(r["previews"][m])}" width="420"></a></td>'
            if m in r["previews"] else "<td></td>"
            for m in methods
        )
        ok = ""
        if r.get("label") is not None:
            ok = ' class="right"' if r["label"] == r["predicted"] else ' class="wrong"'
        body.append(
            f"<tr><td><b>{esc(r['case'])}</b></td><td{ok}>{esc(class_names[r['predicted']])}</td>"
            f"<td>{probs}</td><td>{label}</td>{cells}</tr>"
        )
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'><title>medimb explain</title>\n"
        "<style>body{font-family:sans-serif} td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
        " table{border-collapse:collapse} .right{background:#dfd} .wrong{background:#fdd}"
        "</style></head><body>\n<h1>medimb attention maps</h1>\n"
        "<p>Heatmaps (inferno, 1 = most attended) over the scan; values below "
        "the display threshold are hidden; the cyan outline is the thresholded region (label map). Slices "
        "pass through each map's peak; radiological convention (patient right on the left).</p>\n"
        f"<table><tr><th>case</th><th>predicted</th><th>probabilities</th><th>label</th>{head}</tr>\n"
        + "\n".join(body)
        + "\n</table></body></html>\n"
    )
