"""What a series becomes (docs/data_prep.md, *Series types*): DWI with .bval/.bvec, time series,
echo and part splits, and the report reason of an incomplete diffusion series."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from data_prep.convert import convert_archive

DIRECTIONS = {0.0: None, 1000.0: (1.0, 0.0, 0.0), 1000.5: (0.0, 1.0, 0.0)}


def _dwi_archive(root: Path, dicom_series, drop_one: bool = False) -> Path:
    """One Philips-style DWI series: b=0 and two b=1000 directions, 5 slices each, same times."""
    study, series = generate_uid(), generate_uid()
    for n, (key, direction) in enumerate(DIRECTIONS.items()):
        folder = root / f"v{n}"
        dicom_series(folder, study_uid=study, series_uid=series, series_number=7, description="dwi",
                     shape=(4, 6, 5), seed=n)
        for k, f in enumerate(sorted(folder.iterdir())):
            ds = pydicom.dcmread(f)
            ds.Manufacturer = "Philips"
            ds.ScanningSequence = "EP"
            ds.DiffusionBValue = float(int(key))
            ds.InstanceNumber = 100 * n + k
            if direction:
                ds.DiffusionGradientOrientation = list(direction)
            ds.save_as(f)
    if drop_one:
        sorted((root / "v2").iterdir())[2].unlink()
    return root


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv") as f:
        return list(csv.DictReader(f))


def test_dwi_series_becomes_one_4d_file_with_bval_bvec(tmp_path, dicom_series):
    arc = _dwi_archive(tmp_path / "arc", dicom_series)
    result = convert_archive(str(arc), str(tmp_path / "out"), progress=False)
    [row] = result.rows
    assert row["kind"] == "dwi" and row["shape"] == "6x4x5x3"
    nii = tmp_path / "out" / row["path"]
    stem = str(nii)[: -len(".nii.gz")]
    assert Path(stem + ".bval").read_text() == "0 1000 1000\n"
    bvec = np.loadtxt(stem + ".bvec")
    assert bvec.shape == (3, 3) and np.allclose(bvec[:, 0], 0)
    # the written image's axes are (column = LPS x, row = LPS y, +normal) with a positive determinant:
    # LPS x -> voxel i; dcm2niix writes the antipodal of FSL's i flip, so (1, 0, 0) -> (1, -0, -0)
    assert np.allclose(np.abs(bvec[:, 1]), [1, 0, 0]) and np.allclose(np.abs(bvec[:, 2]), [0, 1, 0])
    assert nib.load(nii).shape == (6, 4, 5, 3)


def test_incomplete_diffusion_series_is_reported_not_written(tmp_path, dicom_series):
    arc = _dwi_archive(tmp_path / "arc", dicom_series, drop_one=True)
    result = convert_archive(str(arc), str(tmp_path / "out"), progress=False)
    assert result.rows == []
    assert [i.reason for i in result.issues] == ["inconsistent_diffusion"]
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_fast_epi_repeats_are_a_time_series_and_echo_parts_split(tmp_path, dicom_series):
    arc = tmp_path / "arc"
    study = generate_uid()
    dicom_series(arc / "bold", patient_id="P1", study_uid=study, series_number=3, description="bold", phases=4, shape=(4, 6, 5))
    for f in (arc / "bold").iterdir():
        ds = pydicom.dcmread(f)
        ds.ScanningSequence = "EP"
        ds.save_as(f)
    series = generate_uid()
    for echo, part in ((1, "M"), (2, "M"), (1, "P")):
        folder = arc / f"gre{echo}{part}"
        dicom_series(folder, patient_id="P1", study_uid=study, series_uid=series, series_number=4, description="gre",
                     image_type=("ORIGINAL", "PRIMARY", part, "ND"), seed=echo)
        for f in folder.iterdir():
            ds = pydicom.dcmread(f)
            ds.EchoNumbers = echo
            ds.save_as(f)
    convert_archive(str(arc), str(tmp_path / "out"), progress=False)
    kinds = {r["series"]: (r["kind"], r["shape"]) for r in _manifest(tmp_path / "out")}
    assert kinds["s003-bold"] == ("timeseries", "6x4x5x4")
    assert set(kinds) == {"s003-bold", "s004-gre_echo-1_part-mag", "s004-gre_echo-1_part-phase",
                          "s004-gre_echo-2_part-mag"}


def _ge_fmri(folder: Path, dicom_series, numbering: str) -> np.ndarray:
    """A GE-style fMRI series: 3 volumes of 5 slices, every image with the series' AcquisitionTime and
    no temporal tag, so only InstanceNumber orders the volumes (volume- or slice-major numbering)."""
    data = dicom_series(folder, series_number=5, description="fmri", phases=3, shape=(4, 6, 5))
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        p, k = int(ds.TemporalPositionIdentifier) - 1, round((float(ds.ImagePositionPatient[2]) - 5.0) / 1.5)
        del ds.TemporalPositionIdentifier, ds.NumberOfTemporalPositions
        ds.AcquisitionTime = "114815"
        ds.Manufacturer, ds.ScanningSequence = "GE MEDICAL SYSTEMS", ["EP", "GR"]
        ds.InstanceNumber = p * 5 + k + 1 if numbering == "volume" else k * 3 + p + 1
        ds.save_as(f)
    return data


@pytest.mark.parametrize("numbering", ["volume", "slice"])
def test_repeats_without_times_are_ordered_by_instance_number(tmp_path, dicom_series, numbering):
    data = _ge_fmri(tmp_path / "arc" / "fmri", dicom_series, numbering)
    result = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), workers=1, progress=False)
    [row] = result.rows
    assert (row["kind"], row["shape"]) == ("timeseries", "6x4x5x3"), [i.to_dict() for i in result.issues]
    written = np.asarray(nib.load(tmp_path / "out" / row["path"]).dataobj)
    # voxel (i, j, k, t) = column i, row j of slice k (ascending along the normal) in volume t
    np.testing.assert_array_equal(written, data.transpose(3, 2, 1, 0))


def test_same_position_time_and_instance_is_still_a_conflict(tmp_path, dicom_series):
    _ge_fmri(tmp_path / "arc" / "fmri", dicom_series, "volume")
    for f in (tmp_path / "arc" / "fmri").iterdir():  # renumbered so two images share one InstanceNumber
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = 1 if ds.InstanceNumber in (1, 6) else ds.InstanceNumber
        ds.save_as(f)
    result = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), workers=1, progress=False)
    assert result.rows == [] and [i.reason for i in result.issues] == ["duplicate_slice_position"]
