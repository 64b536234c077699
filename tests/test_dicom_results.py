"""medimb export-dicom without a server: maps as Parametric Maps and regions as Segmentations on the source frames.

The "heatmap" is the converted scan itself scaled to [0, 1], so every result frame can be checked against
the *source DICOM pixel data* of the instance it references (not against our own geometry code): axial,
sagittal and oblique series, converted by medimb-prep convert as a user would.
"""

from __future__ import annotations

import json
import stat

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402

from data_prep.convert import convert_archive  # noqa: E402
from helpers.dicom import add_enhanced_geometry  # noqa: E402
from medimb.cli import main  # noqa: E402
from medimb.evaluation.predictions_csv import SplitPredictions, format_predictions  # noqa: E402
from medimb.errors import UserError  # noqa: E402
from medimb.export.overlays import read_overlay_folder  # noqa: E402
from medimb.export.results import export_results, folder_locator  # noqa: E402

FOR_UID = "1.2.826.0.1.3680043.8.498.1"
COS, SIN = np.cos(0.3), np.sin(0.3)
ORIENTATIONS = {
    "axial": (1, 0, 0, 0, 1, 0),
    "sagittal": (0, 1, 0, 0, 0, -1),
    # rotated 0.3 rad about the patient's y axis: a tilted plane with a non-trivial normal
    "oblique": (COS, 0, -SIN, 0, 1, 0),
}


def _series(folder, dicom_series, orientation, frame_of_reference=True, phases=1, seed=0):
    """A tiny MR series (rows 6, cols 5, 4 slices) with a frame of reference; returns ``{sop uid: pixels}``."""
    dicom_series(folder, shape=(6, 5, 4), spacing=(0.8, 0.7, 1.5), orientation=orientation, phases=phases,
                 seed=seed, origin=(-10.0, -20.0, 5.0))
    pixels = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        if frame_of_reference:
            ds.FrameOfReferenceUID = FOR_UID
            ds.save_as(path)
        pixels[str(ds.SOPInstanceUID)] = ds.pixel_array.astype(np.float64)
    return pixels


def _explain_folder(folder, scan, probability=0.83, threshold=0.146, heat_fn=None, proba=None, classes=None):
    """An explain output folder for the converted ``scan``: heatmap = scan / max (or ``heat_fn``), region
    heat >= 0.5, both with the scan's header as explain writes them (explain's own writers and folder are in
    the round trip, tests/test_pacs_roundtrip.py; here no torch is loaded); returns ``(case, heat (I, J, K))``."""
    case = scan.name.removesuffix(".nii.gz")
    image = nib.load(scan)
    volume = np.asarray(image.dataobj, dtype=np.float64)
    heat = (volume / volume.max() if heat_fn is None else heat_fn(volume)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((f"{case}_coam_on-t1.nii.gz", heat),
                        (f"{case}_coam_on-t1_label.nii.gz", (heat >= 0.5).astype(np.uint8))):
        header = image.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)
        nib.save(nib.Nifti1Image(array, image.affine, header), folder / name)
    proba = proba or [1 - probability, probability]
    (folder / "predictions.csv").write_text(format_predictions(
        [SplitPredictions("test", [case], None, [proba], threshold)], classes or ["benign", "malignant"]))
    (folder / "explain.json").write_text(json.dumps({
        "methods": ["coam"], "threshold": 0.5,
        "files": {"heatmap": "<case>_<method>_on-t1.nii.gz", "label": "<case>_<method>_on-t1_label.nii.gz"}}))
    return case, heat


def _converted(tmp_path, dicom_series, orientation):
    archive = tmp_path / "archive"
    pixels = _series(archive / "s1", dicom_series, orientation)
    convert_archive(str(archive), str(tmp_path / "converted"), progress=False)
    scans = sorted((tmp_path / "converted").rglob("*.nii.gz"))
    assert len(scans) == 1
    return archive / "s1", scans[0], pixels


