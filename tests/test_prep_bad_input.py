"""Bad input: every problem gets a specific reason in report.json and the rest still converts."""

from __future__ import annotations

import builtins
import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_prep.convert import convert_archive
from data_prep.deid import PhiScrubber


def _files(folder):
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


def _edit(path, **values):
    ds = pydicom.dcmread(path)
    for k, v in values.items():
        setattr(ds, k, v)
    ds.save_as(path)


@pytest.fixture
def bad_archive(tmp_path, dicom_series, monkeypatch):
    arc = tmp_path / "arc"
    good = dicom_series(arc / "good", patient_id="GOOD1", series_number=1, description="good", seed=1)
    dicom_series(arc / "missing", patient_id="P2", series_number=2, description="gap", shape=(4, 6, 7), seed=2)
    # drop the slice at k=3 (in the middle): find it by position, not by file name
    for f in _files(arc / "missing"):
        if abs(float(pydicom.dcmread(f).ImagePositionPatient[2]) - (5.0 + 3 * 1.5)) < 1e-3:
            f.unlink()
    dicom_series(arc / "dup", patient_id="P3", series_number=3, description="dup", seed=3)
    src = _files(arc / "dup")[0]
    shutil.copy(src, arc / "dup" / "copy")
    _edit(arc / "dup" / "copy", SOPInstanceUID=generate_uid())
    dicom_series(arc / "orient", patient_id="P4", series_number=4, description="orient", shape=(4, 6, 6), seed=4)
    shutil.copy(_files(arc / "orient")[0], arc / "orient" / "stray")  # one extra image in another plane
    _edit(arc / "orient" / "stray", SOPInstanceUID=generate_uid(), ImageOrientationPatient=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    dicom_series(arc / "size", patient_id="P5", series_number=5, description="size", shape=(4, 6, 6), seed=5)
    odd = arc / "size" / "stray"  # one extra image of another matrix size
    ds = pydicom.dcmread(_files(arc / "size")[0])
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = 2, 3
    ds.PixelData = np.zeros((2, 3), np.uint16).tobytes()
    ds.save_as(odd)
    dicom_series(arc / "evil", patient_id="../../etc", series_number=6, description="../../../passwd", seed=6)
    junk = arc / "junk"
    junk.mkdir()
    (junk / "empty.dcm").write_bytes(b"")
    (junk / "notes.txt").write_text("not a dicom file\n")
    data = _files(arc / "good")[0].read_bytes()
    (junk / "trunc").write_bytes(data[: len(data) // 2])
    shutil.copy(_files(arc / "good")[1], junk / "locked")
    os.symlink("..", junk / "loop")
    os.symlink("self", junk / "self")
    # an unreadable file: chmod 000 (root reads it anyway, so the open is failed the same way the OS would)
    locked = junk / "locked"
    locked.chmod(0)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if Path(str(file)).resolve() == locked.resolve():
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    yield arc, good
    locked.chmod(0o644)


def test_every_bad_input_has_a_reason_and_the_rest_converts(bad_archive, tmp_path):
    arc, good = bad_archive
    out = tmp_path / "out"
    res = convert_archive(str(arc), str(out), workers=1, progress=False)
    report = json.loads((out / "report.json").read_text())
    by_path = {i.get("path"): i["reason"] for i in report["issues"] if i.get("path")}
    by_series = {i["series"]: i["reason"] for i in report["issues"] if i.get("series") and not i.get("path")}
    shown = PhiScrubber().scrub_path  # report paths: words that are not DICOM-export words are tokens
    assert by_path[shown("junk/empty.dcm")] == "empty_file"
    assert by_path[shown("junk/notes.txt")] == "not_dicom"
    assert by_path[shown("junk/trunc")] == "truncated"
    assert by_path[shown("junk/locked")] == "unreadable"
    assert by_path[shown("junk/loop")] == "symlink_loop"
    assert by_path[shown("junk/self")] == "symlink_loop"
    assert by_series["s002-gap"] == "missing_slice"
    assert by_series["s003-dup"] == "duplicate_slice_position"
    # a stray image in another plane or of another matrix size: a volume of its own, as dcm2niix writes it
    assert by_path[shown("orient/stray")] == by_path[shown("size/stray")] == "split_orientation"
    details = {i["series"]: i["detail"] for i in report["issues"] if i.get("series")}
    assert "another plane" in details["s004-orient-o2"] and "another matrix size" in details["s005-size-o2"]
    with open(out / "manifest.csv", newline="") as fh:
        rows = {r["series"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"s001-good", "s004-orient", "s004-orient-o2", "s005-size", "s005-size-o2", "s006-passwd"}
    assert rows["s004-orient"]["shape"] == "6x4x6" and rows["s005-size"]["shape"] == "6x4x6"
    assert rows["s004-orient-o2"]["shape"] == "6x4x1" and rows["s005-size-o2"]["shape"] == "3x2x1"
    assert res.converted == 6
    # path-like DICOM values never escape OUT
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
        assert ".." not in p.name
    assert rows["s006-passwd"]["path"].startswith("sub-")
    import nibabel as nib

    got = np.asanyarray(nib.load(out / rows["s001-good"]["path"]).dataobj)
    np.testing.assert_array_equal(got, good[0].transpose(2, 1, 0))


def test_strict_exits_1_when_an_input_was_refused_and_0_without_it(bad_archive, tmp_path):
    from data_prep.cli import main

    arc, _ = bad_archive
    assert main(["convert", str(arc), str(tmp_path / "o1"), "-j", "1", "--no-progress"]) == 0
    assert main(["convert", str(arc), str(tmp_path / "o2"), "-j", "1", "--no-progress", "--strict"]) == 1


def test_dicomdir_and_non_image_objects_reported(tmp_path, dicom_series):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    dicom_series(tmp_path / "arc" / "s")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.FileSetID = "X"
    ds.save_as(tmp_path / "arc" / "DICOMDIR", enforce_file_format=True)
    meta2 = FileMetaDataset()
    meta2.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    meta2.MediaStorageSOPInstanceUID = generate_uid()
    meta2.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = FileDataset(None, {}, file_meta=meta2, preamble=b"\0" * 128)
    sr.SOPClassUID, sr.Modality = meta2.MediaStorageSOPClassUID, "SR"
    sr.save_as(tmp_path / "arc" / "IM0002.sr", enforce_file_format=True)
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False)
    assert sorted((i.path, i.reason) for i in res.issues) == [("DICOMDIR", "dicomdir"), ("IM0002.sr", "not_an_image")]
    assert res.converted == 1
