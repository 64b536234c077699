"""``medimb predict``: a new study (DICOM folder, converted session, 4D NIfTI, unlabelled datalist) to a prediction
and overlays in one command, with the channels the checkpoint was trained on; what it refuses, and no PHI."""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from helpers.dicom import write_dicom_series
from helpers.nifti import write_nifti

from medimb.cli import main
from medimb.data.transforms import Preprocessing
from medimb.networks import create_model, save_checkpoint

PHASES = ("phase-00", "phase-01", "phase-02", "phase-03")
PHI = {"PatientName": "ZQXDOE^ZQXJANE", "PatientID": "ZQX-PID-7731", "PatientBirthDate": "19610203",
       "AccessionNumber": "ZQXACC9917"}
THRESHOLD = 0.37  # the checkpoint's operating point: predictions.csv must say it was used


def make_checkpoint(path: Path, channels: tuple[str, ...] | None = PHASES, in_channels: int = 4) -> Path:
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=in_channels, num_classes=2, head="cmsl", widths=(4, 8),
                         depths=(1, 1))
    pre = Preprocessing(in_channels=in_channels, spatial_size=(16, 16, 16), pixdim=(2.0, 2.0, 2.0),
                        channels=channels).to_dict()
    if channels is None:
        del pre["channels"]  # as checkpoints written before medimb recorded them
    return save_checkpoint(path, model, preprocessing=pre, class_names=["benign", "malignant"], method="test",
                           epoch=0, operating_point={"threshold": THRESHOLD, "rule": "balanced_accuracy",
                                                     "positive_class": 1})


def write_study(folder: Path, phases: int = 4) -> Path:
    """A DICOM study: a DCE series of ``phases`` phases (16 x 16 x 8) and a T2 series, with known PHI."""
    from pydicom.uid import generate_uid

    study = generate_uid()
    ids = dict(patient_name=PHI["PatientName"], patient_id=PHI["PatientID"], birth_date=PHI["PatientBirthDate"],
               accession=PHI["AccessionNumber"], study_uid=study, frame_uid=generate_uid())
    write_dicom_series(folder / "DYN", phases=phases, shape=(16, 16, 8), spacing=(1.5, 1.5, 2.0),
                       description="dyn vibe", series_number=3, **ids)
    write_dicom_series(folder / "T2", shape=(16, 16, 8), spacing=(1.5, 1.5, 2.0), description="t2 tse",
                       series_number=2, seed=5, **ids)
    return folder


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "predictions.csv").open()))


def _predict(ckpt: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--checkpoint", str(ckpt), "--input", str(source), "--out", str(out),
                 "--methods", "coam", "--no-previews", "--no-progress", *extra])


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    ckpt = make_checkpoint(root / "model.pt")
    study = write_study(root / "DOE_JANE_study")
    out = root / "out"
    assert _predict(ckpt, study, out) == 0
    return root, ckpt, out


def _phi_hits(data: bytes, name: str) -> list[str]:
    hits = []
    for tag, value in PHI.items():
        for variant in {value, value.replace("^", " "), *value.split("^")}:
            if variant.encode() in data:
                hits.append(f"{name}: {tag} {variant!r}")
    return hits


