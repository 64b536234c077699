"""DWI b-values, gradients, volume order and .bval/.bvec against dcm2niix (data_prep.diffusion).

Real data: the Philips classic DWI of dcm_qa_philips_dwi (17 volumes, b = 0, 1000 and the tiny
0.001-0.004) and the dcm_qa Siemens mosaics with injected gradients (sagittal mosaics are dcm2niix's
one positive-determinant case). Synthetic series cover each vendor's private tags, GE's frames,
trace images and volume numbering; every series is also converted by dcm2niix and compared.
"""

from __future__ import annotations

import os
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
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from data_prep.diffusion import (
    DIFFUSION_KEYWORDS, DIFFUSION_PRIVATE_TAGS, Diffusion, DiffusionError, diffusion_of, dwi_volumes,
    format_bval, format_bvec, fsl_bvecs,
)
from data_prep.geometry import affine_ras, slice_normal

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"
needs_dcm2niix = pytest.mark.skipif(not DCM2NIIX.exists() and shutil.which("dcm2niix") is None,
                                    reason="dcm2niix not installed (pip install dcm2niix)")
PHILIPS_DWI = Path("dicom_qa") / "dcm_qa_philips_dwi" / "In" / "cl" / "DICOM"
RNG_DIRS = [tuple(v / np.linalg.norm(v)) for v in np.random.default_rng(1).normal(size=(4, 3))]
S3 = (3 ** -0.5,) * 3
FLIP_J = np.diag([1.0, -1.0, 1.0, 1.0])  # dcm2niix stores rows bottom-up: its j axis is -c


def _dcm2niix(src: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    exe = str(DCM2NIIX) if DCM2NIIX.exists() else "dcm2niix"
    subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(out), str(src)], check=False, capture_output=True)
    res = {"files": sorted(os.listdir(out))}
    for ext in ("bval", "bvec"):
        res[ext] = (out / f"ref.{ext}").read_text() if (out / f"ref.{ext}").exists() else None
    res["nii"] = nib.load(out / "ref.nii")
    return res


def _bvec_array(text: str) -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in text.splitlines()])


def _volumes_of(headers, manufacturer=None):
    """DwiVolumes and our affine (data_prep.geometry) of a classic series given as header objects."""
    ori = [float(v) for v in headers[0].get("ImageOrientationPatient")]
    pos = np.array([[float(v) for v in h.get("ImagePositionPatient")] for h in headers])
    vols = dwi_volumes(pos @ slice_normal(ori), [diffusion_of(h, manufacturer) for h in headers],
                       [int(h.get("InstanceNumber")) for h in headers])
    first = vols.volumes[0]
    spacing = [float(v) for v in headers[0].get("PixelSpacing")]
    return vols, affine_ras(pos[first[0]], pos[first[-1]], ori, spacing, len(first))


# --- real data -------------------------------------------------------------------------------------

class _FastHeader:
    """``get(key)`` over the project's raw element walker: keywords decoded, private int tags left
    as raw bytes (what an implicit-VR file gives), the contract diffusion_of documents."""

    def __init__(self, path: Path, wanted: set):
        from data_prep.fastheader import parse_file, vr_of
        from data_prep.headers import decode_value

        with open(path, "rb") as fh:
            _, _, self._elements, _ = parse_file(fh, path.stat().st_size, wanted)
        self._decode = lambda tag, item: decode_value(vr_of(tag, item[0]), item[1])

    def get(self, key, default=None):
        from pydicom.datadict import tag_for_keyword

        if isinstance(key, int):
            item = self._elements.get(key)
            return default if item is None else item[1]
        tag = tag_for_keyword(key)
        item = self._elements.get(tag)
        return default if item is None else self._decode(tag, item)


