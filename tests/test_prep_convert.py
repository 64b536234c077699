"""medimb-prep convert on tiny pydicom-written archives: geometry, sorting, scaling, DCE, manifest, CLI."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from data_prep.cli import main
from data_prep.convert import MANIFEST_COLUMNS, ConvertOptions, convert_archive
from data_prep.deid import pseudonymize


def _manifest(out):
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(out, row):
    return nib.load(out / row["path"])


def test_oblique_series_geometry_and_sorting(tmp_path, dicom_series):
    # oblique plane, shuffled files and InstanceNumbers: voxels and affine must follow positions
    c, s = np.cos(0.3), np.sin(0.3)
    ori = (c, s, 0.0, 0.0, 0.0, -1.0)
    data = dicom_series(tmp_path / "arc" / "a", shape=(5, 7, 6), spacing=(0.9, 0.6, 2.5), orientation=ori,
                        origin=(3.0, -4.0, 10.0))
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False)
    assert res.converted == 1 and not res.issues
    (row,) = _manifest(tmp_path / "out")
    img = _load(tmp_path / "out", row)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data[0].transpose(2, 1, 0))
    r, cdir = np.array(ori[:3]), np.array(ori[3:])
    n = np.cross(r, cdir)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = r * 0.6, cdir * 0.9, n * 2.5, (3.0, -4.0, 10.0)
    np.testing.assert_allclose(img.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)
    assert row["kind"] == "image" and row["shape"] == "7x5x6" and row["spacing"] == "0.6x0.9x2.5"
    assert row["subject"] == pseudonymize("PID-0001")
    assert list(row) == MANIFEST_COLUMNS
    side = json.loads((tmp_path / "out" / row["sidecar"]).read_text())
    assert side["EchoTime"] == pytest.approx(0.0021) and side["RepetitionTime"] == pytest.approx(0.0052)
    assert side["SeriesDescription"] == "t1-axial"


def test_rescale_slope_intercept_kept_exact(tmp_path, dicom_series):
    data = dicom_series(tmp_path / "arc", slope=2.5, intercept=-100.0)
    convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False)
    (row,) = _manifest(tmp_path / "out")
    img = _load(tmp_path / "out", row)
    np.testing.assert_allclose(img.get_fdata(), data[0].transpose(2, 1, 0) * 2.5 - 100.0)


@pytest.mark.parametrize("phase_tag", ["TemporalPositionIdentifier", "AcquisitionTime"])
def test_dce_in_one_series_gives_phases_subtraction_and_4d(tmp_path, dicom_series, phase_tag):
    data = dicom_series(tmp_path / "arc", phases=3, phase_tag=phase_tag, description="dyn")
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False,
                          options=ConvertOptions(dce_4d=True, subtract=True))
    assert not res.issues
    rows = _manifest(tmp_path / "out")
    kinds = [r["kind"] for r in rows]
    assert kinds == ["dce_phase"] * 3 + ["subtraction"] * 2 + ["4d"]
    phases = [r for r in rows if r["kind"] == "dce_phase"]
    assert [r["phase"] for r in phases] == ["0", "1", "2"]
    assert [float(r["phase_time_s"]) for r in phases] == [0.0, 60.0, 120.0]
    for p, r in enumerate(phases):
        np.testing.assert_array_equal(np.asanyarray(_load(tmp_path / "out", r).dataobj), data[p].transpose(2, 1, 0))
    sub = _load(tmp_path / "out", rows[4]).get_fdata()
    np.testing.assert_allclose(sub, (data[2].astype(float) - data[0]).transpose(2, 1, 0))
    four = _load(tmp_path / "out", rows[5])
    assert four.shape == (6, 4, 5, 3)
    assert json.loads((tmp_path / "out" / rows[5]["sidecar"]).read_text())["PhaseTimes"] == [0.0, 60.0, 120.0]


def test_dce_as_separate_series_grouped_by_geometry_and_time(tmp_path, dicom_series):
    from pydicom.uid import generate_uid

    study = generate_uid()
    # series numbers deliberately not in time order; descriptions say nothing about phases
    vols = {}
    for number, t0 in ((7, 100200.0), (5, 100000.0), (6, 100100.0)):
        vols[number] = dicom_series(tmp_path / "arc" / f"x{number}", study_uid=study, series_number=number,
                                    description="ax vibe", acq_time0=t0, seed=number)
    dicom_series(tmp_path / "arc" / "t2", study_uid=study, series_number=2, description="t2", seed=9,
                 spacing=(0.8, 0.7, 3.0))
    convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False)
    rows = _manifest(tmp_path / "out")
    dce = [r for r in rows if r["kind"] == "dce_phase"]
    assert [r["series_number"] for r in dce] == ["5", "6", "7"]
    assert [float(r["phase_time_s"]) for r in dce] == [0.0, 60.0, 120.0]
    assert len({r["series"] for r in dce}) == 1
    for r in dce:
        got = np.asanyarray(_load(tmp_path / "out", r).dataobj)
        np.testing.assert_array_equal(got, vols[int(r["series_number"])][0].transpose(2, 1, 0))
    assert [r["kind"] for r in rows if r["series_number"] == "2"] == ["image"]


def test_localizer_is_converted_plane_by_plane_as_kind_localizer(tmp_path, dicom_series):
    """A scout series (ImageType LOCALIZER; or a few images in several planes, untagged) is converted as
    dcm2niix converts it: one volume per plane, largest first, ``kind=localizer``, exact pixels."""
    from pydicom.uid import generate_uid

    planes = [(1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)]
    study = generate_uid()
    for tagged, folder in ((True, "loc"), (False, "untagged")):
        uid = generate_uid()
        image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER") if tagged else ("ORIGINAL", "PRIMARY", "M")
        vols = [dicom_series(tmp_path / "arc" / folder / str(i), image_type=image_type, series_uid=uid,
                             series_number=1 if tagged else 3, shape=(6, 5, 3 - i), orientation=o, seed=i,
                             study_uid=study)
                for i, o in enumerate(planes)]
    dicom_series(tmp_path / "arc" / "img", series_number=2, study_uid=study)
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), progress=False)
    assert res.issues == []
    rows = _manifest(tmp_path / "out")
    assert [r["kind"] for r in rows if r["series_number"] == "2"] == ["image"]
    for number in ("1", "3"):
        loc = [r for r in rows if r["series_number"] == number]
        assert [r["kind"] for r in loc] == ["localizer"] * 3
        assert sorted(r["shape"] for r in loc) == ["5x6x1", "5x6x2", "5x6x3"]
        assert [r["series"].endswith(("-o2", "-o3")) for r in loc] == [False, True, True]
    # pixels: the 3-slice axial plane of the last (untagged) series, exactly as written
    axial = next(r for r in rows if r["series_number"] == "3" and r["shape"] == "5x6x3")
    np.testing.assert_array_equal(np.asanyarray(_load(tmp_path / "out", axial).dataobj),
                                  vols[0][0].transpose(2, 1, 0))


def test_cli_convert_and_scan(tmp_path, dicom_series, capsys):
    dicom_series(tmp_path / "arc")
    assert main(["scan", str(tmp_path / "arc"), "--json", str(tmp_path / "scan.json"), "--no-progress"]) == 0
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert scan["series"][0]["slices"] == 5 and scan["series"][0]["size"] == [6, 4]
    assert main(["convert", str(tmp_path / "arc"), str(tmp_path / "out"), "--no-progress", "-j", "1"]) == 0
    assert "1 series converted" in capsys.readouterr().out
    # nothing convertible -> exit status 1; a missing archive -> one-line user error, status 2
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    assert main(["convert", str(tmp_path / "junk"), str(tmp_path / "out2"), "--no-progress"]) == 1
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out3")]) == 2
    assert main(["convert", str(tmp_path / "arc"), str(tmp_path / "arc" / "inside")]) == 2


def test_parallel_workers_match_serial(tmp_path, dicom_series):
    for i in range(3):
        dicom_series(tmp_path / "arc" / f"p{i}", patient_id=f"P{i}", seed=i)
    a = convert_archive(str(tmp_path / "arc"), str(tmp_path / "o1"), workers=1, progress=False)
    b = convert_archive(str(tmp_path / "arc"), str(tmp_path / "o2"), workers=2, progress=False)
    assert a.converted == b.converted == 3
    assert (tmp_path / "o1" / "manifest.csv").read_text() == (tmp_path / "o2" / "manifest.csv").read_text()
    for r in _manifest(tmp_path / "o1"):
        assert (tmp_path / "o1" / r["path"]).read_bytes() == (tmp_path / "o2" / r["path"]).read_bytes()
