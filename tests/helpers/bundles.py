"""The bundle tests' dataset (a :func:`helpers.nifti.write_datalist` layout) and bundle command runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers.nifti import SHEARED_AFFINE, blob, per_class_halves, per_class_labels, write_datalist
from helpers.paths import BUNDLES, REPO

__all__ = ["BUNDLES", "OBLIQUE_AFFINE", "REPO", "bundle_command", "make_dataset", "run_bundle"]

#: an oblique scan: rotated 10 degrees about z, anisotropic spacing; orthonormal directions (ITK and Slicer
#: read it as it is, unlike the sheared one)
_C, _S = np.cos(np.radians(10)), np.sin(np.radians(10))
OBLIQUE_AFFINE = np.array([[1.5 * _C, -1.4 * _S, 0, -10], [1.5 * _S, 1.4 * _C, 0, 5], [0, 0, 2.5, 20], [0, 0, 0, 1]])


def make_dataset(root: Path, num_classes: int = 2, channels: int = 4, per_class=(8, 4), shape=(20, 18, 12),
                 seed: int = 0, affine=SHEARED_AFFINE) -> Path:
    """Write ``root/datalist.json`` with relative paths to tiny sheared NIfTI volumes; returns ``root``.

    Class ``k`` has a bright blob of radius ``2 + k`` in every channel (:func:`helpers.nifti.blob`), so a
    network can learn the task in an epoch or two. ``affine``: the volumes' (default sheared; an oblique rigid one
    is :data:`OBLIQUE_AFFINE`). ``per_class[k]`` cases of class ``k``, split 50/25/25 per
    class, laid out as ``medimb-prep`` writes them (``sub-*/ses-1/sub-*_ses-1_phase-NN.nii.gz``).
    """
    write_datalist(root, per_class_labels(per_class[:num_classes]), channels=channels, shape=shape,
                   affine=affine, volume=blob, splits=per_class_halves, case="sub-c{label}n{j:02d}",
                   image="{case}/ses-1/{case}_ses-1_phase-{c:02d}.nii.gz", subject="{case}", image_list=False,
                   seed=seed)
    return root


def bundle_command(bundle: str, configs: list[str], *overrides: str) -> list[str]:
    """``python -m monai.bundle run --config_file "['configs/a.json', ...]" OVERRIDES`` for ``bundle``."""
    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *overrides]


def run_bundle(bundle: str, configs: list[str], *overrides: str, cwd: Path | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a bundle command as a user does (a subprocess), from ``cwd`` (not the bundle root)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(bundle_command(bundle, configs, *overrides), cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)
