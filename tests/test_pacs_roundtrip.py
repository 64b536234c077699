"""The hospital round trip against a real Orthanc: upload -> pull -> convert -> explain -> export -> push -> read back.

A 2-case synthetic DCE archive (case 0: every phase in one series, not oblique; case 1: one series per phase,
oblique, seed 4) is uploaded to Orthanc, pulled with ``medimb-prep pull`` (DICOMweb), converted with
``--link-table``, predicted and explained (``medimb predict``) by a tiny untrained 3-channel network (the plumbing is under test, not the model),
exported (map, region, report) with ``medimb export-dicom --push`` (STOW-RS) and pushed again by C-STORE. What Orthanc then holds
is read back by WADO-RS and checked against the *source series as Orthanc holds it*.
"""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402

from data_prep.cli import main as prep_main  # noqa: E402
from medimb.cli import main  # noqa: E402

pytestmark = pytest.mark.slow  # about 40 s on the 2-core VM (synth, pull, convert, a torch explain, export, push)

PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def _checkpoint(path):
    import torch

    from medimb.data.transforms import Preprocessing
    from medimb.networks import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=3, num_classes=2, head="cmsl", widths=(4, 8), depths=(1, 1))
    pre = dict(Preprocessing(spatial_size=(16, 16, 8), pixdim=(2.0, 2.0, 3.0), intensity="zscore").to_dict(),
               in_channels=3)
    return save_checkpoint(path, model, preprocessing=pre, class_names=["benign", "malignant"], method="test",
                           epoch=0)


def _server(orthanc):
    from data_prep.pacs.server import open_server, parse_server

    return open_server(parse_server(orthanc.dicomweb_server, orthanc.credentials))


def _fetch(orthanc, study_uid, series_uid):
    got = []
    with _server(orthanc) as server:
        server.retrieve(study_uid, series_uid, on_instance=got.append)
    return got