def _frames_by_source(obj):
    """``[(frame index, referenced SOP Instance UID, position (3,))]`` of a multi-frame result."""
    out = []
    for n, group in enumerate(obj.PerFrameFunctionalGroupsSequence):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out.append((n, str(ref), [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]))
    return out


@pytest.mark.parametrize("plane", sorted(ORIENTATIONS))
def test_results_sit_on_the_source_slices(tmp_path, dicom_series, plane):
    source_dir, scan, pixels = _converted(tmp_path, dicom_series, ORIENTATIONS[plane])
    case, _ = _explain_folder(tmp_path / "overlays", scan)
    written = export_results(read_overlay_folder(tmp_path / "overlays"), folder_locator(source_dir),
                             tmp_path / "out")
    assert [(w.kind, w.frames) for w in written] == [("map", 4), ("region", 4), ("report", 0)]
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in source_dir.iterdir())}
    peak = max(p.max() for p in pixels.values())

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_map.dcm"))
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_region.dcm"))
    first = next(iter(sources.values()))
    for obj in (pm, seg):
        assert obj.PatientID == first.PatientID and obj.StudyInstanceUID == first.StudyInstanceUID
        assert obj.FrameOfReferenceUID == FOR_UID
        refs = obj.ReferencedSeriesSequence[0]
        assert refs.SeriesInstanceUID == first.SeriesInstanceUID
        assert {str(r.ReferencedSOPInstanceUID) for r in refs.ReferencedInstanceSequence} == set(sources)
        shared = obj.SharedFunctionalGroupsSequence[0]
        np.testing.assert_allclose([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                                   [float(v) for v in first.ImageOrientationPatient], atol=1e-6)
        measures = shared.PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in first.PixelSpacing]
        frames = _frames_by_source(obj)
        assert sorted(ref for _, ref, _ in frames) == sorted(sources)  # one frame per source slice
        for n, ref, position in frames:
            np.testing.assert_allclose(position, [float(v) for v in sources[ref].ImagePositionPatient], atol=1e-4)
            expected = (pixels[ref] / peak).astype(np.float32)
            if obj is pm:  # float32 frames: the map's own values, bit for bit
                np.testing.assert_array_equal(pm.pixel_array[n], expected)
            else:
                np.testing.assert_array_equal(seg.pixel_array[n], (expected >= 0.5).astype(np.uint8))
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1" and mapping.RealWorldValueSlope == 1.0
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeMeaning == "Saliency"
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 1
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medimb coam" and algorithm.AlgorithmVersion
    for obj in (pm, seg):
        assert "malignant p=0.83 thr 0.146" in obj.SeriesDescription and len(obj.SeriesDescription) <= 64
        assert "malignant" in obj.ContentDescription
    # the prediction, machine-readable: a TID 1500 Structured Report referencing the region and the map
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_report.dcm"))
    assert sr.PatientID == first.PatientID and sr.StudyInstanceUID == first.StudyInstanceUID
    [classification] = sr.content.get_image_measurement_groups()
    assert classification.finding_type.meaning == "malignant"
    assert {m.name.meaning: m.value for m in classification.get_measurements()} == {
        "Probability": 0.83, "Threshold Value": 0.146}
    [region] = sr.content.get_volumetric_roi_measurement_groups()
    assert region.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    voxels = sum(int(((p / peak).astype(np.float32) >= 0.5).sum()) for p in pixels.values())
    volumes = {m.name.meaning: m.value for m in region.get_measurements()}
    assert volumes["Volume"] == pytest.approx(voxels * 0.8 * 0.7 * 1.5, rel=1e-6) and volumes["Threshold Value"] == 0.5


