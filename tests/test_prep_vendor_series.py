"""Vendor series kinds found in the public dcm2niix QA corpora, against dcm2niix
(benchmarks/prep_vs_dcm2niix.py: same voxels in RAS+, affine within 1e-3 mm).

- Siemens XA "interoperability" ASL series (dcm_qa_xa30i, series 19001/20001) hold grey perfusion
  images and colour-map (ImageType COLOR, LUT; RGB) copies at the same positions: dcm2niix writes
  two files (``_e1`` and ``_e1a``); both stacks are converted here, the colour one as RGB24.
- Siemens XA MPR scouts (dcm_qa_xa30i, series 2001-4001: DERIVED MPR, one image per oblique plane):
  dcm2niix writes each image on its own (``_i2001001``, ...), as the localizer rule here does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.paths import load_benchmark
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

bench = load_benchmark("prep_vs_dcm2niix")
needs_dcm2niix = pytest.mark.skipif(bench.dcm2niix_exe() is None, reason="dcm2niix not installed")


def _image(folder, name, series, study, instance, orientation, position, *, image_type, colour=False,
           rows=8, cols=8, rng, **extra):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    ds.Manufacturer, ds.ImageType = "SIEMENS", list(image_type)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "X", study, series, 19
    ds.SeriesDescription, ds.StudyDate, ds.StudyTime = "asl", "20240101", "101010"
    ds.InstanceNumber, ds.AcquisitionTime, ds.PatientPosition = instance, "101010", "HFS"
    ds.ImageOrientationPatient = [float(x) for x in orientation]
    ds.ImagePositionPatient = [float(x) for x in position]
    ds.PixelSpacing, ds.SpacingBetweenSlices = [2.0, 2.0], 3.0
    ds.Rows, ds.Columns = rows, cols
    for key, value in extra.items():
        setattr(ds, key, value)
    if colour:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 3000, (rows, cols), dtype=np.uint16).tobytes()
    ds.save_as(folder / name, enforce_file_format=True)


def _grey_and_colour_series(folder, n=6):
    """Grey perfusion images, then their colour-map copies (no EchoTime/TR, as in dcm_qa_xa30i's
    `19001_asl_2d_tra_e1a.json`), one series, the same positions and acquisition time."""
    folder.mkdir(parents=True)
    rng, study, series = np.random.default_rng(0), generate_uid(), generate_uid()
    for k in range(n):
        _image(folder, f"g{k}.dcm", series, study, k + 1, (1, 0, 0, 0, 1, 0), (-10, -20, 5 + 3 * k),
               image_type=("DERIVED", "PRIMARY", "ASL", "SUB"), rng=rng, EchoNumbers=1, EchoTime=11.0,
               RepetitionTime=4800.0, ScanningSequence="EP", SliceThickness=6.0)
    for k in range(n):
        _image(folder, f"c{k}.dcm", series, study, n + k + 1, (1, 0, 0, 0, 1, 0), (-10, -20, 5 + 3 * k),
               image_type=("DERIVED", "PRIMARY", "ASL", "SUB", "COLOR", "LUT"), colour=True, rng=rng, EchoNumbers=1)


def test_colour_copies_in_a_grey_series_are_a_stack_of_their_own(tmp_path):
    from data_prep.convert import convert_archive

    _grey_and_colour_series(tmp_path / "in")
    res = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    assert sorted(r["shape"] for r in res.rows) == ["8x8x6", "8x8x6"]
    assert [(i.reason, i.action) for i in res.issues] == [("split_orientation", "split")]
    assert "another pixel format (colour)" in res.issues[0].detail


@needs_dcm2niix
def test_grey_and_colour_asl_series_match_dcm2niix(tmp_path):
    _grey_and_colour_series(tmp_path / "in")
    result = bench.compare(tmp_path / "in", tmp_path / "work", workers=1)
    assert result.reference == 2 and result.missing == [] and result.ours == 2
    written = sorted(p.name for p in (tmp_path / "work" / "dcm2niix").glob("*.nii"))
    assert len(written) == 2 and written[1].endswith("a.nii")  # dcm2niix: two files, the second `a`


# dcm_qa_xa30i Ref/2001_AAHead_Scout_i200100N.json: ImageOrientationPatientDICOM of the four MPR images
MPR_PLANES = [(-0.0770114, 0.867115, 0.492119, -0.106023, 0.483663, -0.868809),
              (0.540978, 0.782409, 0.308512, -0.0679903, 0.406307, -0.911204),
              (-0.10453, 0.970332, 0.218014, -0.0790265, 0.210418, -0.974412),
              (-0.660251, 0.666386, 0.346408, -0.0679903, 0.406307, -0.911204)]


@needs_dcm2niix
def test_mpr_scout_images_in_oblique_planes_match_dcm2niix(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng, study, series = np.random.default_rng(1), generate_uid(), generate_uid()
    for k, iop in enumerate(MPR_PLANES):
        r, c = np.array(iop[:3]), np.array(iop[3:])
        r /= np.linalg.norm(r)
        c = c - r * (r @ c)
        c /= np.linalg.norm(c)
        _image(folder, f"m{k}.dcm", series, study, 2001001 + k, (*r, *c), (-30 + k, -40, 20), rows=10, cols=12,
               image_type=("DERIVED", "PRIMARY", "MPR", "NORM", "DIS3D", "MFSPLIT"), rng=rng,
               ScanningSequence="GR", SliceThickness=1.6)
    result = bench.compare(folder, tmp_path / "work", workers=1)
    assert result.reference == 4 and result.missing == [] and result.ours == 4
    manifest = (tmp_path / "work" / "medimb" / "manifest.csv").read_text()
    assert manifest.count("localizer") == 4
    report = json.loads((tmp_path / "work" / "medimb" / "report.json").read_text())
    assert report["issues"] == []