def _contents(path: Path) -> list[tuple[str, bytes]]:
    """The bytes of a file, gunzipped, and of each member of a zip (Slicer .mrb) file."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            out = []
            for member in zf.namelist():
                raw = zf.read(member)
                out.append((f"{path.name}:{member}", gzip.decompress(raw) if member.endswith(".gz") else raw))
            return out
    return [(path.name, data)]


def test_dicom_study_to_prediction_with_the_stored_operating_point(dicom_run, capsys):
    root, _, out = dicom_run
    (row,) = _rows(out)
    assert row["case"].startswith("sub-") and row["case"].endswith("_ses-1")
    assert float(row["threshold"]) == pytest.approx(THRESHOLD)
    assert row["label"] == ""
    probs = float(row["prob_benign"]), float(row["prob_malignant"])
    assert row["predicted_name"] == ("malignant" if probs[1] > THRESHOLD else "benign")
    manifest = list(csv.DictReader((out / "converted" / "manifest.csv").open()))
    assert sorted(r["kind"] for r in manifest) == ["dce_phase"] * 4 + ["image"]
    # the overlay is drawn on the first post-contrast phase of the converted study, on its grid
    heat = out / f"{row['case']}_coam_on-phase-01.nii.gz"
    phase1 = next(out / "converted" / r["path"] for r in manifest if r["phase"] == "1")
    assert nib.load(heat).shape == nib.load(phase1).shape
    np.testing.assert_allclose(nib.load(heat).affine, nib.load(phase1).affine, atol=1e-4)
    assert (out / "load_in_slicer.py").is_file()
    summary = json.loads((out / "explain.json").read_text())
    assert summary["operating_point"]["threshold"] == pytest.approx(THRESHOLD)
    # explain.json records what the model takes and which converted file fed each channel
    assert summary["channels"] == list(PHASES)
    (case,) = summary["cases"]
    assert [name.rsplit("_", 1)[-1] for name in case["inputs"]] == [f"{p}.nii.gz" for p in PHASES]
    assert not [p for p in root.iterdir() if p.name.startswith(".out.")]  # no staging folder left


def test_no_phi_in_the_output_folder(dicom_run):
    _, _, out = dicom_run
    hits = []
    for path in sorted(out.rglob("*")):
        hits += _phi_hits(str(path.relative_to(out)).encode(), "path")
        if path.is_file():
            for name, data in _contents(path):
                hits += _phi_hits(data, name)
    assert not hits, hits
    assert "DOE_JANE" not in "".join(str(p) for p in out.rglob("*"))  # the input folder's name either


def test_converted_session_folder_gives_the_same_prediction(dicom_run, tmp_path):
    root, ckpt, out = dicom_run
    (before,) = _rows(out)
    session = next((out / "converted").glob("sub-*/ses-*"))
    copied = tmp_path / "conv"
    shutil.copytree(out / "converted", copied)  # the session folder outside the first run's output
    for source in (copied / session.relative_to(out / "converted"), copied):  # a session, the converted root
        target = tmp_path / f"out_{source.name}"
        assert _predict(ckpt, source, target) == 0
        (row,) = _rows(target)
        assert row["case"] == before["case"]
        assert float(row["prob_malignant"]) == pytest.approx(float(before["prob_malignant"]), abs=1e-5)
        assert not (target / "converted").exists()  # nothing to convert or split


def test_4d_nifti_is_split_into_the_phases(dicom_run, tmp_path):
    _, ckpt, _ = dicom_run
    rng = np.random.default_rng(0)
    data = rng.random((16, 14, 10, 5)).astype(np.float32)  # one more phase than the model takes
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    four_d = write_nifti(tmp_path / "study_4d.nii.gz", data, affine)
    out = tmp_path / "out"
    assert _predict(ckpt, four_d, out) == 0
    (row,) = _rows(out)
    assert row["case"] == "study_4d"
    for p in range(4):
        phase = nib.load(out / "converted" / "study_4d" / f"study_4d_phase-{p:02d}.nii.gz")
        np.testing.assert_array_equal(np.asarray(phase.dataobj), data[..., p])
        np.testing.assert_allclose(phase.affine, affine)
    assert not (out / "converted" / "study_4d" / "study_4d_phase-04.nii.gz").exists()
    # explain takes the same input (it was refused: "1 image file(s) given but the model takes 4 channel(s)")
    assert main(["explain", "--checkpoint", str(ckpt), "--data", str(four_d), "--out", str(tmp_path / "ex"),
                 "--methods", "coam", "--no-previews", "--no-progress"]) == 0
    assert _rows(tmp_path / "ex")[0]["prob_malignant"] == row["prob_malignant"]


def test_unlabelled_datalist_from_medimb_prep(dicom_run, tmp_path):
    from data_prep.cli import main as prep

    _, ckpt, out = dicom_run
    converted = tmp_path / "conv"
    shutil.copytree(out / "converted", converted)
    datalist = tmp_path / "new.json"
    assert prep(["datalist", str(converted), "-o", str(datalist)]) == 0
    data = json.loads(datalist.read_text())
    assert set(data) == {"test", "channels", "labelled"} and data["labelled"] is False
    assert data["channels"] == list(PHASES)
    (item,) = data["test"]
    assert "label" not in item and len(item["image"]) == 4 and item["subject"].startswith("sub-")
    target = tmp_path / "out"
    assert _predict(ckpt, datalist, target) == 0
    (row,) = _rows(target)
    assert row["split"] == "test" and row["label"] == ""
    assert float(row["prob_malignant"]) == pytest.approx(float(_rows(out)[0]["prob_malignant"]), abs=1e-5)


def test_missing_channels_are_named_in_one_line(dicom_run, tmp_path, capsys):
    _, ckpt, _ = dicom_run
    two = write_study(tmp_path / "two_phases", phases=2)
    out = tmp_path / "out"
    assert _predict(ckpt, two, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medimb predict: error: case sub-") and "\n" not in err
    assert err.endswith("/ses-1: the model takes 4 DCE phases (phase-00..phase-03); found phase-00, phase-01")
    assert not out.exists()  # a failed run leaves nothing behind
    short = write_nifti(tmp_path / "short.nii.gz", np.zeros((8, 8, 8, 2)))
    assert _predict(ckpt, short, out) == 2
    assert capsys.readouterr().err.strip() == (
        "medimb predict: error: case short: the model takes 4 DCE phases (phase-00..phase-03); found a 4D file of "
        "2 volumes (phase-00..phase-01)")
    three_d = write_nifti(tmp_path / "t2.nii.gz", np.zeros((8, 8, 8)))
    assert _predict(ckpt, three_d, out) == 2
    assert "case t2: the model takes 4 DCE phases (phase-00..phase-03); found one 3D volume" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an empty folder given as --out stays empty
    assert _predict(ckpt, two, out) == 2
    assert list(out.iterdir()) == []


def test_refuses_a_non_empty_out_without_overwrite(dicom_run, tmp_path, capsys):
    _, ckpt, _ = dicom_run
    four_d = write_nifti(tmp_path / "s.nii.gz", np.random.default_rng(1).random((12, 12, 8, 4)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _predict(ckpt, four_d, out) == 2
    assert "is not empty; choose another folder or pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert _predict(ckpt, four_d, out, "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "converted", "explain.json", "load_in_slicer.py", "predictions.csv", "s.mrb", "s_coam_on-phase-01.nii.gz",
        "s_coam_on-phase-01_label.nii.gz"]


def test_old_checkpoint_without_channels_takes_the_first_phases_with_a_note(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "old.pt", channels=None, in_channels=2)
    data = np.random.default_rng(2).random((12, 12, 8, 3)).astype(np.float32)
    four_d = write_nifti(tmp_path / "s.nii.gz", data)
    assert _predict(ckpt, four_d, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert "does not record which channels it was trained on" in captured.out
    assert "assuming 2 DCE phases (phase-00, phase-01), pre-contrast first" in captured.out
    split = sorted((tmp_path / "out" / "converted" / "s").iterdir())
    assert [p.name for p in split] == ["s_phase-00.nii.gz", "s_phase-01.nii.gz"]


def test_training_records_the_datalist_channels(tmp_path):
    """read_datalist gives items their channel names; preprocessing_for stores them (checkpoints say what they
    take); an unlabelled datalist is refused for training with a hint."""
    from helpers.nifti import write_datalist

    from medimb.data.datalist import read_datalist
    from medimb.errors import DataError
    from medimb.training.config import preprocessing_for

    path = write_datalist(tmp_path, [0, 1, 0, 1, 0, 1], channels=2, extra={"channels": ["phase-00", "phase-02"]})
    datalist = read_datalist(path)
    assert datalist.channels == ["phase-00", "phase-02"]
    assert datalist.splits["train"][0]["channel_names"] == ["phase-00", "phase-02"]
    pre = preprocessing_for("cpunet", datalist.splits["train"], spatial_size=(16, 16, 16))
    assert pre.channels == ("phase-00", "phase-02")
    assert Preprocessing.from_dict(pre.to_dict()).channels == ("phase-00", "phase-02")
    unlabelled = tmp_path / "new.json"
    unlabelled.write_text(json.dumps({"test": [{"image": ["s0_c0.nii.gz", "s0_c1.nii.gz"]}], "labelled": False}))
    with pytest.raises(DataError, match="an unlabelled datalist: predict on it with medimb predict"):
        read_datalist(unlabelled)


def test_positional_channels_pick_the_last_phase_of_each_study(tmp_path):
    """A model trained on --channels 0,1,-1 (phase[0], phase[1], phase[-1]) takes the last phase of whatever
    number of phases a study has: from a 4D file, and from a datalist that names its phases."""
    from medimb.data.channels import ChannelSpec
    from medimb.explain.inputs import resolve_items

    spec = ChannelSpec(("phase[0]", "phase[1]", "phase[-1]"))
    data = np.random.default_rng(3).random((6, 6, 4, 5)).astype(np.float32)
    four_d = write_nifti(tmp_path / "s.nii.gz", data)
    (item,) = resolve_items(four_d, channels=spec, work_dir=tmp_path / "converted")
    assert item["channel_names"] == ["phase-00", "phase-01", "phase-04"]
    assert [Path(p).name for p in item["image"]] == ["s_phase-00.nii.gz", "s_phase-01.nii.gz", "s_phase-04.nii.gz"]
    np.testing.assert_array_equal(np.asarray(nib.load(item["image"][2]).dataobj), data[..., 4])
    phases = [str(write_nifti(tmp_path / "d" / f"p{i}.nii.gz", data[..., i])) for i in range(5)]
    datalist = tmp_path / "d" / "d.json"
    datalist.write_text(json.dumps({"test": [{"image": phases}], "channels": [f"phase-0{i}" for i in range(5)]}))
    (item,) = resolve_items(datalist, channels=spec)
    assert item["channel_names"] == ["phase-00", "phase-01", "phase-04"]
    assert item["image"] == [phases[0], phases[1], phases[4]]


def test_overwrite_keeps_and_resumes_the_conversion(dicom_run, tmp_path):
    """--overwrite replaces the results but resumes the DICOM conversion in OUT/converted (a killed run's too):
    converted series are not written again."""
    root, ckpt, _ = dicom_run
    out = tmp_path / "out"
    assert _predict(ckpt, root / "DOE_JANE_study", out) == 0
    phase = next((out / "converted").rglob("*_phase-00.nii.gz"))
    stamp = phase.stat().st_mtime_ns
    (out / "predictions.csv").unlink()  # as if the run had been killed after converting
    assert _predict(ckpt, root / "DOE_JANE_study", out, "--overwrite") == 0
    assert phase.stat().st_mtime_ns == stamp and len(_rows(out)) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_archive_with_two_patients_gives_one_case_per_study(dicom_run, tmp_path):
    _, ckpt, _ = dicom_run
    archive = tmp_path / "archive"
    write_study(archive / "A")
    write_dicom_series(archive / "B" / "DYN", phases=4, shape=(16, 16, 8), spacing=(1.5, 1.5, 2.0),
                       patient_id="ZQX-PID-0002", patient_name="ZQXROE^ZQXRICHARD", description="dyn", seed=7)
    out = tmp_path / "out"
    assert _predict(ckpt, archive, out) == 0
    rows = _rows(out)
    assert len(rows) == 2 and len({r["case"].split("_")[0] for r in rows}) == 2
    assert all(r["case"].startswith("sub-") and (out / f"{r['case']}_coam_on-phase-01.nii.gz").is_file() for r in rows)


def test_link_table_lets_export_dicom_put_results_next_to_the_source(dicom_run, tmp_path, capsys):
    """predict --link-table on a DICOM input writes the private link table (0600, outside --out), and
    export-dicom then finds each case's source series through it."""
    import pydicom

    root, ckpt, _ = dicom_run
    study, out, links = root / "DOE_JANE_study", tmp_path / "out", tmp_path / "private" / "links.csv"
    assert _predict(ckpt, study, out, "--link-table", str(links)) == 0
    assert links.is_file() and links.stat().st_mode & 0o777 == 0o600
    source_series = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in (study / "DYN").rglob("*")
                     if f.is_file()}
    results = tmp_path / "dicom"
    assert main(["export-dicom", "--overlays", str(out), "--archive", str(study), "--link-table", str(links),
                 "--out", str(results), "--methods", "coam", "--no-progress"]) == 0
    written = [pydicom.dcmread(f) for f in results.rglob("*.dcm")]
    maps = [ds for ds in written if ds.Modality == "OT" or "ParametricMap" in ds.SOPClassUID.name.replace(" ", "")]
    assert maps, [ds.SOPClassUID.name for ds in written]
    referenced = {s.SeriesInstanceUID for ds in maps for s in ds.ReferencedSeriesSequence}
    assert referenced and referenced <= source_series


