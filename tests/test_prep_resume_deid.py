"""Killed mid-way + re-run; no PHI anywhere in the outputs; the archive is never modified."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pydicom
import pytest
from helpers.paths import REPO

from data_prep.convert import FAULT_ENV


def _run(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.pop(FAULT_ENV, None) if not env_extra else None
    return subprocess.run([sys.executable, "-m", "data_prep", "--verbose", *args], capture_output=True, text=True,
                          env=env, cwd=REPO)


def _tree_hashes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def archive(tmp_path, dicom_series):
    arc = tmp_path / "arc"
    dicom_series(arc / "a" / "1", patient_id="PID-1111", patient_name="SMITH^ALICE", birth_date="19610203",
                 accession="ACCX9001", series_number=1, description="big", shape=(4, 6, 8), seed=1)
    dicom_series(arc / "b" / "2", patient_id="PID-2222", patient_name="NGUYEN^BAO", birth_date="19720405",
                 accession="ACCX9002", series_number=2, description="dyn SMITH", phases=2, seed=2)
    dicom_series(arc / "c" / "3", patient_id="PID-3333", patient_name="MUELLER^CARLA", birth_date="19830607",
                 accession="ACCX9003", series_number=3, description="small", shape=(4, 6, 3), seed=3)
    return arc


def test_killed_run_leaves_no_partial_nifti_and_rerun_gives_same_outputs(archive, tmp_path):
    ref = _run(["convert", str(archive), str(tmp_path / "ref"), "-j", "1", "--no-progress"])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    killed = _run(["convert", str(archive), str(out), "-j", "1", "--no-progress"], {FAULT_ENV: "3"})  # dies writing the 2nd series (the 1st, DCE, writes 2)
    assert killed.returncode == 137
    assert list(out.rglob("*.part")), "the fault hook should have died mid-write"
    for nii in out.rglob("*.nii.gz"):  # whatever exists under a final name is complete
        nib.load(nii).get_fdata()
    assert not (out / "manifest.csv").exists()
    again = _run(["convert", str(archive), str(out), "-j", "1", "--no-progress"])
    assert again.returncode == 0, again.stderr
    assert "1 already done" in again.stdout
    assert not list(out.rglob("*.part"))
    got, want = _tree_hashes(out), _tree_hashes(tmp_path / "ref")
    skip = ("report.json",)  # resumed/converted counts differ
    assert {k: v for k, v in got.items() if not k.startswith(".medimb-prep") and k not in skip} == \
        {k: v for k, v in want.items() if not k.startswith(".medimb-prep") and k not in skip}
    # a third run does nothing and changes nothing
    third = _run(["convert", str(archive), str(out), "-j", "1", "--no-progress"])
    assert "0 series converted, 3 already done" in third.stdout


def test_no_phi_in_outputs_names_or_logs_and_archive_unchanged(archive, tmp_path):
    before = _tree_hashes(archive)
    mtimes = {p: p.stat().st_mtime_ns for p in archive.rglob("*")}
    phi = {"PID-1111", "PID-2222", "PID-3333", "SMITH", "ALICE", "NGUYEN", "MUELLER", "CARLA",
           "19610203", "19720405", "19830607", "ACCX9001", "ACCX9002", "ACCX9003"}
    for f in archive.rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            phi |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    out = tmp_path / "out"
    runs = [_run(["scan", str(archive), "--json", str(tmp_path / "scan.json"), "--no-progress"]),
            _run(["convert", str(archive), str(out), "-j", "2", "--dce-4d", "--subtract"])]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    texts = {"log": "".join(r.stdout + r.stderr for r in runs)}
    files = [p for p in out.rglob("*")] + [tmp_path / "scan.json"]
    for p in files:
        texts[f"name:{p}"] = p.relative_to(tmp_path).as_posix()
        if p.is_file():
            raw = p.read_bytes()
            texts[str(p)] = (gzip.decompress(raw) if p.name.endswith(".gz") else raw).decode("latin-1")
    for where, text in texts.items():
        for value in phi:
            assert value.lower() not in text.lower(), f"{value!r} leaked into {where}"
    assert len(list(out.rglob("*.nii.gz"))) == 1 + 2 + 1 + 1 + 1  # image, 2 phases, subtraction, 4d, image
    assert _tree_hashes(archive) == before
    assert {p: p.stat().st_mtime_ns for p in archive.rglob("*")} == mtimes