def test_rerun_keeps_uids_and_skips_new_content_gets_new_ones(tmp_path, dicom_series):
    source_dir, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["axial"])
    case, _ = _explain_folder(tmp_path / "overlays", scan)
    overlays = read_overlay_folder(tmp_path / "overlays")
    first = export_results(overlays, folder_locator(source_dir), tmp_path / "out")
    uids = {w.kind: pydicom.dcmread(tmp_path / "out" / w.path).SOPInstanceUID for w in first}
    again = export_results(overlays, folder_locator(source_dir), tmp_path / "out")
    assert all(w.skipped for w in again) and not any(w.skipped for w in first)
    # same result into a fresh folder: the same UIDs (the server keeps one copy)
    # a run killed after the map: the next one writes only what is missing
    (tmp_path / "out" / case / f"{case}_coam_region.dcm").unlink()
    resumed = export_results(overlays, folder_locator(source_dir), tmp_path / "out")
    assert [w.kind for w in resumed if not w.skipped] == ["region"]
    fresh = export_results(overlays, folder_locator(source_dir), tmp_path / "out2")
    assert {w.kind: pydicom.dcmread(tmp_path / "out2" / w.path).SOPInstanceUID for w in fresh} == uids
    # another map: new UIDs, written over the old files
    _explain_folder(tmp_path / "overlays2", scan, heat_fn=lambda v: 1 - v / v.max())
    changed = export_results(read_overlay_folder(tmp_path / "overlays2"), folder_locator(source_dir),
                             tmp_path / "out")
    assert not any(w.skipped for w in changed)
    new = {w.kind: pydicom.dcmread(tmp_path / "out" / w.path).SOPInstanceUID for w in changed}
    assert all(new[kind] != uids[kind] for kind in ("map", "region", "report"))
    # PHI: owner-only files and folders
    for w in changed:
        assert stat.S_IMODE((tmp_path / "out" / w.path).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / case).stat().st_mode) == 0o700


def test_a_map_from_another_series_is_refused(tmp_path, dicom_series):
    _, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["axial"])
    _explain_folder(tmp_path / "overlays", scan)
    other = tmp_path / "other"
    _series(other, dicom_series, ORIENTATIONS["sagittal"], seed=1)
    with pytest.raises(UserError, match="does not match the source series|outside the map's grid"):
        export_results(read_overlay_folder(tmp_path / "overlays"), folder_locator(other), tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.dcm"))


def test_bad_sources_are_one_line_errors(tmp_path, dicom_series, capsys):
    source_dir, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["axial"])
    _explain_folder(tmp_path / "overlays", scan)
    no_for = tmp_path / "no_for"
    _series(no_for, dicom_series, ORIENTATIONS["axial"], frame_of_reference=False)
    phases = tmp_path / "phases"
    _series(phases, dicom_series, ORIENTATIONS["axial"], phases=2)
    multiframe = tmp_path / "multiframe"
    multiframe.mkdir()
    ds = pydicom.dcmread(next(source_dir.iterdir()))
    ds.NumberOfFrames = 2
    ds.save_as(multiframe / "enhanced.dcm")
    base = ["export-dicom", "--overlays", str(tmp_path / "overlays"), "--out", str(tmp_path / "out"), "--no-progress"]
    cases = [(["--source-series", str(no_for)], "no FrameOfReferenceUID"),
             (["--source-series", str(multiframe)], "has no plane position, orientation or pixel spacing for frame 1"),
             (["--source-series", str(phases)], "share a slice position"),
             (["--source-series", str(source_dir), "--methods", "gradcam"], "--methods gradcam: not in"),
             (["--link-table", str(tmp_path / "x.csv")], "give --link-table and --archive")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medimb export-dicom: error:") and message in err and "\n" not in err, err
    assert main(["export-dicom", "--overlays", str(tmp_path), "--out", str(tmp_path / "o"), "--source-series",
                 str(source_dir)]) == 2
    assert "not a medimb explain output folder" in capsys.readouterr().err


def test_cli_writes_the_results_of_one_case(tmp_path, dicom_series, capsys):
    source_dir, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["oblique"])
    case, _ = _explain_folder(tmp_path / "overlays", scan)
    assert main(["export-dicom", "--overlays", str(tmp_path / "overlays"), "--source-series", str(source_dir),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "3 DICOM file(s) written" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert [r["path"] for r in summary["results"]] == [f"{case}/{case}_coam_map.dcm", f"{case}/{case}_coam_region.dcm",
                                                       f"{case}/{case}_report.dcm"]
    assert stat.S_IMODE((tmp_path / "out" / "export.json").stat().st_mode) == 0o600


def _link_rows(scan, converted, source_dir):
    """The link-table rows medimb-prep convert --link-table writes for a one-series scan."""
    rows = []
    for k, ds in enumerate(sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in source_dir.iterdir()),
                                  key=lambda d: float(d.ImagePositionPatient[2]))):
        rows.append({"subject": "sub-x", "session": "ses-1", "series": "s001", "kind": "image",
                     "output": scan.relative_to(converted).as_posix(), "volume": 0, "slice": k,
                     "study_uid": ds.StudyInstanceUID, "series_uid": ds.SeriesInstanceUID,
                     "sop_uid": ds.SOPInstanceUID, "frame": ""})
    return rows


