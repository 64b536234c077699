"""Siemens mosaics (data_prep.mosaic): layout, tile positions and demosaicing.

The real-data test rebuilds every volume of the dcm_qa ``In/Orientation`` mosaics (axial, coronal,
sagittal; ascending, descending, interleaved; 35/36 slices; multiband in JPEG lossless and JPEG
2000) from :mod:`data_prep.mosaic` and :mod:`data_prep.geometry`, and compares it with dcm2niix
after both are brought to RAS+: identical voxels, affines within 1e-3 mm.
"""

from __future__ import annotations

import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from data_prep.geometry import affine_ras, slice_normal, sort_slices
from data_prep.mosaic import (
    MosaicError,
    MosaicLayout,
    csa_image_bytes,
    demosaic,
    mosaic_layout,
    spacing_between_tiles,
    tile_positions,
)

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
MOSAIC = ("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC")


# ---------------------------------------------------------------- synthetic CSA headers
def _csa(tags: dict) -> bytes:
    """A CSA2 (``SV10``) header holding ``tags``: name -> (vr, list of item strings)."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, items) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode(), len(items), vr.encode(), 0, len(items), 77))
        for item in items:
            raw = item.encode() + b"\x00"
            out.append(struct.pack("<4i", len(raw), len(raw), 77, len(raw)))
            out.append(raw + b"\x00" * (-len(raw) % 4))
    return b"".join(out)


def _good_csa(n="35", normal=("0", "0", "1"), count_vr="US") -> bytes:
    return _csa({"NumberOfImagesInMosaic": (count_vr, [n]), "SliceNormalVector": ("FD", list(normal))})


def test_mosaic_layout_tiles_per_side_comes_from_the_csa_image_count():
    layout = mosaic_layout(MOSAIC, _good_csa("35"), 384, 384)
    assert layout == MosaicLayout(35, 6, 64, 64, (0.0, 0.0, 1.0))
    assert pickle.loads(pickle.dumps(layout)) == layout
    assert mosaic_layout("ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC", _good_csa("36"), 384, 384).tiles_per_side == 6
    assert mosaic_layout(MOSAIC, _good_csa("37"), 448, 448).tiles_per_side == 7
    assert mosaic_layout(MOSAIC, _good_csa("1"), 64, 64).tiles_per_side == 1


def test_not_a_mosaic_is_none():
    assert mosaic_layout(("ORIGINAL", "PRIMARY", "M", "ND"), _good_csa(), 384, 384) is None
    assert mosaic_layout(None, None, 64, 64) is None


BAD_CSA = {  # id: (CSA image header bytes, Rows, Columns, a word the detail must contain)
    "absent": (None, 384, 384, "absent"),
    "empty": (b"", 384, 384, "absent"),
    "too_many_tags": (b"SV10\x04\x03\x02\x01" + b"\xff" * 8, 384, 384, "damaged"),
    "cut_short": (_good_csa()[:100], 384, 384, "damaged"),
    "not_csa": (b"garbage", 384, 384, "damaged"),
    "count_not_an_int_for_its_vr": (_good_csa("3.5"), 384, 384, "damaged"),
    "count_missing": (_csa({"SliceNormalVector": ("FD", ["0", "0", "1"])}), 384, 384,
                      "NumberOfImagesInMosaic"),
    "count_zero": (_good_csa("0"), 384, 384, "NumberOfImagesInMosaic"),
    "count_negative": (_good_csa("-4"), 384, 384, "NumberOfImagesInMosaic"),
    "count_fraction": (_good_csa("3.5", count_vr="DS"), 384, 384, "NumberOfImagesInMosaic"),
    "count_nan": (_good_csa("nan", count_vr="DS"), 384, 384, "NumberOfImagesInMosaic"),
    "rows_not_tiles": (_good_csa("35"), 380, 384, "multiple"),  # 380 rows are not 6 tiles of equal size
    "cols_not_tiles": (_good_csa("35"), 384, 100, "multiple"),
    "count_needs_7_tiles": (_good_csa("49"), 384, 384, "multiple"),  # 384 is not a multiple of 7
    "more_tiles_than_pixels": (_good_csa("100000"), 64, 64, "multiple"),
    "normal_missing": (_csa({"NumberOfImagesInMosaic": ("US", ["35"])}), 384, 384, "SliceNormalVector"),
    "normal_nan": (_good_csa(normal=("0", "nan", "1")), 384, 384, "SliceNormalVector"),
    "normal_two_values": (_good_csa(normal=("0", "1")), 384, 384, "SliceNormalVector"),
    "normal_zero": (_good_csa(normal=("0", "0", "0")), 384, 384, "unit"),
    "normal_not_unit": (_good_csa(normal=("0", "0", "2")), 384, 384, "unit"),
}


@pytest.mark.parametrize("csa, rows, cols, words", list(BAD_CSA.values()), ids=list(BAD_CSA))
def test_damaged_or_inconsistent_csa_raises(csa, rows, cols, words):
    with pytest.raises(MosaicError) as err:
        mosaic_layout(MOSAIC, csa, rows, cols)
    assert isinstance(err.value, ValueError)
    assert words in err.value.detail and err.value.reason in ("invalid_value", "invalid_geometry")
    assert "nan" not in err.value.detail.lower() and "100000" not in err.value.detail  # names, never values


def test_demosaic_keeps_only_the_used_tiles_in_an_independent_array():
    layout = MosaicLayout(7, 3, 2, 4, (0.0, 0.0, 1.0))
    tiles = np.arange(9 * 2 * 4, dtype=np.int16).reshape(9, 2, 4)
    image = np.zeros((6, 12), np.int16)
    for i in range(9):
        image[(i // 3) * 2:(i // 3) * 2 + 2, (i % 3) * 4:(i % 3) * 4 + 4] = tiles[i]
    out = demosaic(image, layout)
    assert out.shape == (7, 2, 4) and out.dtype == np.int16
    np.testing.assert_array_equal(out, tiles[:7])
    assert not np.shares_memory(out, image)  # an independent array of the kept tiles only
    with pytest.raises(MosaicError):
        demosaic(image[:, :8], layout)


def test_tile_positions_start_at_the_first_tile_and_follow_the_csa_normal():
    # axial grid of 2x2 tiles of 4x4 pixels; r = x, c = y, r x c = +z
    layout = MosaicLayout(3, 2, 4, 4, (0.0, 0.0, 1.0))
    pos = tile_positions(layout, (-10.0, -20.0, 5.0), (1, 0, 0, 0, 1, 0), (2.0, 0.5), 3.0)
    # first tile: moved by half the grid minus one tile: 2 columns * 0.5 mm along x, 2 rows * 2 mm along y
    np.testing.assert_allclose(pos, [[-9.0, -16.0, 5.0], [-9.0, -16.0, 8.0], [-9.0, -16.0, 11.0]])
    # a CSA normal opposite to r x c runs the tiles the other way (Siemens sagittal)
    flipped = MosaicLayout(3, 2, 4, 4, (0.0, 0.0, -1.0))
    pos = tile_positions(flipped, (-10.0, -20.0, 5.0), (1, 0, 0, 0, 1, 0), (2.0, 0.5), 3.0)
    np.testing.assert_allclose(pos[:, 2], [5.0, 2.0, -1.0])
    with pytest.raises(MosaicError, match="perpendicular"):
        tile_positions(MosaicLayout(3, 2, 4, 4, (1.0, 0.0, 0.0)), (0, 0, 0), (1, 0, 0, 0, 1, 0), (1, 1), 1.0)


def test_spacing_between_tiles_follows_dcm2niix():
    assert spacing_between_tiles("3.6", "3") == 3.6
    assert spacing_between_tiles(2.5, 3.0) == 2.5  # smaller than the thickness: still used
    assert spacing_between_tiles(None, "3") == 3.0
    assert spacing_between_tiles("0", 3) == 3.0 and spacing_between_tiles(-3.6, 3) == 3.0
    with pytest.raises(MosaicError, match="SpacingBetweenSlices"):
        spacing_between_tiles(None, None)
    with pytest.raises(MosaicError):
        spacing_between_tiles("nan", "")


# ---------------------------------------------------------------- real data against dcm2niix
def _mosaic_files(root: Path) -> dict[int, list[Path]]:
    """SeriesNumber -> the mosaic files of that series, in acquisition (InstanceNumber) order."""
    series: dict[int, list[tuple[int, Path]]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        series.setdefault(int(ds.SeriesNumber), []).append((int(ds.InstanceNumber), path))
    return {s: [p for _, p in sorted(files)] for s, files in series.items()}


def _volume(path: Path) -> nib.Nifti1Image:
    """One mosaic file as a 3D NIfTI built only from data_prep.mosaic and data_prep.geometry."""
    ds = pydicom.dcmread(path)
    layout = mosaic_layout(ds.ImageType, csa_image_bytes(ds), int(ds.Rows), int(ds.Columns))
    assert layout is not None
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    spacing = [float(v) for v in ds.PixelSpacing]
    step = spacing_between_tiles(ds.get("SpacingBetweenSlices"), ds.get("SliceThickness"))
    position = [float(v) for v in ds.ImagePositionPatient]
    positions = tile_positions(layout, position, orientation, spacing, step)
    tiles = demosaic(ds.pixel_array, layout)
    order = np.argsort(positions @ slice_normal(orientation), kind="stable")
    assert sort_slices(positions, orientation).order.tolist() == order.tolist()  # uniform, no gaps
    affine = affine_ras(positions[order[0]], positions[order[-1]], orientation, spacing, layout.n_images)
    data = tiles[order].transpose(2, 1, 0)  # (cols, rows, slices): our voxel index (i, j, k)
    return nib.Nifti1Image(data, affine)


@pytest.fixture(scope="module")
def dcm_qa(shared_data, tmp_path_factory):
    """(mosaic files by SeriesNumber, dcm2niix outputs ``<SeriesNumber>.nii`` in a tmp folder)."""
    root = shared_data / "dicom_qa" / "dcm_qa" / "In" / "Orientation"
    if not root.is_dir():
        pytest.skip("dcm_qa mosaics not in shared data")
    exe = str(DCM2NIIX) if DCM2NIIX.exists() else shutil.which("dcm2niix")
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    out = tmp_path_factory.mktemp("dcm2niix")
    subprocess.run([exe, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(root)], check=True,
                   capture_output=True)
    return _mosaic_files(root), out


@pytest.mark.real_data
def test_dcm_qa_mosaics_match_dcm2niix(dcm_qa):
    series, out = dcm_qa
    assert len(series) == 21, sorted(series)
    for number, files in sorted(series.items()):
        ref = nib.as_closest_canonical(nib.load(out / f"{number}.nii"))
        assert ref.ndim == 4 and ref.shape[3] == len(files) == 2, (number, ref.shape)
        for t, path in enumerate(files):
            ours = nib.as_closest_canonical(_volume(path))
            assert ours.shape == ref.shape[:3], (number, ours.shape, ref.shape)
            np.testing.assert_array_equal(np.asarray(ours.dataobj, dtype=np.int64),
                                          np.asarray(ref.dataobj[..., t], dtype=np.int64),
                                          err_msg=f"series {number} volume {t}")
            np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3, err_msg=f"series {number}")


@pytest.mark.real_data
def test_dcm_qa_sagittal_runs_against_r_x_c(dcm_qa):
    """The sagittal mosaics are the ones whose CSA normal is -(r x c): tiles must come out reversed."""
    series, _ = dcm_qa
    flipped = []
    for number, files in sorted(series.items()):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        layout = mosaic_layout(ds.ImageType, csa_image_bytes(ds), int(ds.Rows), int(ds.Columns))
        if np.dot(layout.slice_normal, slice_normal([float(v) for v in ds.ImageOrientationPatient])) < 0:
            flipped.append(number)
    assert flipped == [19, 20, 21, 22, 23, 24]
