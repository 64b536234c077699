"""Enhanced (multi-frame) MR as Philips, Canon and Siemens XA write it, against dcm2niix (data_prep.headers,
data_prep.scan).

Synthetic Enhanced MR Image Storage files (5x6 images, 4 slices, an oblique plane): per-frame functional
groups with PlanePosition, FrameContent (StackID, InStackPositionNumber, TemporalPositionIndex,
DimensionIndexValues, FrameAcquisitionDateTime), MREcho (EffectiveEchoTime), MRImageFrameType (FrameType
M / P) and MRDiffusion sequences; frames stored volume by volume or slice by slice; a series in one file or
split over several (one file per volume or echo, as Siemens XA exports). Each case is converted by both
converters (benchmarks/prep_vs_dcm2niix.py): every dcm2niix volume must be reproduced, in the same 4D order.

What dcm2niix v1.0.20260724 gets wrong on such files, where we deliberately differ (tested against the
truth instead): it reads InStackPositionNumber only for Philips, Canon, Hitachi, Bruker and unknown
vendors, so a Siemens file holding several volumes without TemporalPositionIndex is stacked into one 3D
volume with repeated positions; frames in an order the DimensionIndexValues do not give (no pointer,
shuffled) come out spatially scrambled; a file with two stacks in different planes is refused ("slice
orientation varies"), which we convert as two volumes (``split_orientation``).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.paths import load_benchmark
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep.convert import convert_archive
from data_prep.headers import read_header

bench = load_benchmark("prep_vs_dcm2niix")
needs_dcm2niix = pytest.mark.skipif(bench.dcm2niix_exe() is None,
                                    reason="dcm2niix not installed (pip install dcm2niix)")

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
PHILIPS, CANON, SIEMENS = "Philips Medical Systems", "CANON_MEC", "SIEMENS"
OBLIQUE = (float(np.cos(0.2)), float(np.sin(0.2)), 0.0, 0.0, 0.0, -1.0)  # coronal, 0.2 rad about feet-head
AXIAL, SAGITTAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SLICES, STEP = 4, 2.0
GRADIENTS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.6, 0.8, 0.0)]
FC = Tag(0x00209111)  # FrameContentSequence: the functional group of the dimension pointers below
STACK, IN_STACK, TEMPORAL = Tag(0x00209056), Tag(0x00209057), Tag(0x00209128)
#: DimensionIndexSequence pointers: Canon/Siemens order (stack, time, in-stack); Philips: stack, in-stack, ...
CANON_DIMS = [(STACK, FC), (TEMPORAL, FC), (IN_STACK, FC)]
PHILIPS_DIMS = [(STACK, FC), (IN_STACK, FC), (Tag(0x20051011), Tag(0x2005140F))]
PHILIPS_DWI_DIMS = [(STACK, FC), (IN_STACK, FC), (Tag(0x00189087), Tag(0x00189117)),
                    (Tag(0x20051413), Tag(0x2005140F))]


def _datetime(seconds: float) -> str:
    s = 10 * 3600 + seconds
    return f"20240102{int(s // 3600):02d}{int(s // 60 % 60):02d}{s % 60:09.6f}"


def write_enhanced(path: Path, frames: list[dict], *, manufacturer=SIEMENS, dims=None, instance=1,
                   series_uid="1.2.826.0.1.3680043.8.498.1", series_number=5, scanning_sequence="EP",
                   image_type=("ORIGINAL", "PRIMARY", "M", "NONE"), seed=0, top=None) -> np.ndarray:
    """One Enhanced MR file; frame ``f`` of ``frames`` (dicts) lies at slice ``slot`` of plane ``ori``
    (``origin`` + slot * STEP * normal) with, when given: ``stack`` / ``in_stack`` (default "1" / slot + 1),
    ``temporal`` (TemporalPositionIndex), ``acq`` (FrameAcquisitionDateTime, s), ``dim``
    (DimensionIndexValues), ``te`` (EffectiveEchoTime), ``ftype`` (FrameType value 3: M, P), ``bval`` /
    ``dirn`` / ``bvec`` (MRDiffusionSequence). ``dims``: DimensionIndexSequence (pointer, group) pairs.
    Returns the stored pixels (frames, rows, cols)."""
    rng = np.random.default_rng(seed)
    rows, cols = 6, 5
    data = rng.integers(0, 4000, size=(len(frames), rows, cols), dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_MR, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_MR, meta.MediaStorageSOPInstanceUID, "MR"
    ds.ImageType = list(image_type)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^J", "PID-ENH", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2", series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20240102", "100000", "20240102", "100000"
    ds.AcquisitionDateTime = _datetime(0)
    ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = series_number, "enh", instance
    ds.Manufacturer, ds.ManufacturerModelName, ds.MagneticFieldStrength = manufacturer, "Synth", 3
    ds.ScanningSequence, ds.NumberOfFrames, ds.Rows, ds.Columns = scanning_sequence, len(frames), rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in (top or {}).items():
        setattr(ds, keyword, value)
    shared, measures, timing, scaling = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [1.5, 1.25], STEP, STEP
    timing.RepetitionTime, timing.FlipAngle = 2000.0, 70
    scaling.RescaleSlope, scaling.RescaleIntercept, scaling.RescaleType = 1, 0, "US"
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.PixelValueTransformationSequence = Sequence([scaling])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if dims:
        uid, items = generate_uid(), []
        for pointer, group in dims:
            item = Dataset()
            item.DimensionOrganizationUID = uid
            item.DimensionIndexPointer, item.FunctionalGroupPointer = pointer, group
            items.append(item)
        ds.DimensionIndexSequence = Sequence(items)
    per_frame = []
    for f in frames:
        item, position, plane, content = Dataset(), Dataset(), Dataset(), Dataset()
        o = np.asarray(f.get("ori", OBLIQUE), float)
        origin = np.asarray(f.get("origin", (-10.0, -12.0, 8.0)), float)
        at = origin + f["slot"] * STEP * np.cross(o[:3], o[3:])
        position.ImagePositionPatient = [round(float(v), 4) for v in at]
        plane.ImageOrientationPatient = [float(v) for v in o]
        item.PlanePositionSequence, item.PlaneOrientationSequence = Sequence([position]), Sequence([plane])
        content.StackID, content.InStackPositionNumber = f.get("stack", "1"), f.get("in_stack", f["slot"] + 1)
        if f.get("acq") is not None:
            content.FrameAcquisitionDateTime = _datetime(f["acq"])
        if f.get("temporal") is not None:
            content.TemporalPositionIndex = f["temporal"]
        if f.get("dim") is not None:
            content.DimensionIndexValues = list(f["dim"])
        item.FrameContentSequence = Sequence([content])
        if f.get("te") is not None:
            echo = Dataset()
            echo.EffectiveEchoTime = f["te"]
            item.MREchoSequence = Sequence([echo])
        if f.get("ftype") is not None:
            frame_type = Dataset()
            frame_type.FrameType = ["ORIGINAL", "PRIMARY", f["ftype"], "NONE"]
            frame_type.ComplexImageComponent = {"M": "MAGNITUDE", "P": "PHASE"}[f["ftype"]]
            item.MRImageFrameTypeSequence = Sequence([frame_type])
        if f.get("bval") is not None:
            weighting = Dataset()
            weighting.DiffusionBValue = float(f["bval"])
            weighting.DiffusionDirectionality = f.get("dirn", "DIRECTIONAL" if f["bval"] > 0 else "NONE")
            if f.get("bvec") is not None:
                gradient = Dataset()
                gradient.DiffusionGradientOrientation = [float(v) for v in f["bvec"]]
                weighting.DiffusionGradientDirectionSequence = Sequence([gradient])
            item.MRDiffusionSequence = Sequence([weighting])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = data.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return data


# ------------------------------------------------------------------------------------------- series
def _keys(n_volumes: int, slice_major: bool) -> list[tuple[int, int]]:
    """(volume, slice) of each frame in storage order."""
    if slice_major:
        return [(v, s) for s in range(SLICES) for v in range(n_volumes)]
    return [(v, s) for v in range(n_volumes) for s in range(SLICES)]


def fmri(manufacturer, slice_major=False, times=True, temporal=True, volumes=3):
    """One file, ``volumes`` volumes: TemporalPositionIndex (or, Canon's fMRI, 1 for every frame:
    ``temporal="canon"``), DimensionIndexValues (stack, time, in-stack), slice-timed acquisition times."""
    frames = []
    for v, s in _keys(volumes, slice_major):
        t = 1 if temporal == "canon" else v + 1
        frame = dict(slot=s, temporal=t if temporal else None, dim=[1, t, s + 1])
        if times:
            frame["acq"] = 2.0 * v + 0.4 * s
        frames.append(frame)
    return [(frames, dict(manufacturer=manufacturer, dims=CANON_DIMS))]


def multi_echo_magphase(manufacturer, slice_major=False):
    """One Philips-style file: 2 echoes x magnitude/phase, DimensionIndexValues (stack, in-stack, type)."""
    keys = [(e, p, s) for e in range(2) for p in "MP" for s in range(SLICES)]
    if slice_major:
        keys.sort(key=lambda k: k[2])
    frames = [dict(slot=s, te=(3.0, 6.0)[e], ftype=p, dim=[1, s + 1, 2 * e + "MP".index(p) + 1])
              for e, p, s in keys]
    return [(frames, dict(manufacturer=manufacturer, dims=PHILIPS_DIMS, scanning_sequence="GR"))]


def dwi(manufacturer, slice_major=False, philips_dims=False, repeat_b0=False):
    """One file: b=0 (DiffusionDirectionality NONE, no gradient), four DIRECTIONAL b=1000 volumes (and a
    second b=0 in the middle)."""
    encodings = [(0, None)] + [(1000, g) for g in GRADIENTS[:2]] + [(0, None)] * repeat_b0 + \
        [(1000, g) for g in GRADIENTS[2:]]
    frames = []
    for v, s in _keys(len(encodings), slice_major):
        b, g = encodings[v]
        dim = [1, s + 1, 1 + (b > 0), v + 1] if philips_dims else [1, v + 1, s + 1]
        frames.append(dict(slot=s, bval=b, bvec=g, acq=3.0 * v + 0.5 * s, dim=dim,
                           temporal=None if philips_dims else v + 1))
    return [(frames, dict(manufacturer=manufacturer, dims=PHILIPS_DWI_DIMS if philips_dims else CANON_DIMS))]


def xa_files(kind, times=True):
    """Siemens XA: one enhanced file per volume (fMRI, DWI) or per echo, InstanceNumber 1, 2, ..."""
    files = []
    if kind == "echo":
        for e, te in enumerate((2.0, 4.5, 7.0)):
            frames = [dict(slot=s, te=te, acq=0.3 * s) for s in range(SLICES)]
            files.append((frames, dict(instance=e + 1, top={"EchoNumbers": e + 1}, scanning_sequence="GR")))
        return files
    encodings = [(0, None)] + [(1000, g) for g in GRADIENTS] if kind == "dwi" else [(None, None)] * 3
    for v, (b, g) in enumerate(encodings):
        frames = [dict(slot=s, bval=b, bvec=g, acq=(3.0 * v + 0.5 * s) if times else None)
                  for s in range(SLICES)]
        top = {"AcquisitionDateTime": _datetime(3.0 * v if times else 0)}
        files.append((frames, dict(instance=v + 1, top=top)))
    return files


CASES = {
    # fMRI: Philips/Canon read InStackPositionNumber and sort by DimensionIndexValues whatever the storage
    "fmri-philips": fmri(PHILIPS),
    "fmri-philips-slice-major": fmri(PHILIPS, slice_major=True),
    "fmri-philips-no-times": fmri(PHILIPS, times=False, slice_major=True),
    "fmri-canon-no-temporal-index": fmri(CANON, temporal=False, times=False),
    "fmri-canon-temporal-index-1": fmri(CANON, temporal="canon"),  # Canon's invalid fMRI (dcm2niix kludge)
    "fmri-siemens-temporal-index": fmri(SIEMENS),
    "fmri-xa-files": xa_files("fmri"),
    "fmri-xa-files-no-times": xa_files("fmri", times=False),  # volumes by InstanceNumber
    # echoes and image parts
    "me-magphase-philips": multi_echo_magphase(PHILIPS),
    "me-magphase-philips-slice-major": multi_echo_magphase(PHILIPS, slice_major=True),
    "me-xa-files": xa_files("echo"),
    # DWI
    "dwi-siemens": dwi(SIEMENS),
    "dwi-philips-slice-major-b0-twice": dwi(PHILIPS, slice_major=True, philips_dims=True, repeat_b0=True),
    "dwi-canon": dwi(CANON),  # a b=0 first frame without gradient: the file still reads LPS (the fix)
    "dwi-canon-slice-major": dwi(CANON, slice_major=True),
    "dwi-xa-files": xa_files("dwi"),
}


def _write_case(folder: Path, files) -> list[np.ndarray]:
    return [write_enhanced(folder / f"IM{i:04d}", frames, seed=i, **kw)
            for i, (frames, kw) in enumerate(files)]


def _in_order(folder: Path) -> None:
    """Every 4D dcm2niix file has a 4D file of ours with the same volumes in the same order."""
    ref_files = sorted((folder / "dcm2niix").glob("*.nii"))
    our_files = sorted((folder / "medimb").rglob("*.nii.gz"))
    for ref_path in ref_files:
        ref = nib.as_closest_canonical(nib.load(ref_path))
        if ref.ndim < 4:
            continue
        ref_data = np.asarray(ref.dataobj, dtype=np.float64)
        found = False
        for path in our_files:
            ours = nib.as_closest_canonical(nib.load(path))
            if ours.shape == ref.shape and np.allclose(ours.affine, ref.affine, atol=1e-3):
                found = found or np.allclose(np.asarray(ours.dataobj, dtype=np.float64), ref_data)
        assert found, f"no output of ours holds the volumes of {ref_path.name} in its order"


@needs_dcm2niix
@pytest.mark.parametrize("case", sorted(CASES))
def test_enhanced_series_convert_like_dcm2niix(tmp_path, case):
    _write_case(tmp_path / "in", CASES[case])
    comparison = bench.compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert comparison.reference > 0
    assert comparison.missing == [], comparison.missing
    assert comparison.ours == comparison.reference
    _in_order(tmp_path / "cmp")


@needs_dcm2niix
def test_isotropic_trace_frame_converts_like_dcm2niix(tmp_path):
    """A Siemens/Canon ISOTROPIC (trace) frame at b=1000 stays in the 4D DWI with a zero gradient, as
    dcm2niix writes it (the benchmark cannot match a b > 0 volume without gradient: compared here)."""
    frames, kw = dwi(CANON)[0]
    frames = frames + [dict(slot=s, bval=1000, dirn="ISOTROPIC", acq=20 + s, temporal=6, dim=[1, 6, s + 1])
                       for s in range(SLICES)]
    _write_case(tmp_path / "in", [(frames, kw)])
    comparison = bench.compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert (comparison.reference, comparison.ours) == (6, 6)
    assert [m.split(" ")[0][-3:] for m in comparison.missing] == ["[5]"]  # the trace volume
    [ours] = list((tmp_path / "cmp" / "medimb").rglob("*.bval"))
    assert ours.read_text().split() == ["0", "1000", "1000", "1000", "1000", "1000"]
    assert ours.with_suffix(".bvec").read_text().split("\n")[0].split()[-1] == "0"
    _in_order(tmp_path / "cmp")


# ------------------------------------------------- where dcm2niix is wrong: checked against the truth
def _truth_4d(data: np.ndarray, keys: list[tuple[int, int]]) -> dict[int, np.ndarray]:
    """Stored frames grouped by volume, in slice order: {volume: (slices, rows, cols)}."""
    out: dict[int, list] = {}
    for frame, (v, s) in sorted(enumerate(keys), key=lambda x: x[1]):
        out.setdefault(v, []).append(data[frame])
    return {v: np.stack(sl) for v, sl in out.items()}


def _our_volumes(out: Path) -> list[np.ndarray]:
    """Our single 4D (or 3D) output as (volume, slices, rows, cols) in DICOM order: our grid stores rows
    top-down and slices along r x c, so the voxel (i, j, k) is column i, row j, slice k."""
    [path] = list(out.rglob("*.nii.gz"))
    data = np.asarray(nib.load(path).dataobj)
    data = data[..., None] if data.ndim == 3 else data
    return [np.transpose(data[..., t], (2, 1, 0)) for t in range(data.shape[3])]


@pytest.mark.parametrize("order,times", [("volume-major", True), ("slice-major", True), ("shuffled", True),
                                         ("volume-major", False), ("slice-major", False)])
def test_siemens_multi_volume_file_is_a_time_series(tmp_path, order, times):
    """A Siemens file with 3 volumes and no TemporalPositionIndex (dcm2niix: one 12-slice 3D volume of
    repeated positions): a 4D time series, volumes by acquisition time, else by frame number."""
    keys = _keys(3, order == "slice-major")
    if order == "shuffled":
        random.Random(3).shuffle(keys)  # (without times, frame order is the only volume order)
    frames = [dict(slot=s, acq=(2.0 * v + 0.4 * s) if times else None) for v, s in keys]
    data = write_enhanced(tmp_path / "in" / "IM1", frames)
    result = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    [row] = result.rows
    assert (row["kind"], row["shape"]) == ("timeseries", "5x6x4x3"), [i.to_dict() for i in result.issues]
    truth = _truth_4d(data, keys)
    for v, vol in enumerate(_our_volumes(tmp_path / "out")):
        np.testing.assert_array_equal(vol, truth[v])


@pytest.mark.parametrize("manufacturer", [SIEMENS, PHILIPS])
def test_shuffled_frames_are_sorted_along_the_normal(tmp_path, manufacturer):
    """Frames stored in no spatial order and without DimensionIndexValues (dcm2niix scrambles the slices)."""
    slots = random.Random(2).sample(range(5), 5)
    data = write_enhanced(tmp_path / "in" / "IM1", [dict(slot=s) for s in slots], manufacturer=manufacturer,
                          scanning_sequence="GR")
    convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    [vol] = _our_volumes(tmp_path / "out")
    np.testing.assert_array_equal(vol, data[np.argsort(slots)])


def test_two_stacks_in_one_file_are_two_volumes(tmp_path):
    """Two StackIDs in different planes, frames interleaved (dcm2niix refuses the file): one volume per
    stack, the smaller reported as ``split_orientation``."""
    frames = [dict(slot=s, ori=AXIAL, stack="1") for s in range(5)] + \
        [dict(slot=s, ori=SAGITTAL, origin=(5.0, -20.0, 30.0), stack="2") for s in range(4)]
    order = random.Random(1).sample(range(9), 9)
    write_enhanced(tmp_path / "in" / "IM1", [frames[i] for i in order], manufacturer=PHILIPS,
                   scanning_sequence="GR")
    result = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    assert sorted(row["shape"] for row in result.rows) == ["5x6x4", "5x6x5"]
    assert [i.reason for i in result.issues] == ["split_orientation"]


def test_canon_enhanced_file_carries_its_gradient_tag_on_every_frame(tmp_path):
    """dcm2niix reads a Canon enhanced file as one image: it carries DiffusionGradientOrientation when any
    frame does, so its gradients are LPS even though its first frame (b=0) has none."""
    frames, kw = dwi(CANON)[0]
    write_enhanced(tmp_path / "IM1", frames, **kw)
    header = read_header(str(tmp_path / "IM1"), str(tmp_path))
    assert all(f.diffusion is not None and f.diffusion.gradient_tag for f in header.frames)
    b0 = header.frames[0].diffusion
    assert b0.bvalue == 0 and b0.scanner is not None