@pytest.fixture(scope="module")
def roundtrip(orthanc, tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    creds = root / "pacs.credentials"
    creds.write_text(f"{orthanc.user}:{orthanc.password}\n")
    creds.chmod(0o600)
    assert prep_main(["synth", str(root / "syn"), "--cases", "2", "--positive-fraction", "0.5", "--seed", "4",
                      "--matrix", "20", "--slices", "8", "--post-phases", "2"]) == 0
    before = set(orthanc.study_uids())
    orthanc.upload_folder(root / "syn" / "archive")
    studies = sorted(set(orthanc.study_uids()) - before)
    assert len(studies) == 2
    assert prep_main(["pull", orthanc.dicomweb_server, str(root / "archive"), "--study", *studies,
                      "--credentials-file", str(creds), "--no-progress"]) == 0
    links = root / "private" / "links.csv"
    assert prep_main(["convert", str(root / "archive"), str(root / "converted"), "--link-table", str(links),
                      "--no-progress"]) == 0
    assert main(["predict", "--checkpoint", str(_checkpoint(root / "model.pt")), "--input", str(root / "converted"),
                 "--out", str(root / "overlays"), "--methods", "coam", "--no-previews", "--no-progress"]) == 0
    assert main(["export-dicom", "--overlays", str(root / "overlays"), "--archive", str(root / "archive"),
                 "--link-table", str(links), "--out", str(root / "results"), "--push", orthanc.dicomweb_server,
                 "--credentials-file", str(creds), "--no-progress"]) == 0
    # the same results again, by C-STORE this time: nothing new may appear on the server
    assert main(["export-dicom", "--overlays", str(root / "overlays"), "--archive", str(root / "archive"),
                 "--link-table", str(links), "--out", str(root / "results"), "--push", orthanc.dimse_server(),
                 "--no-progress"]) == 0
    return root, studies, links


def _linked_cases(links, overlays) -> dict:
    """``{case: data_prep.pacs.links.LinkedOutput}``: each case's first input (explain.json ``source``, the
    pre-contrast phase) in the link table."""
    from data_prep.pacs.links import read_link_table

    by_name = {os.path.basename(out): item for out, item in read_link_table(links).items()}
    summary = json.loads((overlays / "explain.json").read_text())
    return {c["case"]: by_name[c["source"]] for c in summary["cases"]}


def _results_on_server(orthanc, study_uid):
    """``{sop class: [dataset]}`` of the result objects Orthanc holds for a study (WADO-RS)."""
    with _server(orthanc) as server:
        refs = server.find_instances(study_uid)
    out: dict[str, list] = {}
    for series in sorted({r.series_uid for r in refs if r.sop_class_uid in (PM_CLASS, SEG_CLASS, SR_CLASS)}):
        for ds in _fetch(orthanc, study_uid, series):
            out.setdefault(str(ds.SOPClassUID), []).append(ds)
    return out


def test_results_come_back_from_the_server_on_the_source_series(roundtrip, orthanc):
    root, studies, links = roundtrip
    overlays = root / "overlays"
    with open(overlays / "predictions.csv", newline="") as fh:
        rows = {row["case"]: row for row in csv.DictReader(fh)}
    cases = sorted(rows)
    linked = _linked_cases(links, overlays)
    assert sorted(linked[c].study_uid for c in cases) == studies
    for case in cases:
        study, link = linked[case].study_uid, linked[case]
        results = _results_on_server(orthanc, study)
        # one map, one region and one report per study (one case each), however often they were pushed
        assert {k: len(v) for k, v in results.items()} == {PM_CLASS: 1, SEG_CLASS: 1, SR_CLASS: 1}
        pm = hd.pm.ParametricMap.from_dataset(results[PM_CLASS][0])
        seg = hd.seg.Segmentation.from_dataset(results[SEG_CLASS][0])
        source_series = pm.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert source_series == link.series_uids[0]  # the pre-contrast phase's series (or the one DCE series)
        source = {str(ds.SOPInstanceUID): ds for ds in _fetch(orthanc, study, source_series)}
        for obj in (pm, seg):
            refs = {str(r.ReferencedSOPInstanceUID) for r in obj.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
            assert refs == set(link.sop_uids(0)) and refs <= set(source)
            assert obj.FrameOfReferenceUID == next(iter(source.values())).FrameOfReferenceUID
            assert obj.PatientID == next(iter(source.values())).PatientID
        heat = nib.load(overlays / f"{case}_coam_on-phase-01.nii.gz")
        region = nib.load(overlays / f"{case}_coam_on-phase-01_label.nii.gz")
        phase = {k: v for k, v in source.items() if k in refs}  # case 0's series holds every phase
        _check_frames(pm, phase, np.asarray(heat.dataobj, dtype=np.float32), heat.affine)
        _check_frames(seg, phase, np.asarray(region.dataobj, dtype=np.uint8), region.affine)
        row = rows[case]
        said = f"{row['predicted_name']} p={float(row['prob_' + row['predicted_name']]):.2f} thr {float(row['threshold']):.3g}"
        assert said in pm.SeriesDescription and said in seg.SeriesDescription, (said, pm.SeriesDescription)
        sr = hd.sr.Comprehensive3DSR.from_dataset(results[SR_CLASS][0])
        [classification] = sr.content.get_image_measurement_groups()
        assert classification.finding_type.meaning == row["predicted_name"]
        assert {m.name.meaning: m.value for m in classification.get_measurements()} == {
            "Probability": float(row["prob_" + row["predicted_name"]]), "Threshold Value": float(row["threshold"])}
        [region_group] = sr.content.get_volumetric_roi_measurement_groups()
        assert region_group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID


def _check_frames(obj, source, volume, affine):
    """Every frame: the referenced source instance's position, the series' orientation and spacing, and the
    NIfTI's values at the frame's pixel centres (found with nibabel from the frame's own geometry)."""
    shared = obj.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    frames = obj.pixel_array
    assert frames.shape[0] == len(source)
    for n, group in enumerate(obj.PerFrameFunctionalGroupsSequence):
        ref = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = source[ref]
        position = np.asarray([float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient])
        np.testing.assert_allclose(position, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(orientation, [float(v) for v in src.ImageOrientationPatient], atol=1e-6)
        assert spacing == [float(v) for v in src.PixelSpacing]
        rows, cols = frames.shape[1:3]
        y, x = np.mgrid[0:rows, 0:cols]
        lps = (position[None, None] + x[..., None] * spacing[1] * orientation[:3]
               + y[..., None] * spacing[0] * orientation[3:])
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = nib.affines.apply_affine(np.linalg.inv(affine), ras)
        assert np.abs(ijk - np.round(ijk)).max() < 0.05
        i, j, k = np.round(ijk).astype(int).transpose(2, 0, 1)
        np.testing.assert_array_equal(frames[n], volume[i, j, k])


def test_export_and_push_files_are_phi_only_where_asked(roundtrip):
    root, _, links = roundtrip
    assert (links.stat().st_mode & 0o777) == 0o600
    for path in (root / "results").rglob("*.dcm"):
        assert (path.stat().st_mode & 0o777) == 0o600
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PatientName  # the source identity, on purpose
    # the de-identified side stays free of it
    for path in (root / "overlays").glob("*.nii.gz"):
        assert b"MRN" not in path.read_bytes()


def test_push_errors_are_one_line(roundtrip, orthanc, tmp_path, capsys):
    root, _, links = roundtrip
    bad = tmp_path / "bad.credentials"
    bad.write_text(f"{orthanc.user}:wrong\n")
    bad.chmod(0o600)
    base = ["export-dicom", "--overlays", str(root / "overlays"), "--archive", str(root / "archive"), "--link-table",
            str(links), "--out", str(root / "results"), "--no-progress"]
    for extra, message in ((["--push", orthanc.dicomweb_server, "--credentials-file", str(bad)], "HTTP 401"),
                           (["--push", orthanc.dimse_server(called_aet="NOT_ORTHANC")], "refused the association"),
                           (["--push", "dimse://ORTHANC@127.0.0.1:1"], "cannot reach")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("medimb export-dicom: error:") and message in err and "\n" not in err, err


def test_push_files_refuses_what_is_not_dicom_and_sends_nothing_for_nothing(orthanc, tmp_path):
    from data_prep.pacs.push import push_files
    from data_prep.pacs.server import PacsError

    assert push_files("dimse://ORTHANC@127.0.0.1:1", []).stored == 0  # nothing to send: no connection at all
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    with pytest.raises(PacsError, match="not a readable DICOM file") as info:
        push_files(orthanc.dimse_server(), [junk])
    assert info.value.kind == "usage"


def test_push_sends_batches_and_a_repeat_adds_nothing(roundtrip, orthanc):
    from data_prep.pacs.push import BATCH, push_files

    root, _, _ = roundtrip
    files = sorted((root / "results").rglob("*.dcm"))
    before = len(orthanc.rest("GET", "/instances").json())
    repeated = (files * BATCH)[: 2 * BATCH + 1]  # three batches, every object several times
    assert push_files(orthanc.dimse_server(), repeated).stored == len(repeated)
    assert len(orthanc.rest("GET", "/instances").json()) == before