@pytest.mark.real_data
@needs_dcm2niix
def test_real_philips_dwi_matches_dcm2niix(shared_data, tmp_path):
    from pydicom.datadict import tag_for_keyword

    src = shared_data / PHILIPS_DWI
    if not src.is_dir():
        pytest.skip("dcm_qa_philips_dwi not in shared data")
    wanted = {tag_for_keyword(k) for k in DIFFUSION_KEYWORDS + ("ImagePositionPatient", "PixelSpacing")}
    wanted |= set(DIFFUSION_PRIVATE_TAGS)
    paths = sorted(src.glob("IM_*"))
    headers = [_FastHeader(p, wanted) for p in paths]
    assert len(headers) == 544
    vols, affine = _volumes_of(headers)
    ref = _dcm2niix(src, tmp_path / "ref")
    assert ref["nii"].shape == (112, 112, 32, 17) and len(vols.volumes) == 17 and vols.excluded == ()
    assert vols.write_gradients
    # b-values byte for byte, tiny b-values where they were acquired (volumes 4, 8, 12, 16)
    assert format_bval(vols.bvalues) == ref["bval"]
    assert ref["bval"].split()[:6] == ["0", "1000", "1000", "1000", "0.001", "1000"]
    # gradients for dcm2niix's own grid (rows bottom-up): byte for byte
    np.testing.assert_allclose(ref["nii"].affine[:3, :3], (affine @ FLIP_J)[:3, :3], atol=1e-3)
    assert format_bvec(fsl_bvecs(vols.directions, ref["nii"].affine, vols.bvalues)) == ref["bvec"]
    # for our grid (rows top-down, positive determinant) the same gradients, expressed in our voxel
    # frame: dcm2niix's with the k row negated (rotated volumes; b=0 is copied unrotated by both)
    ours = fsl_bvecs(vols.directions, affine, vols.bvalues)
    expect = _bvec_array(ref["bvec"])
    expect[2, vols.bvalues > 0] *= -1
    np.testing.assert_allclose(ours, expect, atol=1e-4)
    # the volumes hold the same images as dcm2niix's: compare slice 5 of every volume (dcm2niix
    # applies Philips' floating-point scale, one factor for the whole series)
    data = np.asanyarray(ref["nii"].dataobj)
    scale = []
    for v, members in enumerate(vols.volumes):
        pixels = pydicom.dcmread(paths[members[5]]).pixel_array.T.astype(float)  # (cols, rows)
        assert np.array_equal(data[:, ::-1, 5, v] == 0, pixels == 0)
        scale.append(data[:, ::-1, 5, v][pixels > 0] / pixels[pixels > 0])
    np.testing.assert_allclose(np.concatenate(scale), scale[0][0], rtol=1e-5)


@pytest.mark.real_data
@needs_dcm2niix
@pytest.mark.parametrize("name", ["sag/sagasc35", "sag/sagdesc36", "ax/axasc35", "cor/corasc35"])
def test_mosaic_gradients_match_dcm2niix(shared_data, tmp_path, name):
    # Siemens mosaics with (0019,100C)/(0019,100E) added; sagittal mosaics are the case where
    # dcm2niix's grid has a positive determinant (slices run along -(r x c))
    folder = shared_data / "dicom_qa" / "dcm_qa" / "In" / "Orientation" / name
    files = sorted(folder.glob("MR*")) if folder.is_dir() else []
    files = [p for p in files if p.read_bytes()[128:132] == b"DICM"]
    if not files:
        pytest.skip(f"dcm_qa {name} not in shared data")
    src, series = tmp_path / "in", generate_uid()
    src.mkdir()
    encodings = [(0, None)] + [(1000, d) for d in RNG_DIRS]
    headers = []
    for i, (b, g) in enumerate(encodings):
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID, ds.InstanceNumber, ds.AcquisitionNumber = series, i + 1, i + 1
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "IS", str(b))
        if g is not None:
            block.add_new(0x0E, "FD", [float(x) for x in g])
        ds.save_as(src / f"{i}.dcm")
        headers.append(ds)
    ref = _dcm2niix(src, tmp_path / "ref")
    diffusion = [diffusion_of(h) for h in headers]
    assert [d.bvalue for d in diffusion] == [0, 1000, 1000, 1000, 1000]
    assert diffusion[0].direction is None and np.allclose(diffusion[1].direction, RNG_DIRS[0])
    directions = np.array([d.direction or (0, 0, 0) for d in diffusion])
    got = fsl_bvecs(directions, ref["nii"].affine, [d.bvalue for d in diffusion])
    np.testing.assert_allclose(got, _bvec_array(ref["bvec"]), atol=1e-5)
    assert (np.linalg.det(ref["nii"].affine[:3, :3]) > 0) == name.startswith("sag")


# --- synthetic series, each vendor's tags, compared with dcm2niix -----------------------------------

MANUFACTURERS = {"siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems",
                 "unknown": "ACME", "toshiba": "TOSHIBA_MEC"}
AXIAL, SAGITTAL, CORONAL = (1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)
OBLIQUE = (0.9, 0.4358899, 0.0, -0.4358899, 0.9, 0.0)


