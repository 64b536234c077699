"""The synthetic archive generator: layout, headers, geometry of the truth masks, determinism, and
that the classification task is neither trivial nor impossible."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from data_prep.cli import main
from data_prep.deid import pseudonymize
from data_prep.synth import PhantomConfig, synthesize_archive, synthesize_case
from data_prep.synth.dicom_writer import SeriesEncoder

SMALL = PhantomConfig(matrix=32, slices=12, slice_jitter=2, post_phases=3)
SMALL_HARD = PhantomConfig(matrix=32, slices=12, slice_jitter=2, post_phases=3, difficulty="hard")
JUNK = {"README.txt", "DICOMDIR"}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _dicom_files(archive: Path) -> dict[Path, pydicom.Dataset]:
    """Every readable image file of the archive with its header (junk excluded)."""
    out = {}
    for path in sorted(p for p in archive.rglob("*") if p.is_file() and p.name not in JUNK):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # the truncated junk file
            continue
        if "PixelData" in ds:  # the truncated junk file may parse as a header fragment
            out[path] = ds
    return out


def _ras_affine(headers: list[pydicom.Dataset]) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """NIfTI affine (i=column, j=row, k=slice -> RAS mm) of one 3D stack, computed from the headers
    alone (independent of the generator's geometry module), and the headers sorted along the normal."""
    iop = np.array(headers[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    ordered = sorted(headers, key=lambda h: float(np.dot(np.array(h.ImagePositionPatient, dtype=float), normal)))
    positions = np.array([h.ImagePositionPatient for h in ordered], dtype=float)
    steps = np.diff(positions @ normal)
    assert np.allclose(steps, steps[0], atol=1e-3), "slices must be evenly spaced"
    dy, dx = (float(v) for v in ordered[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * dx, col * dy, normal * steps[0], positions[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, ordered


def _volume(ordered: list[pydicom.Dataset]) -> np.ndarray:
    """(Z, Y, X) real-valued volume (rescale applied)."""
    return np.stack([h.pixel_array * float(h.get("RescaleSlope", 1)) + float(h.get("RescaleIntercept", 0))
                     for h in ordered])


def _dce_stacks(headers: list[pydicom.Dataset]) -> list[list[pydicom.Dataset]]:
    """The DCE phases of one study in time order, each a list of slice headers."""
    phases = defaultdict(list)
    for h in headers:
        if "LOCALIZER" in h.ImageType:
            continue
        phases[(h.AcquisitionTime, h.SeriesInstanceUID, h.get("TemporalPositionIdentifier", 0))].append(h)
    return [phases[key] for key in sorted(phases)]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "out"
    summary = synthesize_archive(out, cases=4, positive_fraction=0.5, seed=3, config=SMALL)
    assert summary.cases == 4 and summary.positives == 2
    return out


@pytest.fixture(scope="module")
def headers_by_patient(archive) -> dict[str, list[pydicom.Dataset]]:
    by_patient = defaultdict(list)
    for ds in _dicom_files(archive / "archive").values():
        by_patient[ds.PatientID].append(ds)
    return dict(by_patient)


def test_layout_labels_and_truth_files(archive, headers_by_patient):
    labels = _read_csv(archive / "labels.csv")
    assert list(labels[0]) == ["case", "label"]
    assert sorted(r["case"] for r in labels) == sorted(pseudonymize(pid) for pid in headers_by_patient)
    assert sorted(int(r["label"]) for r in labels) == [0, 0, 1, 1]
    for row in labels:
        assert (archive / "truth" / f"{row['case']}_lesion.nii.gz").is_file()
    cases = {r["case"]: r for r in _read_csv(archive / "truth" / "cases.csv")}
    assert set(cases) == {r["case"] for r in labels}
    for row in labels:
        lesion_type = cases[row["case"]]["lesion_type"]
        assert lesion_type == "malignant" if row["label"] == "1" else lesion_type in ("benign", "none")
    # patient/study/series/file nesting
    depths = {len(p.relative_to(archive / "archive").parts) for p in _dicom_files(archive / "archive")}
    assert depths == {4}
    meta = json.loads((archive / "synth.json").read_text())
    assert meta["parameters"]["seed"] == 3 and meta["cases"] == 4
    assert meta["parameters"]["difficulty"] == "standard"  # the default level is recorded


def test_archive_junk_is_a_readme_a_dicomdir_and_one_truncated_file(archive):
    root = archive / "archive"
    assert "PACS" in (root / "README.txt").read_text()
    dicomdir = pydicom.dcmread(root / "DICOMDIR")
    assert dicomdir.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    unreadable = []
    for path in (p for p in root.rglob("*") if p.is_file() and p.name not in JUNK):
        try:
            pydicom.dcmread(path).pixel_array
        except Exception:
            unreadable.append(path)
    assert len(unreadable) == 1 and unreadable[0].stat().st_size <= 600


def test_headers_are_realistic_and_carry_fake_phi(headers_by_patient, archive):
    storages, oblique, rescaled = set(), 0, 0
    for patient_id, headers in headers_by_patient.items():
        first = headers[0]
        for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "ReferringPhysicianName", "StudyDate", "Manufacturer", "MagneticFieldStrength"):
            assert str(first.get(keyword, "")).strip(), keyword
        assert all(h.Modality == "MR" for h in headers)
        assert len({h.StudyInstanceUID for h in headers}) == 1
        localizer = [h for h in headers if "LOCALIZER" in h.ImageType]
        assert len(localizer) == 3
        normals = {tuple(np.round(np.cross(np.array(h.ImageOrientationPatient[:3], dtype=float),
                                           np.array(h.ImageOrientationPatient[3:], dtype=float)), 3))
                   for h in localizer}
        assert len(normals) == 3, "localizer has three orthogonal planes"
        dce = [h for h in headers if "LOCALIZER" not in h.ImageType]
        for keyword in ("RepetitionTime", "EchoTime", "FlipAngle", "SliceThickness", "SpacingBetweenSlices",
                        "PixelSpacing", "AcquisitionTime", "SeriesDescription"):
            assert keyword in dce[0], keyword
        n_series = len({h.SeriesInstanceUID for h in dce})
        if n_series == 1:
            storages.add("single")
            assert {int(h.TemporalPositionIdentifier) for h in dce} == {1, 2, 3, 4}
            assert all(int(h.NumberOfTemporalPositions) == 4 for h in dce)
        else:
            storages.add("separate")
            assert n_series == 4
        spacing = [float(v) for v in dce[0].PixelSpacing]
        assert 0.7 <= spacing[0] <= 0.9 and 1.5 <= float(dce[0].SliceThickness) <= 3.0
        oblique += not np.allclose(np.abs(np.array(dce[0].ImageOrientationPatient, dtype=float)), [1, 0, 0, 0, 1, 0])
        rescaled += "RescaleSlope" in dce[0]
        # InstanceNumber is shuffled: it does not follow the position along the slice normal
        _, ordered = _ras_affine(_dce_stacks(headers)[0])
        numbers = [int(h.InstanceNumber) for h in ordered]
        assert numbers != sorted(numbers) and numbers != sorted(numbers, reverse=True)
        # no PHI in file or folder names
        for path in archive.rglob("*"):
            for value in (patient_id, str(first.PatientName), first.PatientBirthDate, first.AccessionNumber):
                assert value not in str(path.relative_to(archive))
    assert storages == {"single", "separate"}
    assert oblique >= 1 and rescaled >= 1


def test_truth_masks_line_up_with_the_dicom_volumes(archive, headers_by_patient):
    """Each mask voxel lands on a voxel of the DCE grid (world space, RAS), enhancing there; the
    centre in cases.csv is the mask's centre of mass in world space."""
    cases = {r["case"]: r for r in _read_csv(archive / "truth" / "cases.csv")}
    lesions = 0
    for patient_id, headers in headers_by_patient.items():
        key = pseudonymize(patient_id)
        stacks = _dce_stacks(headers)
        assert len(stacks) == 4
        affine, ordered = _ras_affine(stacks[0])
        mask_img = nib.load(archive / "truth" / f"{key}_lesion.nii.gz")
        mask = np.asarray(mask_img.dataobj) > 0
        # the converter's grid: (column, row, slice along the normal), affine to RAS
        assert mask.shape == (ordered[0].Columns, ordered[0].Rows, len(ordered))
        assert np.allclose(mask_img.affine, affine, atol=1e-3)
        # every mask voxel centre maps onto an integer voxel of the DICOM grid
        ijk_mask = np.argwhere(np.ones(mask.shape, bool))
        world = nib.affines.apply_affine(mask_img.affine, ijk_mask)
        ijk_dicom = nib.affines.apply_affine(np.linalg.inv(affine), world)
        assert np.abs(ijk_dicom - np.round(ijk_dicom)).max() < 1e-3
        row = cases[key]
        if not mask.any():
            assert row["lesion_type"] == "none" and row["centre_x_mm"] == ""
            continue
        lesions += 1
        pre = _volume(ordered)
        post = _volume(_ras_affine(stacks[1])[1])
        inside = np.round(nib.affines.apply_affine(np.linalg.inv(affine),
                                                   nib.affines.apply_affine(mask_img.affine, np.argwhere(mask))))
        k, j, i = inside[:, 2].astype(int), inside[:, 1].astype(int), inside[:, 0].astype(int)
        subtraction = post - pre
        on_grid = np.zeros(subtraction.shape, bool)
        on_grid[k, j, i] = True
        shell = ndimage.binary_dilation(on_grid, iterations=2) & ~on_grid
        # the lesion enhances more than the tissue just around it (a shifted mask would not)
        assert subtraction[on_grid].mean() > 1.5 * max(subtraction[shell].mean(), 1.0), key
        if row["lesion_type"] == "malignant":  # and a cancer is among the brightest things in the image
            assert subtraction[on_grid].mean() > np.percentile(subtraction, 90)
        centre = nib.affines.apply_affine(mask_img.affine, ndimage.center_of_mass(mask))
        listed = [float(row[f"centre_{a}_mm"]) for a in "xyz"]
        assert np.allclose(centre, listed, atol=1e-2)
    assert lesions >= 2  # both malignant cases at least


def test_same_seed_gives_identical_bytes(tmp_path):
    digests = []
    for run, workers in (("a", 1), ("b", 2)):  # also independent of the number of worker processes
        out = tmp_path / run
        synthesize_archive(out, cases=2, positive_fraction=0.5, seed=11, config=SMALL, workers=workers)
        digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted(out.rglob("*")) if p.is_file()})
    assert digests[0] == digests[1] and len(digests[0]) > 50
    other = tmp_path / "c"
    synthesize_archive(other, cases=2, positive_fraction=0.5, seed=12, config=SMALL)
    assert (other / "labels.csv").read_text() != (tmp_path / "a" / "labels.csv").read_text()


def test_fast_encoder_matches_pydicom_dcmwrite(archive, tmp_path):
    path = next(p for p in _dicom_files(archive / "archive"))
    ds = pydicom.dcmread(path)
    varying = {}
    for keyword in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "PixelData"):
        value = ds[keyword].value
        varying[keyword] = tuple(value) if keyword == "ImagePositionPatient" else value
        del ds[keyword]
    encoder = SeriesEncoder(ds)
    encoded = encoder.encode(varying)
    assert encoder.encode(varying) == encoded  # memoised elements give the same bytes
    for keyword, value in varying.items():
        setattr(ds, keyword, list(value) if isinstance(value, tuple) else value)
    ds["PixelData"].VR = "OW"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    reference = tmp_path / "ref.dcm"
    ds.save_as(reference, enforce_file_format=True)
    assert encoded == reference.read_bytes()


def test_refuses_to_overwrite(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        synthesize_archive(foreign, cases=1, config=SMALL)
    with pytest.raises(FileExistsError, match="refusing to delete"):
        synthesize_archive(foreign, cases=1, config=SMALL, force=True)
    assert (foreign / "keep.txt").read_text() == "x"
    assert main(["synth", str(foreign), "--cases", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    # an earlier synthetic archive may be replaced with --force
    out = tmp_path / "synth"
    synthesize_archive(out, cases=1, config=SMALL, seed=1)
    synthesize_archive(out, cases=2, config=SMALL, seed=2, force=True)
    assert len(_read_csv(out / "labels.csv")) == 2
    assert not list(tmp_path.glob(".*partial*"))


def test_cli_with_custom_deid_key(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["synth", str(out), "--cases", "2", "--matrix", "32", "--slices", "12",
                 "--positive-fraction", "0.5", "--deid-key", "site-secret", "--seed", "4"]) == 0
    assert "2 cases (1 malignant)" in capsys.readouterr().out
    ids = {ds.PatientID for ds in _dicom_files(out / "archive").values()}
    assert {r["case"] for r in _read_csv(out / "labels.csv")} == {pseudonymize(i, "site-secret") for i in ids}
    assert main(["synth", str(tmp_path / "bad"), "--positive-fraction", "1.5"]) == 2
    assert "positive-fraction" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "bad"), "--matrix", "8"]) == 2
    assert "--matrix must be at least 16, got 8" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    hard = tmp_path / "hard"
    assert main(["synth", str(hard), "--cases", "1", "--matrix", "16", "--slices", "8", "--difficulty", "hard"]) == 0
    assert json.loads((hard / "synth.json").read_text())["parameters"]["difficulty"] == "hard"
    with pytest.raises(SystemExit) as exc:  # argparse's one-line usage error
        main(["synth", str(tmp_path / "bad"), "--difficulty", "easy"])
    assert exc.value.code == 2 and "invalid choice: 'easy'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--difficulty must be one of"):
        PhantomConfig(difficulty="easy")


def _washout(case) -> float:
    """Late over early mean enhancement inside the lesion (< 1: wash-out)."""
    m = case.lesion_mask
    early = (case.phases[1] - case.phases[0])[m].mean()
    return float((case.phases[-1] - case.phases[0])[m].mean() / early)


def test_intensity_statistics_do_not_separate_the_classes_but_lesions_do():
    """At the hard level, max and mean of the subtraction images give AUC within [0.25, 0.75] (no
    better than weak, either way), while the lesion's own kinetics separate malignant from benign
    lesions: the task is learnable, but not from global intensity."""
    seed, n = 7, 60
    labels = (np.random.default_rng(seed).random(n) < 0.35).astype(int)
    features, washout = [], []
    for i, label in enumerate(labels):
        case = synthesize_case(np.random.default_rng([seed, i]), int(label), SMALL_HARD)
        early = case.phases[1] - case.phases[0]
        late = case.phases[-1] - case.phases[0]
        features.append([early.max(), early.mean(), late.max(), late.mean()])
        if case.lesion_type != "none":
            washout.append((label, _washout(case)))
    assert 10 <= labels.sum() <= 30
    for name, column in zip(("early max", "early mean", "late max", "late mean"), np.array(features).T):
        auc = roc_auc_score(labels, column)
        assert 0.25 <= auc <= 0.75, f"{name} separates the classes: AUC {auc:.3f}"
    lesion_labels, ratios = np.array(washout).T
    assert roc_auc_score(lesion_labels, -ratios) > 0.95


def test_difficulty_levels_share_the_anatomy_and_standard_makes_the_lesion_distinct():
    """Both levels draw the geometry and phase times from the same random numbers; at the standard
    level the malignant lesion enhances more than the benign ones, so its relative early enhancement
    separates the lesions (which the hard level leaves to their shape and time course), and every
    lesion has its truth mask."""
    seed, n = 7, 40
    labels = (np.random.default_rng(seed).random(n) < 0.35).astype(int)
    lesion_early, lesion_labels = [], []
    for i, label in enumerate(labels):
        std = synthesize_case(np.random.default_rng([seed, i]), int(label), SMALL)
        hard = synthesize_case(np.random.default_rng([seed, i]), int(label), SMALL_HARD)
        assert np.array_equal(std.geometry.affine_ras(), hard.geometry.affine_ras())
        assert std.geometry.shape == hard.geometry.shape
        assert np.array_equal(std.phase_times_s, hard.phase_times_s)
        assert std.lesion_mask.any() == (std.lesion_type != "none")
        early = std.phases[1] - std.phases[0]
        if std.lesion_mask.any():
            lesion_early.append(early[std.lesion_mask].mean() / std.phases[0][std.lesion_mask].mean())
            lesion_labels.append(label)
    assert roc_auc_score(lesion_labels, lesion_early) > 0.95


SMALL_MULTIFOCAL = PhantomConfig(matrix=32, slices=12, slice_jitter=2, post_phases=3, lesions="multifocal")


def test_multifocal_cancer_has_2_to_3_separate_foci_all_in_the_truth_mask():
    """``--lesions multifocal``: every malignant case has 2-3 foci, each focus centre lies in the truth mask,
    the foci are apart (tissue between) but in one region, together about as large as one mass; class-0
    cases are drawn exactly as in the default family."""
    from data_prep.synth.phantom import FOCUS_SEPARATION, FOCUS_SPREAD

    counts, volume_ratio = [], []
    for i in range(6):
        case = synthesize_case(np.random.default_rng([5, i]), 1, SMALL_MULTIFOCAL)
        single = synthesize_case(np.random.default_rng([5, i]), 1, SMALL)
        centres = np.array(case.focus_centres_zyx)
        assert case.lesion_type == "malignant" and 2 <= len(centres) <= 3
        counts.append(len(centres))
        for c in centres.astype(int):
            assert case.lesion_mask[tuple(c)], f"case {i}: a focus centre outside the truth mask"
        spacing = np.array(case.geometry.spacing_zyx)
        focus_r = case.lesion_radius_mm
        for a in range(len(centres)):  # nearest other focus: apart, yet in one region of the breast
            nearest = min(np.linalg.norm((centres[a] - centres[b]) * spacing) for b in range(len(centres)) if b != a)
            L = case.geometry.shape[2] * case.geometry.pixel_spacing[1] / 2
            assert 0.9 * FOCUS_SEPARATION * focus_r <= nearest <= 1.5 * FOCUS_SEPARATION * focus_r + FOCUS_SPREAD * L
        volume_ratio.append(case.lesion_mask.sum() / max(single.lesion_mask.sum(), 1))
        # anatomy and acquisition geometry come from the same draws as the single-mass family
        assert np.array_equal(case.geometry.affine_ras(), single.geometry.affine_ras())
    assert set(counts) == {2, 3}
    assert 0.4 <= np.median(volume_ratio) <= 2.0  # not simply a larger lesion
    for label in (0,):  # class 0 is the same in both families
        a = synthesize_case(np.random.default_rng([5, 9]), label, SMALL_MULTIFOCAL)
        b = synthesize_case(np.random.default_rng([5, 9]), label, SMALL)
        assert np.array_equal(a.phases, b.phases) and np.array_equal(a.lesion_mask, b.lesion_mask)


def test_multifocal_archive_lists_every_focus_and_default_is_unchanged(tmp_path, archive):
    """The archive of the multifocal family lists the foci in cases.csv (RAS mm), each inside the written
    truth mask; the default family's cases.csv and synth.json have no trace of the option."""
    out = tmp_path / "mf"
    assert main(["synth", str(out), "--cases", "4", "--positive-fraction", "0.5", "--seed", "3", "--matrix", "32",
                 "--slices", "12", "--lesions", "multifocal", "--workers", "1"]) == 0
    assert json.loads((out / "synth.json").read_text())["parameters"]["lesions"] == "multifocal"
    rows = _read_csv(out / "truth" / "cases.csv")
    malignant = [r for r in rows if r["label"] == "1"]
    assert len(malignant) == 2
    for row in rows:
        mask_img = nib.load(out / "truth" / f"{row['case']}_lesion.nii.gz")
        mask = np.asarray(mask_img.dataobj) > 0
        centres = [np.array(c.split(), dtype=float) for c in row["focus_centres_mm"].split(";") if c]
        assert len(centres) == int(row["lesion_foci"])
        assert (len(centres) >= 2) if row["label"] == "1" else len(centres) <= 1
        for ras in centres:
            ijk = np.round(nib.affines.apply_affine(np.linalg.inv(mask_img.affine), ras)).astype(int)
            assert mask[tuple(ijk)], f"{row['case']}: a listed focus is outside its truth mask"
    # the default archive (module fixture, no --lesions) is written as before the option existed
    assert "lesions" not in json.loads((archive / "synth.json").read_text())["parameters"]
    assert "lesion_foci" not in _read_csv(archive / "truth" / "cases.csv")[0]


def test_unknown_lesion_family_is_a_clear_error():
    with pytest.raises(ValueError, match="--lesions must be one of single, multifocal"):
        PhantomConfig(lesions="ring")
