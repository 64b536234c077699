"""Shared helpers of the bundle tests (no tests here): a tiny NIfTI dataset and bundle runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"


def make_dataset(root: Path, num_classes: int = 2, channels: int = 4, per_class=(8, 4), shape=(20, 18, 12),
                 seed: int = 0) -> Path:
    """Write ``root/datalist.json`` with relative paths to tiny oblique NIfTI volumes; returns ``root``.

    Class ``k`` has a bright blob of radius ``2 + k`` in every channel, so a network can learn the
    task in an epoch or two. ``per_class[k]`` cases of class ``k``, split 50/25/25 per class.
    """
    rng = np.random.default_rng(seed)
    affine = np.array([[1.5, 0.1, 0, -10], [0, 1.4, 0.1, 5], [0.05, 0, 2.5, 20], [0, 0, 0, 1]])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    splits = {"training": [], "validation": [], "test": []}
    for k in range(num_classes):
        for i in range(per_class[k]):
            case = f"sub-c{k}n{i:02d}"
            folder = root / case / "ses-1"
            folder.mkdir(parents=True, exist_ok=True)
            centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
            blob = (np.linalg.norm(grid - centre, axis=-1) < 2 + k).astype(np.float32)
            paths = []
            for c in range(channels):
                vol = rng.normal(100, 10, shape).astype(np.float32) + 200 * (c + 1) * blob
                name = f"{case}_ses-1_phase-{c:02d}.nii.gz"
                nib.save(nib.Nifti1Image(vol, affine), str(folder / name))
                paths.append(f"{case}/ses-1/{name}")
            split = "training" if i < per_class[k] // 2 else "validation" if i < 3 * per_class[k] // 4 else "test"
            splits[split].append({"image": paths if channels > 1 else paths[0], "label": k, "subject": case})
    (root / "datalist.json").write_text(json.dumps(splits, indent=1))
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
