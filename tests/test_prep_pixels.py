"""The uncompressed fast path (pixels read at the offset found by the scan) equals pydicom's pixel_array."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from data_prep.headers import FileHeader, read_header
from data_prep.pixels import read_frames


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "MR_small_expb.dcm", "MR_small_padded.dcm", "emri_small_big_endian.dcm"])
def test_native_fast_path_matches_pydicom(name, tmp_path):
    src = get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"{name} not available")
    shutil.copy(src, tmp_path / "f.dcm")
    head = read_header(str(tmp_path / "f.dcm"), str(tmp_path))
    assert isinstance(head, FileHeader) and head.frames[0].pixel is not None
    (got,) = read_frames(str(tmp_path), [head.frames])
    want = pydicom.dcmread(tmp_path / "f.dcm").pixel_array
    np.testing.assert_array_equal(got, want.reshape(got.shape))
    assert got.dtype.isnative


def test_high_bits_above_bits_stored_are_masked_like_pydicom(tmp_path, dicom_series):
    dicom_series(tmp_path, shape=(4, 6, 1))
    (path,) = list(tmp_path.iterdir())
    ds = pydicom.dcmread(path)
    ds.PixelData = (np.arange(24, dtype=np.uint16).reshape(4, 6) | 0xF000).tobytes()  # BitsStored 12
    ds.save_as(path)
    head = read_header(str(path), str(tmp_path))
    (got,) = read_frames(str(tmp_path), [head.frames])
    np.testing.assert_array_equal(got[0], pydicom.dcmread(path).pixel_array)
    assert got.max() == 23


def test_compressed_files_use_pydicom(tmp_path):
    shutil.copy(get_testdata_file("MR_small_RLE.dcm", download=False), tmp_path / "f.dcm")
    head = read_header(str(tmp_path / "f.dcm"), str(tmp_path))
    assert head.frames[0].pixel is None
    (got,) = read_frames(str(tmp_path), [head.frames])
    np.testing.assert_array_equal(got[0], pydicom.dcmread(tmp_path / "f.dcm").pixel_array)


def _to_colour(folder, photometric="RGB", bits=8, samples=3):
    """Turn a grey series into a colour one: R = grey, G = grey // 2, B = 255 - grey (8-bit)."""
    from helpers.dicom import dicom_files

    truth = {}
    for f in dicom_files(folder):
        ds = pydicom.dcmread(f)
        grey = (ds.pixel_array % 256).astype(np.uint8)
        rgb = np.stack([grey, grey // 2, 255 - grey], -1)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = samples, photometric, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelData = (rgb if samples == 3 and bits == 8 else np.zeros((ds.Rows, ds.Columns, samples),
                                                                        f"u{bits // 8}")).tobytes()
        ds.save_as(f)
        truth[tuple(float(v) for v in ds.ImagePositionPatient)] = rgb
    return truth


@pytest.mark.parametrize("compressed", [False, True], ids=["native", "rle"])
def test_colour_series_become_rgb24_volumes(tmp_path, dicom_series, compressed):
    """8-bit RGB images (colour maps, CAD overlays, screenshots of a stack) are written as NIfTI RGB24
    (datatype 128, one R, G, B triple per voxel, as dcm2niix writes them), slice k at its position."""
    import nibabel as nib

    from data_prep.convert import convert_archive

    dicom_series(tmp_path / "arc", shape=(6, 5, 4))
    truth = _to_colour(tmp_path / "arc")
    if compressed:
        from pydicom.uid import RLELossless

        from helpers.dicom import dicom_files

        for f in dicom_files(tmp_path / "arc"):
            ds = pydicom.dcmread(f)
            ds.compress(RLELossless)
            ds.save_as(f)
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), workers=1, progress=False)
    assert res.issues == [] and len(res.rows) == 1 and res.rows[0]["shape"] == "5x6x4"
    img = nib.load(tmp_path / "out" / res.rows[0]["path"])
    assert img.header["datatype"] == 128 and img.get_data_dtype().names == ("R", "G", "B")
    data = np.asanyarray(img.dataobj)
    for k in range(4):
        position = img.affine @ np.array([0.0, 0.0, k, 1.0])
        lps = (round(-position[0], 4) + 0.0, round(-position[1], 4) + 0.0, round(position[2], 4) + 0.0)
        want = next(v for p, v in truth.items() if np.allclose(p, lps, atol=1e-3))
        got = np.stack([data["R"][:, :, k], data["G"][:, :, k], data["B"][:, :, k]], -1).transpose(1, 0, 2)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits,samples", [(16, 3), (8, 4)])
def test_other_colour_layouts_are_reported_not_converted(tmp_path, dicom_series, bits, samples):
    from data_prep.convert import convert_archive

    dicom_series(tmp_path / "arc", shape=(6, 5, 4))
    _to_colour(tmp_path / "arc", photometric="RGB" if samples == 3 else "ARGB", bits=bits, samples=samples)
    res = convert_archive(str(tmp_path / "arc"), str(tmp_path / "out"), workers=1, progress=False)
    assert res.rows == [] and {i.reason for i in res.issues} == {"unsupported_pixels"}
    assert f"{samples}-sample {bits}-bit" in res.issues[0].detail


def test_a_series_mixing_signed_and_unsigned_images_keeps_every_value(tmp_path, dicom_series):
    """Half the slices signed 16-bit with negative values, half unsigned: the volume takes a type that
    holds both (was: the first file's uint16, so -56 became 65480 without a word)."""
    from data_prep.convert import convert_archive

    dicom_series(tmp_path / "in", shape=(4, 6, 6), spacing=(1.0, 1.0, 2.0))
    truth = {}
    for i, path in enumerate(sorted((tmp_path / "in").iterdir())):
        ds = pydicom.dcmread(path)
        if i % 2:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.PixelData = (ds.pixel_array.astype(np.int16) - 2000).tobytes()
            ds.save_as(path)
        truth[round((float(ds.ImagePositionPatient[2]) - 5.0) / 2.0)] = pydicom.dcmread(path).pixel_array
    res = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    [row] = res.rows
    import nibabel as nib

    data = np.asanyarray(nib.load(tmp_path / "out" / row["path"]).dataobj)
    assert data.min() < 0
    for k, image in truth.items():
        np.testing.assert_array_equal(data[:, :, k], image.T)