def _csa2(tags: dict) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``{name: [text values]}``."""
    out = b"SV10\x04\x03\x02\x01" + struct.pack("<2I", len(tags), 77)
    for name, values in tags.items():
        out += name.encode().ljust(64, b"\0")
        out += struct.pack("<i4siii", len(values), b"FD\0\0", 4, len(values), 77)
        for v in values:
            raw = v.encode() + b"\0"
            out += struct.pack("<4i", len(raw), len(raw), 77, len(raw)) + raw + b"\0" * (-len(raw) % 4)
    return out


def _encode(ds: Dataset, vendor: str, source: str, b: float, g, extra: dict) -> None:
    """Write b-value ``b`` and gradient ``g`` (None: none) with the ``source`` tags of ``vendor``; no
    diffusion tags at all when ``b`` is None (Toshiba/Canon b=0 images)."""
    if b is None:
        return
    if source == "standard":
        ds.DiffusionBValue = float(b)
        if g is not None:
            ds.DiffusionGradientOrientation = [float(x) for x in g]
    elif vendor == "siemens" and source == "csa":
        tags = {"B_value": [f"{b:.8f}"]}
        if g is not None:
            tags["DiffusionGradientDirection"] = [f"{x:.8f}" for x in g]
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", _csa2(tags))
    elif vendor == "siemens":
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "IS", str(int(round(b))))
        if g is not None:
            block.add_new(0x0E, "FD", [float(x) for x in g])
    elif vendor == "ge":
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
            0x39, "IS", extra.get("ge_b", f"{int(round(b))}\\8\\0\\0"))
        block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        for element, x in zip((0xBB, 0xBC, 0xBD), g if g is not None else (0, 0, 0)):
            block.add_new(element, "DS", f"{x:.6f}")
    else:
        ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", float(b))
        ds.private_block(0x2001, "Philips Imaging DD 001").add_new(0x04, "CS", extra.get("philips_dir", "O"))
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        for element, x in zip((0xB0, 0xB1, 0xB2), g if g is not None else (0, 0, 0)):
            block.add_new(element, "FL", float(x))
    if "ge_ndirs" in extra:
        ds.private_block(0x0021, "GEMS_RELA_01", create=True).add_new(0x5A, "SL", extra["ge_ndirs"])


def _write_dwi(folder: Path, encodings, vendor="philips", source="standard", orientation=AXIAL, phase="COL",
               n_slices=3, slice_major=None):
    """A classic DWI series: ``encodings`` is a list of ``(b, gradient or None, extra)``, one per
    volume. Instances are numbered slice by slice (default for Philips and GE) or volume by volume
    (default for the others: Siemens numbers each volume's slices in turn, and dcm2niix stacks
    Siemens slice-by-slice numbering wrongly). Returns the datasets."""
    folder.mkdir(parents=True)
    slice_major = vendor in ("philips", "ge") if slice_major is None else slice_major
    o = np.asarray(orientation, float)
    normal, series = np.cross(o[:3], o[3:]), generate_uid()
    items = [(v, k) for k in range(n_slices) for v in range(len(encodings))]
    if not slice_major:
        items.sort()
    out = []
    for idx, (v, k) in enumerate(items):
        b, g, extra = encodings[v]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
        ds.Manufacturer, ds.ImageType = MANUFACTURERS[vendor], ["ORIGINAL", "PRIMARY", "DIFFUSION"]
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "X", series, series, 5
        ds.InstanceNumber = idx + 1
        ds.AcquisitionTime, ds.PatientPosition, ds.InPlanePhaseEncodingDirection = "101010", "HFS", phase
        ds.ImageOrientationPatient = [float(x) for x in o]
        ds.ImagePositionPatient = [float(x) for x in np.array([-10.0, -20.0, 5.0]) + 3.0 * k * normal]
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [2.0, 2.0], 3.0, 3.0
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = np.full((4, 4), 100 * v + k, np.uint16).tobytes()
        _encode(ds, vendor, source, b, g, extra)
        ds.save_as(folder / f"{generate_uid()}.dcm", enforce_file_format=True)
        out.append(ds)
    return out


def _check_against_dcm2niix(tmp_path, datasets) -> tuple:
    vols, affine = _volumes_of(datasets)
    ref = _dcm2niix(tmp_path / "in", tmp_path / "ref")
    assert format_bval(vols.bvalues) == ref["bval"]
    # dcm2niix's grid is ours with rows bottom-up (its Siemens affine for these tiny files is degenerate)
    got = fsl_bvecs(vols.directions, affine @ FLIP_J, vols.bvalues)
    np.testing.assert_allclose(got, _bvec_array(ref["bvec"]), atol=1e-4)
    assert ref["nii"].shape[3] == len(vols.volumes)
    data = np.asanyarray(ref["nii"].dataobj)  # which image is which volume: pixel value 100 * v + k
    assert [int(data[0, 0, 0, i]) // 100 for i in range(len(vols.volumes))] == \
           [int(datasets[m[0]].pixel_array[0, 0]) // 100 for m in vols.volumes]
    return vols, ref


BASE = [(0, None, {})] + [(1000, g, {}) for g in RNG_DIRS]
VENDOR_CASES = {
    "siemens-standard-axial": ("siemens", "standard", AXIAL, "COL"),
    "siemens-0019-sagittal": ("siemens", "private", SAGITTAL, "COL"),
    "siemens-csa-coronal": ("siemens", "csa", CORONAL, "COL"),
    "siemens-csa-oblique": ("siemens", "csa", OBLIQUE, "ROW"),
    "philips-private-oblique": ("philips", "private", OBLIQUE, "COL"),
    "philips-private-sagittal": ("philips", "private", SAGITTAL, "ROW"),
    "unknown-standard-coronal": ("unknown", "standard", CORONAL, "COL"),
    "ge-private-axial": ("ge", "private", AXIAL, "COL"),
    "ge-private-axial-row": ("ge", "private", AXIAL, "ROW"),
    "ge-private-sagittal": ("ge", "private", SAGITTAL, "COL"),
    "ge-private-coronal": ("ge", "private", CORONAL, "COL"),
    "ge-private-oblique-row": ("ge", "private", OBLIQUE, "ROW"),
    "ge-standard-sagittal": ("ge", "standard", SAGITTAL, "COL"),
}


@needs_dcm2niix
@pytest.mark.parametrize("case", list(VENDOR_CASES))
def test_vendor_tags_match_dcm2niix(tmp_path, case):
    vendor, source, orientation, phase = VENDOR_CASES[case]
    datasets = _write_dwi(tmp_path / "in", BASE, vendor, source, orientation, phase)
    vols, _ = _check_against_dcm2niix(tmp_path, datasets)
    assert len(vols.volumes) == 5 and vols.write_gradients


@needs_dcm2niix
def test_ge_bvalue_offset_and_b0_with_nominal_bvalue(tmp_path):
    # (0043,1039) carries b + n * 10^9; a zero-gradient image with b > 0 is a b=0 image on GE
    encodings = [(0, None, {"ge_b": "1000000000\\8\\0\\0"}),
                 (1000, RNG_DIRS[0], {"ge_b": "1000001000\\8\\0\\0"}),
                 (1500, RNG_DIRS[1], {"ge_b": "2000001500\\8\\0\\0"}),
                 (1000, RNG_DIRS[2], {}), (1000, None, {})]
    vols, _ = _check_against_dcm2niix(tmp_path, _write_dwi(tmp_path / "in", encodings, "ge", "private"))
    assert list(vols.bvalues) == [0, 1000, 1500, 1000, 0] and vols.excluded == ()


@needs_dcm2niix
@pytest.mark.parametrize("vendor,extra,excluded", [
    ("philips", {"philips_dir": "I"}, True),  # Philips isotropic image: b=1000, no gradient, flag I
    ("unknown", {}, True),                    # dcm2niix treats an unknown manufacturer as Philips
    ("ge", {"ge_ndirs": 4}, True),            # GE with a direction count: a trace image
    ("siemens", {}, False),                   # Siemens: kept, zero gradient
])
def test_trace_images_left_out_like_dcm2niix(tmp_path, vendor, extra, excluded):
    source = "standard" if vendor in ("unknown", "siemens") else "private"
    encodings = BASE[:3] + [(1000, None, extra)] + BASE[3:]
    if vendor == "ge":
        encodings = [(b, g, {**e, "ge_ndirs": 4}) for b, g, e in encodings]
    vols, ref = _check_against_dcm2niix(tmp_path, _write_dwi(tmp_path / "in", encodings, vendor, source))
    assert len(vols.excluded) == excluded and len(vols.volumes) == 6 - excluded
    assert ("ref_ADC.nii" in ref["files"]) == excluded
    if excluded:
        assert vols.excluded_diffusion == (Diffusion(1000.0, None, True),)


@needs_dcm2niix
@pytest.mark.parametrize("slice_major", [True, False])
def test_tiny_bvalues_and_repeats_keep_acquisition_order(tmp_path, slice_major):
    # the Philips pattern: b=0 and tiny b-values share the gradient (1,1,1)/sqrt(3); b=0 repeated
    encodings = [(0, S3, {}), (1000, RNG_DIRS[0], {}), (0.001, S3, {}), (1000, RNG_DIRS[1], {}),
                 (0, S3, {}), (0.002, S3, {}), (1000, RNG_DIRS[0], {}), (1e-8, S3, {})]
    datasets = _write_dwi(tmp_path / "in", encodings, "philips", "standard", SAGITTAL,
                          slice_major=slice_major)
    vols, ref = _check_against_dcm2niix(tmp_path, datasets)
    assert ref["bval"] == "0 1000 0.001 1000 0 0.002 1000 1e-08\n"
    bvecs = _bvec_array(ref["bvec"])
    # b <= FLT_EPSILON: the stored gradient, unrotated
    np.testing.assert_allclose(bvecs[:, [0, 4, 7]], np.full((3, 3), S3[0]), atol=1e-5)


def test_volumes_group_by_encoding_whatever_the_numbering():
    # instance numbers shuffled within the series: each volume still holds one encoding
    rng = np.random.default_rng(0)
    encodings = [Diffusion(0.0, None), Diffusion(1000.0, RNG_DIRS[0]), Diffusion(0.0, None),
                 Diffusion(1000.0, RNG_DIRS[1]), Diffusion(0.003, S3)]
    n_slices = 4
    items = [(v, k) for v in range(len(encodings)) for k in range(n_slices)]
    numbers = rng.permutation(len(items)) + 1
    vols = dwi_volumes([3.0 * k for _, k in items], [encodings[v] for v, _ in items], list(numbers))
    assert len(vols.volumes) == 5
    for members, d in zip(vols.volumes, vols.diffusion):
        assert [items[i][1] for i in members] == list(range(n_slices))  # one image per slice, in order
        assert {encodings[items[i][0]] for i in members} == {d}
    firsts = [min(numbers[list(m)]) for m in vols.volumes]
    assert firsts == sorted(firsts)  # ordered by first acquired image


def test_incomplete_volume_is_an_error():
    d = [Diffusion(0.0, None)] * 3 + [Diffusion(1000.0, RNG_DIRS[0])] * 2
    with pytest.raises(DiffusionError) as exc:
        dwi_volumes([0.0, 3.0, 6.0, 0.0, 3.0], d, [1, 2, 3, 4, 5])
    assert exc.value.reason == "inconsistent_diffusion"


def test_trace_kept_when_it_would_leave_fewer_than_two_volumes():
    trace = Diffusion(1000.0, None, True)
    pair = dwi_volumes([0.0, 0.0], [Diffusion(0.0, None), trace], [1, 2])  # b=0 + trace: keep, with .bval
    assert len(pair.volumes) == 2 and pair.excluded == () and pair.write_gradients
    single = dwi_volumes([0.0] * 3, [Diffusion(0.0, None), trace, Diffusion(500.0, None, True)], [1, 2, 3])
    assert len(single.volumes) == 3 and not single.write_gradients  # one non-trace volume: keep all, no files
    two = dwi_volumes([0.0] * 3, [Diffusion(0.0, None), Diffusion(1000.0, RNG_DIRS[0]), trace], [1, 2, 3])
    assert len(two.volumes) == 2 and two.excluded == ((2,),) and two.write_gradients
    assert not dwi_volumes([0.0] * 2, [trace, trace], [1, 2]).write_gradients
    same_b0 = dwi_volumes([0.0] * 2, [Diffusion(0.0, None)] * 2, [1, 2])
    assert len(same_b0.volumes) == 2 and not same_b0.write_gradients  # nothing varies: no .bval/.bvec


# --- header values ---------------------------------------------------------------------------------

class _DictHeader:
    """The ``get(key)`` contract with raw little-endian bytes for private tags (implicit VR files)."""

    def __init__(self, values: dict):
        self._values = values

    def get(self, key, default=None):
        return self._values.get(key, default)


def test_private_tags_as_raw_bytes():
    g = (0.6, 0.0, -0.8)
    philips = _DictHeader({"Manufacturer": "Philips", 0x20011003: struct.pack("<f", 700.0),
                           0x200510B0: struct.pack("<f", g[0]), 0x200510B1: struct.pack("<f", g[1]),
                           0x200510B2: struct.pack("<f", g[2])})
    assert diffusion_of(philips) == Diffusion(700.0, pytest.approx(g), False)
    siemens = _DictHeader({0x0019100C: b"1000", 0x0019100E: struct.pack("<3d", *g)})
    assert diffusion_of(siemens, "SIEMENS") == Diffusion(1000.0, pytest.approx(g))
    ge = _DictHeader({0x00431039: b"1000002000\\8\\0\\0 ", 0x001910BB: b"0.6 ", 0x001910BC: b"0",
                      0x001910BD: b"-0.8", "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
                      "InPlanePhaseEncodingDirection": "COL"})
    d = diffusion_of(ge, "GE MEDICAL SYSTEMS")
    assert d.bvalue == 2000.0 and d.direction == pytest.approx((-0.6, 0.0, -0.8))  # axial: LPS = (-x, -y, z)


def test_standard_tags_win_and_bad_values_count_as_absent():
    both = _DictHeader({"DiffusionBValue": 500.0, "DiffusionGradientOrientation": (0, 0, 1),
                        0x0019100C: "900", 0x0019100E: (1.0, 0, 0)})
    assert diffusion_of(both, "SIEMENS") == Diffusion(500.0, (0.0, 0.0, 1.0))
    nan_b = _DictHeader({"DiffusionBValue": float("nan"), 0x0019100C: "900", 0x00291010: b"SV10 damaged"})
    assert diffusion_of(nan_b, "SIEMENS") == Diffusion(900.0, None)
    assert diffusion_of(_DictHeader({"DiffusionBValue": -5.0}), "SIEMENS") is None
    assert diffusion_of(_DictHeader({"EchoTime": 80}), "Philips") is None  # not a diffusion image
    zero = _DictHeader({"DiffusionBValue": 1000.0, "DiffusionGradientOrientation": (0, 0, 0)})
    assert diffusion_of(zero, "Philips") == Diffusion(1000.0, None, True)
    flagged = _DictHeader({"DiffusionBValue": 1000.0, "DiffusionGradientOrientation": (0, 0, 1),
                           "DiffusionDirectionality": "ISOTROPIC"})
    assert diffusion_of(flagged, "Philips").is_trace  # stricter than dcm2niix (which tests the gradient)
    assert not diffusion_of(flagged, "SIEMENS").is_trace


def test_enhanced_frames_read_mr_diffusion_sequence():
    def frame(b, g=None, directionality="DIRECTIONAL"):
        item, diff = Dataset(), Dataset()
        diff.DiffusionBValue, diff.DiffusionDirectionality = b, directionality
        if g is not None:
            grad = Dataset()
            grad.DiffusionGradientOrientation = list(g)
            diff.DiffusionGradientDirectionSequence = Sequence([grad])
        item.MRDiffusionSequence = Sequence([diff])
        return item

    ds = Dataset()
    ds.Manufacturer = "Philips Medical Systems"
    assert diffusion_of(ds, frame_item=frame(1000.0, (0.0, 1.0, 0.0))) == Diffusion(1000.0, (0.0, 1.0, 0.0))
    assert diffusion_of(ds, frame_item=frame(1000.0, None, "ISOTROPIC")).is_trace
    shared = Dataset()
    shared.MRDiffusionSequence = frame(0.0, None, "NONE").MRDiffusionSequence
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    assert diffusion_of(ds, frame_item=Dataset()) == Diffusion(0.0, None)  # from the shared groups


def test_diffusion_is_a_frozen_picklable_value():
    d = Diffusion(1000.0, (0.0, 0.6, 0.8), False)
    assert pickle.loads(pickle.dumps(d)) == d and hash(d) == hash(Diffusion(1000.0, (0.0, 0.6, 0.8)))
    with pytest.raises(AttributeError):
        d.bvalue = 0.0


# --- gradient tables and text ----------------------------------------------------------------------

def test_fsl_bvecs_conventions():
    g = np.array([[0.6, 0.0, 0.8], [0.0, 0.0, 0.0]])  # LPS
    ours = affine_ras((0, 0, 0), (0, 0, 6), AXIAL, (2, 2), 3)  # positive determinant
    dcm = ours @ FLIP_J  # negative determinant
    # negative determinant: the voxel-frame vector; RAS i = -L, so i = -x: (x, -y, z) for rows bottom-up
    np.testing.assert_allclose(fsl_bvecs(g, dcm), [[0.6, 0], [0, 0], [0.8, 0]])
    # positive determinant: FSL flips i; written as dcm2niix does, the antipodal form (j, k negated)
    np.testing.assert_allclose(fsl_bvecs(g, ours), [[0.6, 0], [0, 0], [-0.8, 0]])
    # a gantry tilt shears the slice axis: the gradients use the in-plane axes and their normal
    tilted = ours.copy()
    tilted[:3, 2] += [0, 1.0, 0]
    np.testing.assert_allclose(fsl_bvecs(g, tilted), fsl_bvecs(g, ours), atol=1e-12)
    # b <= FLT_EPSILON: copied as stored, whatever the affine
    np.testing.assert_allclose(fsl_bvecs(g, ours, bvalues=[0.0, 1000.0]), [[0.6, 0], [0, 0], [0.8, 0]])


def test_bval_and_bvec_text_is_compact_and_rounded_to_six_digits():
    bvals = [0, 1000, 0.001, 0.0010000000474974513, 2500.5, 1e-8]
    assert format_bval(bvals) == "0 1000 0.001 0.001 2500.5 1e-08\n"
    bvecs = [[-0.0, 0.57735026], [1.0, -0.99837719], [1e-5, 0.3]]
    assert format_bvec(bvecs) == "0 0.57735\n1 -0.998377\n1e-05 0.3\n"


# --- one-volume diffusion series (a b=0 or b=1000 series of its own, a trace image) ------------------

def _world(bvec_column, affine) -> np.ndarray:
    """An FSL ``.bvec`` column in the voxel frame of ``affine`` as a RAS unit vector (up to sign: FSL
    flips the first voxel axis for a positive determinant, dcm2niix writes the antipodal vector)."""
    m = np.asarray(affine, float)[:3, :3]
    i, j = m[:, 0] / np.linalg.norm(m[:, 0]), m[:, 1] / np.linalg.norm(m[:, 1])
    k = np.cross(i, j) * (np.sign(np.cross(i, j) @ m[:, 2]) or 1.0)
    v = np.array(bvec_column, float)
    if np.linalg.det(m) > 0:
        v[0] *= -1.0
    return np.stack([i, j, k]).T @ v


ONE_VOLUME = {  # (b, gradient, extra): what dcm2niix writes is asked of dcm2niix itself
    "b0": (0, None, {}), "b0-gradient": (0, S3, {}), "b1000-gradient": (1000, RNG_DIRS[0], {}),
    "b1000-no-gradient": (1000, None, {}),
}


@needs_dcm2niix
@pytest.mark.parametrize("vendor,source", [("siemens", "standard"), ("siemens", "csa"), ("siemens", "private"),
                                           ("philips", "private"), ("philips", "standard"),
                                           ("unknown", "standard"), ("ge", "private")])
@pytest.mark.parametrize("case", list(ONE_VOLUME))
def test_one_volume_series_is_dwi_exactly_when_dcm2niix_writes_gradients(tmp_path, vendor, source, case):
    """A series of one diffusion encoding: ``kind=dwi`` with ``.bval`` (and ``.bvec``) exactly when
    dcm2niix writes them, with the same b-value and the same gradient in world space; else a plain
    ``image`` without gradient files (a b=0 image without a gradient, any one-volume GE series)."""
    from data_prep.convert import convert_archive

    b, g, extra = ONE_VOLUME[case]
    _write_dwi(tmp_path / "in", [(b, g, extra)], vendor, source)
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    exe = str(DCM2NIIX) if DCM2NIIX.exists() else "dcm2niix"
    subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(ref_dir), str(tmp_path / "in")], check=False,
                   capture_output=True)
    res = convert_archive(str(tmp_path / "in"), str(tmp_path / "ours"), workers=1, progress=False)
    assert res.converted == 1 and len(res.rows) == 1
    row = res.rows[0]
    ours = tmp_path / "ours" / row["path"]
    stem = ours.name[: -len(".nii.gz")]
    for ext in ("bval", "bvec"):
        assert (ours.with_name(f"{stem}.{ext}")).exists() == (ref_dir / f"ref.{ext}").exists(), ext
    assert row["kind"] == ("dwi" if (ref_dir / "ref.bval").exists() else "image")
    assert nib.load(ours).ndim == 3  # one volume: a 3D file, as dcm2niix writes it
    if row["kind"] == "dwi":
        assert ours.with_name(f"{stem}.bval").read_text() == (ref_dir / "ref.bval").read_text()
    if (ref_dir / "ref.bvec").exists():
        ref_vec = _world(_bvec_array((ref_dir / "ref.bvec").read_text())[:, 0], nib.load(ref_dir / "ref.nii").affine)
        our_vec = _world(_bvec_array(ours.with_name(f"{stem}.bvec").read_text())[:, 0], nib.load(ours).affine)
        if b > 0:  # b=0: both copy the stored gradient unrotated, compared byte for byte below
            assert abs(abs(float(ref_vec @ our_vec)) - 1.0) < 1e-4 or (np.allclose(ref_vec, 0) and np.allclose(our_vec, 0))
        else:
            assert ours.with_name(f"{stem}.bvec").read_text() == (ref_dir / "ref.bvec").read_text()


def test_one_volume_siemens_mosaic_keeps_its_header_bvalue(tmp_path):
    """nibabel's Siemens DTI mosaics, each file alone: a one-volume ``dwi`` with the b-value and
    gradient of its CSA header (dcm2niix writes b=0 for both: "assuming 1 volume B=0 series")."""
    import gzip

    from nibabel.nicom import tests as nicom_tests

    from data_prep.convert import convert_archive

    data = Path(nicom_tests.__file__).parent / "data"
    for name, bval in (("siemens_dwi_0", "0\n"), ("siemens_dwi_1000", "1000\n")):
        src = data / f"{name}.dcm.gz"
        if not src.exists():
            pytest.skip("nibabel's DICOM test data is not installed")
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.dcm").write_bytes(gzip.decompress(src.read_bytes()))
        res = convert_archive(str(tmp_path / name), str(tmp_path / f"out_{name}"), workers=1, progress=False)
        (row,) = res.rows
        assert row["kind"] == "dwi" and row["shape"] == "128x128x48"
        nii = tmp_path / f"out_{name}" / row["path"]
        stem = nii.name[: -len(".nii.gz")]
        assert nii.with_name(f"{stem}.bval").read_text() == bval
        bvec = _bvec_array(nii.with_name(f"{stem}.bvec").read_text())[:, 0]
        assert np.allclose(bvec, 0) if bval == "0\n" else abs(np.linalg.norm(bvec) - 1) < 1e-4


@needs_dcm2niix
@pytest.mark.parametrize("vendor", ["toshiba", "siemens", "philips", "ge", "unknown"])
def test_untagged_b0_images_of_a_toshiba_diffusion_series_are_its_b0_volumes(tmp_path, vendor):
    """Toshiba/Canon write DiffusionBValue and the gradient only on diffusion-weighted images; dcm2niix
    reads the untagged images of their series as b=0 volumes (was: the whole series refused). For the
    other vendors dcm2niix writes no gradients or splits the series: refused, as before."""
    from helpers.paths import load_benchmark

    from data_prep.convert import convert_archive

    bench = load_benchmark("prep_vs_dcm2niix")
    encodings = [(None, None, {})] + [(1000, g, {}) for g in RNG_DIRS[:3]]
    datasets = _write_dwi(tmp_path / "in", encodings, vendor, "standard", OBLIQUE, "COL")
    result = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    if vendor != "toshiba":
        assert result.rows == [] and [i.reason for i in result.issues] == ["inconsistent_diffusion"]
        return
    [row] = result.rows
    assert (row["kind"], row["shape"]) == ("dwi", "4x4x3x4"), [i.to_dict() for i in result.issues]
    stem = str(tmp_path / "out" / row["path"])[: -len(".nii.gz")]
    assert Path(stem + ".bval").read_text() == "0 1000 1000 1000\n"
    ours = np.asanyarray(nib.load(stem + ".nii.gz").dataobj)  # pixel value 100 * volume + slice
    assert [int(ours[0, 0, 0, v]) // 100 for v in range(4)] == [0, 1, 2, 3]
    assert len(datasets) == 12
    # voxels, affine, b-values and gradients in world coordinates against dcm2niix's
    comparison = bench.compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert (comparison.reference, comparison.reproduced) == (4, 4), comparison.missing


def test_dwi_beside_its_trace_images_keeps_the_series_label(tmp_path):
    """A Philips DWI series holding isotropic (trace) images: the trace is a volume of its own
    (`_part-trace`), the DWI keeps the series label (was `_part-unknown`)."""
    from data_prep.convert import convert_archive

    _write_dwi(tmp_path / "in", BASE[:3] + [(1000, None, {"philips_dir": "I"})] + BASE[3:], "philips", "private")
    result = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    kinds = {row["series"]: (row["kind"], row["shape"]) for row in result.rows}
    assert kinds == {"s005-series": ("dwi", "4x4x3x5"), "s005-series_part-trace": ("dwi", "4x4x3")}
