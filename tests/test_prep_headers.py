"""The fast little-endian header reader gives exactly what the pydicom path gives (or defers to it)."""

from __future__ import annotations

from pathlib import Path

import pydicom.data
import pytest

from data_prep.headers import read_header

PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _same(path: Path, root: Path) -> None:
    assert read_header(str(path), str(root)) == read_header(str(path), str(root), use_fast=False), path


def test_fast_header_reader_matches_pydicom_on_pydicom_test_files(tmp_path):
    files = sorted(p for p in PYDICOM_FILES.rglob("*") if p.is_file() and p.stat().st_size < 3_000_000)
    assert len(files) > 50
    for p in files:
        _same(p, PYDICOM_FILES)


def test_fast_header_reader_matches_pydicom_on_pydicom_data_files():
    store = pytest.importorskip("data_store")
    folder = Path(store.__file__).parent / "data"
    files = sorted(p for p in folder.glob("*.dcm") if p.stat().st_size < 3_000_000)
    assert len(files) > 10  # not a vacuous pass over an empty folder
    for p in files:
        _same(p, folder)


@pytest.mark.real_data
def test_fast_header_reader_matches_pydicom_on_a_real_siemens_series(shared_data):
    folder = shared_data / "dicom" / "decubitus_hfs_t1_fl2d_sag"
    files = sorted(folder.iterdir())
    assert files  # not a vacuous pass over an empty folder
    for p in files:
        _same(p, folder)


def test_fast_header_reader_matches_pydicom_on_written_and_truncated_files(tmp_path, dicom_series):
    dicom_series(tmp_path / "s", phases=2)
    first = sorted((tmp_path / "s").iterdir())[0]
    data = first.read_bytes()
    for cut in (100, 131, 140, 300, len(data) // 2, len(data) - 10):
        (tmp_path / f"cut{cut}").write_bytes(data[:cut])
    for p in sorted(tmp_path.rglob("*")):
        if p.is_file():
            _same(p, tmp_path)


def test_series_template_gives_the_full_reading(tmp_path, dicom_series):
    """The files of a series after the first are read from a template (what they share) plus their
    own values: the same headers as a cold read and as pydicom, and a bad per-file value (a position
    that is not 3 numbers) still fails that file alone, with the same reason."""
    from data_prep import headers

    dicom_series(tmp_path / "s", phases=2, shape=(4, 6, 5))
    files = sorted((tmp_path / "s").iterdir())
    bad = tmp_path / "s" / "zz_bad_position"
    ds = pydicom.dcmread(files[0])
    ds.ImagePositionPatient = [1.0, 2.0]
    ds.SOPInstanceUID = ds.SOPInstanceUID[:-1] + ("2" if ds.SOPInstanceUID.endswith("1") else "1")
    ds.save_as(bad, enforce_file_format=True)
    files.append(bad)

    def cold(p):
        headers._TEMPLATES.clear()
        return read_header(str(p), str(tmp_path))

    headers._TEMPLATES.clear()
    warm = [read_header(str(p), str(tmp_path)) for p in files]  # the first builds the template
    assert len(headers._TEMPLATES) == 1
    for p, h in zip(files, warm):
        assert h == cold(p) == read_header(str(p), str(tmp_path), use_fast=False), p
    assert warm[-1].reason == "invalid_geometry" and "ImagePositionPatient" in warm[-1].detail
