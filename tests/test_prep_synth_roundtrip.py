"""Round trip through the synthetic archive: synth -> convert; junk reported, masks line up, archive untouched."""

from __future__ import annotations

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from data_prep.cli import main

pytest.importorskip("data_prep.synth.command", reason="synthetic archive generator not available")

EXPECTED_SKIPS = {"dicomdir", "not_dicom", "truncated", "empty_file", "not_an_image"}


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", str(root / "syn"), "--cases", "4", "--positive-fraction", "0.5", "--seed", "3"]) == 0
    before = _hashes(root / "syn" / "archive")
    assert main(["convert", str(root / "syn" / "archive"), str(root / "out"), "-j", "2", "--subtract",
                 "--no-progress"]) == 0
    return root, before


def test_every_image_series_converts_and_junk_is_reported(converted):
    root, _ = converted
    labels = _csv(root / "syn" / "labels.csv")
    cases = {r["case"]: r for r in _csv(root / "syn" / "truth" / "cases.csv")}
    rows = _csv(root / "out" / "manifest.csv")
    assert {r["subject"] for r in rows} == {r["case"] for r in labels}  # labels keyed by our pseudonyms
    for case, info in cases.items():
        phases = [r for r in rows if r["subject"] == case and r["kind"] == "dce_phase"]
        assert len(phases) == int(info["phases"]), case
        assert phases[0]["shape"] == f"{info['columns']}x{info['rows']}x{info['slices']}"
        # our phase times are relative to the pre-contrast acquisition; post-phase intervals must agree
        truth_t = [float(t) for t in info["phase_times_s"].split(";")]
        ours_t = [float(r["phase_time_s"]) for r in phases]
        np.testing.assert_allclose(np.diff(ours_t[1:]), np.diff(truth_t[1:]), atol=0.2)
    report = json.loads((root / "out" / "report.json").read_text())
    reasons = [i["reason"] for i in report["issues"]]
    assert set(reasons) <= EXPECTED_SKIPS, reasons
    assert "localizer" not in reasons
    # each case's three-plane localizer: converted plane by plane, never a DCE phase
    localizers = [r for r in rows if r["kind"] == "localizer"]
    assert len(localizers) == 3 * len(cases) and all(r["shape"].endswith("x1") for r in localizers)
    assert {"dicomdir", "not_dicom", "truncated"} <= set(reasons)


def test_truth_masks_line_up_with_converted_volumes(converted):
    root, _ = converted
    rows = _csv(root / "out" / "manifest.csv")
    for info in _csv(root / "syn" / "truth" / "cases.csv"):
        case = info["case"]
        mask = nib.as_closest_canonical(nib.load(root / "syn" / "truth" / f"{case}_lesion.nii.gz"))
        pre = [r for r in rows if r["subject"] == case and r["kind"] == "dce_phase" and r["phase"] == "0"][0]
        sub = [r for r in rows if r["subject"] == case and r["kind"] == "subtraction"][0]
        pre_img = nib.as_closest_canonical(nib.load(root / "out" / pre["path"]))
        np.testing.assert_allclose(pre_img.affine, mask.affine, atol=1e-3)
        assert pre_img.shape == mask.shape
        m = mask.get_fdata() > 0
        if m.sum() >= 5:  # the lesion enhances: the subtraction is brighter inside the mask
            s = nib.as_closest_canonical(nib.load(root / "out" / sub["path"])).get_fdata()
            assert s[m].mean() > 1.5 * s[~m].mean(), case


def test_archive_bytes_unchanged(converted):
    root, before = converted
    assert _hashes(root / "syn" / "archive") == before