def test_link_table_finds_the_instances_in_any_archive_layout(tmp_path, dicom_series, capsys, monkeypatch):
    from data_prep.pacs.links import write_link_table
    from data_prep.pacs.pull import instance_path
    from data_prep.pacs.server import InstanceRef

    source_dir, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["oblique"])
    _series(tmp_path / "archive" / "s2", dicom_series, ORIENTATIONS["sagittal"], seed=1)  # another series
    (tmp_path / "archive" / "README.txt").write_text("not DICOM")
    case, _ = _explain_folder(tmp_path / "overlays", scan)
    links = tmp_path / "private" / "links.csv"
    write_link_table(links, _link_rows(scan, tmp_path / "converted", source_dir))
    wanted = {str(pydicom.dcmread(p).SOPInstanceUID) for p in source_dir.iterdir()}
    base = ["export-dicom", "--overlays", str(tmp_path / "overlays"), "--link-table", str(links), "--no-progress"]
    # any folder layout: found by reading the archive's headers
    assert main([*base, "--archive", str(tmp_path / "archive"), "--out", str(tmp_path / "out")]) == 0
    pm = pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_map.dcm")
    assert {r.ReferencedSOPInstanceUID for r in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == wanted
    # medimb-prep pull's layout: found at their paths, no header walk
    pulled = tmp_path / "pulled"
    for p in source_dir.iterdir():
        ds = pydicom.dcmread(p)
        target = instance_path(pulled, InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    monkeypatch.setattr("medimb.export.sources.index_archive", lambda *a: pytest.fail("walked the archive"))
    assert main([*base, "--archive", str(pulled), "--out", str(tmp_path / "out2")]) == 0
    assert pydicom.dcmread(tmp_path / "out2" / case / f"{case}_coam_map.dcm").SOPInstanceUID == pm.SOPInstanceUID
    capsys.readouterr()
    monkeypatch.undo()
    # an archive without them, a case the table does not know
    assert main([*base, "--archive", str(tmp_path / "overlays"), "--out", str(tmp_path / "out3")]) == 2
    assert "4 of its 4 source instances are not in --archive" in capsys.readouterr().err
    write_link_table(tmp_path / "other.csv", [dict(r, output="sub-x/ses-1/other.nii.gz")
                                               for r in _link_rows(scan, tmp_path / "converted", source_dir)])
    assert main([*base[:4], str(tmp_path / "other.csv"), "--archive", str(pulled), "--out", str(tmp_path / "o4")]) == 2
    assert f"case {case}: its scan {scan.name} is not in the link table" in capsys.readouterr().err


def _enhanced(folder, slots):
    """pydicom's enhanced MR test file (10 frames of 64 x 64) made a placeable volume: an oblique plane, pixel
    measures, frame ``f`` at slice slot ``slots[f]``, a frame of reference and a patient (as in
    tests/test_prep_dcm2niix.py); returns ``{frame number: pixels}``."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))
    add_enhanced_geometry(ds, slots)
    ds.FrameOfReferenceUID, ds.PatientID, ds.PatientName = FOR_UID, "PID-ENH", "DOE^ENH"
    folder.mkdir(parents=True)
    ds.save_as(folder / "enhanced.dcm")
    return {n + 1: frame.astype(np.float64) for n, frame in enumerate(ds.pixel_array)}, ds


def test_multiframe_sources_frame_by_frame(tmp_path, capsys):
    from data_prep.pacs.links import write_link_table

    pixels, source = _enhanced(tmp_path / "archive" / "enh", [3, 1, 4, 0, 9, 2, 8, 5, 7, 6])
    convert_archive(str(tmp_path / "archive"), str(tmp_path / "converted"), progress=False)
    [scan] = sorted((tmp_path / "converted").rglob("*.nii.gz"))
    case, _ = _explain_folder(tmp_path / "overlays", scan)
    rows = [{"subject": "sub-x", "session": "ses-1", "series": "s", "kind": "image", "volume": 0, "slice": k,
             "output": scan.relative_to(tmp_path / "converted").as_posix(), "study_uid": source.StudyInstanceUID,
             "series_uid": source.SeriesInstanceUID, "sop_uid": source.SOPInstanceUID, "frame": k + 1}
            for k in range(10)]
    write_link_table(tmp_path / "links.csv", rows)
    assert main(["export-dicom", "--overlays", str(tmp_path / "overlays"), "--link-table", str(tmp_path / "links.csv"),
                 "--archive", str(tmp_path / "archive"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    peak = max(p.max() for p in pixels.values())
    positions = {n: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
                 for n, item in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)}
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_map.dcm"))
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_region.dcm"))
    for obj in (pm, seg):
        assert obj.FrameOfReferenceUID == FOR_UID and obj.PatientID == "PID-ENH"
        assert obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        seen = set()
        for n, group in enumerate(obj.PerFrameFunctionalGroupsSequence):
            ref = group.DerivationImageSequence[0].SourceImageSequence[0]
            number = int(ref.ReferencedFrameNumber)
            seen.add(number)
            np.testing.assert_allclose([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
                                       positions[number], atol=1e-4)
            expected = (pixels[number] / peak).astype(np.float32)
            got = obj.pixel_array[n]
            np.testing.assert_array_equal(got, expected if obj is pm else (expected >= 0.5).astype(np.uint8))
        assert seen == set(range(1, 11))
    # the same frames found without a link table
    assert main(["export-dicom", "--overlays", str(tmp_path / "overlays"), "--source-series",
                 str(tmp_path / "archive" / "enh"), "--out", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert pydicom.dcmread(tmp_path / "out2" / case / f"{case}_coam_map.dcm").SOPInstanceUID == pm.SOPInstanceUID


def test_multiclass_prediction_has_no_threshold(tmp_path, dicom_series):
    source_dir, scan, _ = _converted(tmp_path, dicom_series, ORIENTATIONS["axial"])
    case, _ = _explain_folder(tmp_path / "overlays", scan, threshold=None, proba=[0.2, 0.5, 0.3],
                              classes=["normal", "benign", "malignant"])
    export_results(read_overlay_folder(tmp_path / "overlays"), folder_locator(source_dir), tmp_path / "out")
    pm = pydicom.dcmread(tmp_path / "out" / case / f"{case}_coam_map.dcm")
    assert pm.SeriesDescription == "medimb coam map: benign p=0.50"  # the argmax, no decision threshold
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(tmp_path / "out" / case / f"{case}_report.dcm"))
    [classification] = sr.content.get_image_measurement_groups()
    assert classification.finding_type.meaning == "benign"
    assert {m.name.meaning: m.value for m in classification.get_measurements()} == {"Probability": 0.5}