def test_link_table_is_refused_for_converted_inputs_and_inside_out(dicom_run, tmp_path, capsys):
    root, ckpt, out = dicom_run
    assert _predict(ckpt, out / "converted", tmp_path / "o1", "--link-table", str(tmp_path / "l.csv")) != 0
    assert "not a DICOM folder" in capsys.readouterr().err
    assert _predict(ckpt, root / "DOE_JANE_study", tmp_path / "o2", "--link-table",
                    str(tmp_path / "o2" / "l.csv")) != 0
    assert "outside the de-identified --out" in capsys.readouterr().err


def test_series_option_chooses_between_two_dce_series(dicom_run, tmp_path, capsys):
    from pydicom.uid import generate_uid

    _, ckpt, _ = dicom_run
    study = write_study(tmp_path / "study")
    first = pydicom.dcmread(next((study / "DYN").iterdir()), stop_before_pixels=True)
    ids = dict(patient_name=PHI["PatientName"], patient_id=PHI["PatientID"], birth_date=PHI["PatientBirthDate"],
               accession=PHI["AccessionNumber"], study_uid=first.StudyInstanceUID, frame_uid=generate_uid())
    write_dicom_series(study / "DYN2", phases=4, shape=(12, 12, 8), spacing=(2.0, 2.0, 2.0),
                       description="dyn repeat", series_number=9, seed=7, **ids)
    assert _predict(ckpt, study, tmp_path / "both") == 2
    err = capsys.readouterr().err
    assert "found 2 dce_phase series" in err and "choose one with --series PATTERN" in err
    assert _predict(ckpt, study, tmp_path / "picked", "--series", "*repeat*") == 0
    (row,) = _rows(tmp_path / "picked")
    inputs = json.loads((tmp_path / "picked" / "explain.json").read_text())["cases"][0]["inputs"]
    assert len(inputs) == 4 and all("s009" in name for name in inputs), inputs
    assert _predict(ckpt, study, tmp_path / "none", "--series", "nothing-like-this") == 2
    assert "no converted series matches --series 'nothing-like-this'" in capsys.readouterr().err


def test_no_descriptors_keeps_unknown_names_in_descriptions_out_of_the_output(dicom_run, tmp_path):
    """A description naming someone no header name field names reaches the converted series' names unless
    --no-descriptors (as medimb-prep convert --no-descriptors)."""
    _, ckpt, _ = dicom_run
    study = tmp_path / "study"
    write_dicom_series(study / "DYN", phases=4, shape=(16, 16, 8), spacing=(1.5, 1.5, 2.0),
                       description="dyn ZQXOPERATOR", series_number=3)

    def found(out: Path) -> bool:
        blobs = [str(p.relative_to(out)).encode() for p in out.rglob("*")]
        blobs += [data for p in out.rglob("*") if p.is_file() for _, data in _contents(p)]
        return any(b"zqxoperator" in blob.lower() for blob in blobs)

    assert _predict(ckpt, study, tmp_path / "default") == 0 and found(tmp_path / "default")
    assert _predict(ckpt, study, tmp_path / "plain", "--no-descriptors") == 0 and not found(tmp_path / "plain")
