"""How many of dcm2niix's volumes does `medimb-prep convert` reproduce on a DICOM corpus?

Both converters run on the same folder. Every 4D output is split into 3D volumes, every volume is
brought to RAS+ (``nibabel.as_closest_canonical``), and a dcm2niix volume counts as reproduced when
one of ours has the same shape, an affine within 1e-3 mm and the same voxel values after scaling
(relative 1e-5). DWI outputs must also carry the same b-values (within 1e-4, same order) and the same gradient
directions in world coordinates (up to sign: a gradient and its negative are the same encoding).

    python benchmarks/prep_vs_dcm2niix.py ../shared/data/dicom_qa/dcm_qa [more corpora...]

prints one line per corpus (reproduced / dcm2niix volumes, ours, time) and every volume that was
not reproduced. ``compare(corpus, workdir)`` is what tests/test_prep_qa_corpora.py calls.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
B0_MAX = float(np.finfo(np.float32).eps)  # b-values at or below this are b = 0 (as in data_prep.diffusion)


def dcm2niix_exe() -> str | None:
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.exists() else shutil.which("dcm2niix")


@dataclass
class Volume:
    """One 3D volume of a NIfTI file: ``data`` (X, Y, Z) float64 in RAS+, ``affine`` (4, 4)."""

    source: str
    index: int
    data: np.ndarray
    affine: np.ndarray
    bval: float | None = None
    bvec: tuple | None = None


@dataclass
class Comparison:
    corpus: str
    reference: int
    ours: int
    reproduced: int
    missing: list[str] = field(default_factory=list)
    seconds_ours: float = 0.0
    seconds_reference: float = 0.0


def _read_table(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    return np.array([[float(v) for v in line.split()] for line in path.read_text().splitlines() if line.strip()])


def world_gradient(bvec, affine) -> np.ndarray:
    """An FSL .bvec column (voxel frame of ``affine``) as a RAS unit vector, the inverse of
    :func:`data_prep.diffusion.fsl_bvecs` up to sign (dcm2niix's sign conventions differ from FSL's
    first-axis flip by an antipodal vector, which encodes the same diffusion weighting)."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    i_axis, j_axis = m[:, 0] / np.linalg.norm(m[:, 0]), m[:, 1] / np.linalg.norm(m[:, 1])
    k_axis = np.cross(i_axis, j_axis) * (np.sign(np.cross(i_axis, j_axis) @ m[:, 2]) or 1.0)
    v = np.asarray(bvec, dtype=float).copy()
    if np.linalg.det(m) > 0:  # FSL reads such images with the first voxel axis flipped
        v[0] *= -1.0
    return np.stack([i_axis, j_axis, k_axis]).T @ v


def volumes_of(folder: Path) -> list[Volume]:
    """Every 3D volume of every NIfTI under ``folder`` (with its .bval/.bvec entries when present;
    gradients as RAS unit vectors, so that files written on different voxel grids compare)."""
    out = []
    for path in sorted(folder.rglob("*.nii*")):
        written = nib.load(path)
        img = nib.as_closest_canonical(written)
        data = np.asanyarray(img.dataobj)
        if data.dtype.names:  # RGB24: the three channels as a last axis of a 3D volume (one "volume")
            data = np.stack([data[c] for c in data.dtype.names], axis=-1).astype(np.float64)
            out.append(Volume(str(path.relative_to(folder)), 0, data, img.affine, None, None))
            continue
        data = np.asarray(data, dtype=np.float64)
        stem = path.name.split(".nii")[0]
        bvals, bvecs = _read_table(path.with_name(stem + ".bval")), _read_table(path.with_name(stem + ".bvec"))
        series = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
        for t, vol in enumerate(series):
            bval = None if bvals is None else float(bvals.ravel()[t])
            bvec = None if bvecs is None or bval <= B0_MAX else tuple(world_gradient(bvecs[:, t], written.affine))
            out.append(Volume(str(path.relative_to(folder)), t, vol, img.affine, bval, bvec))
    return out


def _same(ref: Volume, ours: Volume) -> bool:
    if ref.data.shape != ours.data.shape or not np.allclose(ref.affine, ours.affine, atol=1e-3):
        return False
    if not np.allclose(ref.data, ours.data, rtol=1e-5, atol=1e-5 * (np.abs(ref.data).max() + 1)):
        return False
    if ref.bval is not None:
        if ours.bval is None or abs(ref.bval - ours.bval) > 1e-4 * max(1.0, ref.bval):
            return False
        # b = 0 gradients carry no direction (dcm2niix copies them unrotated); others agree up to sign
        if ref.bvec is not None and (ours.bvec is None or abs(abs(np.dot(ref.bvec, ours.bvec)) - 1) > 1e-3):
            return False
    return True


def compare(corpus: Path, workdir: Path, workers: int = 2) -> Comparison:
    """Run dcm2niix and medimb-prep on ``corpus`` (outputs under ``workdir``) and match volumes."""
    from data_prep.convert import convert_archive

    ref_dir, our_dir = workdir / "dcm2niix", workdir / "medimb"
    ref_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([dcm2niix_exe(), "-z", "n", "-f", "%s_%p_%e_%t", "-o", str(ref_dir), str(corpus)],
                   check=False, capture_output=True)  # exit 2: nothing it could convert
    t1 = time.perf_counter()
    convert_archive(str(corpus), str(our_dir), workers=workers, key="benchmark", progress=False)
    t2 = time.perf_counter()
    ref, ours = volumes_of(ref_dir), volumes_of(our_dir)
    unused = list(ours)
    missing = []
    for r in ref:
        match = next((o for o in unused if _same(r, o)), None)
        if match is None:
            missing.append(f"{r.source}[{r.index}] {r.data.shape}")
        else:
            unused.remove(match)
    return Comparison(corpus.name, len(ref), len(ours), len(ref) - len(missing), missing, t2 - t1, t1 - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpora", nargs="+", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("runs/prep_vs_dcm2niix"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if dcm2niix_exe() is None:
        print("dcm2niix not found (pip install dcm2niix)", file=sys.stderr)
        return 2
    total_ref = total_ok = 0
    for corpus in args.corpora:
        work = args.workdir / corpus.name
        shutil.rmtree(work, ignore_errors=True)
        c = compare(corpus, work, args.workers)
        total_ref += c.reference
        total_ok += c.reproduced
        print(f"{c.corpus}: {c.reproduced}/{c.reference} dcm2niix volumes reproduced "
              f"({100 * c.reproduced / max(c.reference, 1):.0f} %), {c.ours} of ours; "
              f"medimb-prep {c.seconds_ours:.2f} s, dcm2niix {c.seconds_reference:.2f} s")
        for m in c.missing:
            print(f"  not reproduced: {m}")
    print(f"total: {total_ok}/{total_ref} ({100 * total_ok / max(total_ref, 1):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
