"""A tiny classic MR DICOM series written with pydicom (one file per slice and phase)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom_series(folder, *, patient_id="PID-0001", patient_name="DOE^JANE", birth_date="19700101",
                       accession="ACC0001", study_uid=None, series_uid=None, series_number=1,
                       description="t1 axial", shape=(4, 6, 5), spacing=(0.8, 0.7, 1.5),
                       orientation=(1, 0, 0, 0, 1, 0), origin=(-10.0, -20.0, 5.0), phases=1,
                       phase_tag="TemporalPositionIdentifier", image_type=("ORIGINAL", "PRIMARY", "M"),
                       slope=1.0, intercept=0.0, acq_time0=100000.0, seed=0, names=None,
                       frame_uid=None):
    """Write a tiny classic MR series, one file per slice (and phase), and return its volume.

    ``shape`` is ``(rows, cols, slices)``; ``spacing`` ``(row spacing, column spacing, slice step)``
    in mm. Slices are written in shuffled order with shuffled InstanceNumbers and meaningless file
    names. Returns ``data`` (phases, slices, rows, cols) uint16: slice k of phase p is at
    ``origin + k * step * normal`` (LPS), so tests can check geometry and sorting. ``frame_uid``: the
    FrameOfReferenceUID (left out when None, as in a few old exports; real scanners always write it).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    rows, cols, n = shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    o = np.asarray(orientation, float)
    normal = np.cross(o[:3], o[3:])
    data = rng.integers(0, 4000, size=(phases, n, rows, cols), dtype=np.uint16)
    items = [(p, k) for p in range(phases) for k in range(n)]
    order = rng.permutation(len(items))
    for idx, item_i in enumerate(order):
        p, k = items[item_i]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.ImageType = list(image_type)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient_name, patient_id, birth_date
        ds.AccessionNumber = accession
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if frame_uid is not None:
            ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate, ds.StudyTime = "20240102", "101010"
        ds.SeriesNumber, ds.SeriesDescription = series_number, description
        ds.InstanceNumber = int(rng.integers(1, 10_000))  # deliberately meaningless
        ds.Manufacturer, ds.MagneticFieldStrength = "SynthVendor", 1.5
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = 5.2, 2.1, 12
        ds.ImageOrientationPatient = [float(v) for v in o]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.SliceThickness = spacing[2]
        t = int(acq_time0) // 10000 * 3600 + int(acq_time0) // 100 % 100 * 60 + int(acq_time0) % 100 + 60 * p
        ds.AcquisitionTime = f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}.000"  # acq_time0 is HHMMSS
        if phases > 1 and phase_tag == "TemporalPositionIdentifier":
            ds.TemporalPositionIdentifier = p + 1
            ds.NumberOfTemporalPositions = phases
        if slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = data[p, k].tobytes()
        name = names[idx] if names else f"IM{rng.integers(1e9):09d}"
        ds.save_as(folder / name, enforce_file_format=True)
    return data


def dicom_files(folder) -> list[Path]:
    """Files below ``folder`` (sorted) with the DICOM preamble's ``DICM`` marker; a DICOMDIR is left out."""
    out = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and p.name != "DICOMDIR":
            with open(p, "rb") as fh:
                if fh.read(132)[128:] == b"DICM":
                    out.append(p)
    return out


def add_enhanced_geometry(ds, frame_slots, origin=(-20.0, 10.0, 30.0), step=1.2) -> None:
    """Give an enhanced (multi-frame) dataset such as pydicom's ``emri_small*`` files, which carry no geometry, an
    oblique plane (0.2 rad about the feet-head axis), pixel measures (0.9 x 0.8 mm, ``step`` mm slices) and
    per-frame positions: frame ``f`` lies at slice slot ``frame_slots[f]`` (with its in-stack position number)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ori = [np.cos(0.2), np.sin(0.2), 0.0, 0.0, 0.0, -1.0]
    normal = np.cross(ori[:3], ori[3:])
    shared, plane, measures = Dataset(), Dataset(), Dataset()
    plane.ImageOrientationPatient = ori
    measures.PixelSpacing, measures.SliceThickness, measures.SpacingBetweenSlices = [0.9, 0.8], step, step
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([plane]), Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for slot in frame_slots:
        item, position, content = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in np.asarray(origin) + slot * step * normal]
        content.InStackPositionNumber, content.StackID = slot + 1, "1"
        item.PlanePositionSequence, item.FrameContentSequence = Sequence([position]), Sequence([content])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
