"""`medimb-prep datalist`: channel selection, subject-grouped stratified splits, folds, errors, and
loading the result with MONAI."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.datalist import (DatalistError, SplitSpec, build_datalist, collect_items, pick_named_channels,
                                read_manifest, read_sessions)
from data_prep.deid import pseudonymize

COLUMNS = ["subject", "session", "series", "series_number", "description", "modality", "phase", "phase_time_s",
           "kind", "shape", "spacing", "path", "sidecar"]


def _row(subject, session, series, kind, phase="", description="dyn") -> dict:
    suffix = {"dce_phase": "_phase-", "subtraction": "_sub-", "4d": "_4d"}.get(kind, "")
    suffix += f"{phase:02d}" if kind in ("dce_phase", "subtraction") else ""
    path = f"{subject}/{session}/{subject}_{session}_{series}{suffix}.nii.gz"
    return {"subject": subject, "session": session, "series": series, "series_number": "3",
            "description": description, "modality": "MR", "phase": phase,
            "phase_time_s": "" if phase == "" else 90.0 * phase, "kind": kind, "shape": "32x32x12",
            "spacing": "0.8x0.8x2", "path": path, "sidecar": path.replace(".nii.gz", ".json")}


def _dce(subject, session="ses-1", phases=4, subtraction=False) -> list[dict]:
    rows = [_row(subject, session, "s003-dce", "dce_phase", p) for p in range(phases)]
    if subtraction:
        rows += [_row(subject, session, "s003-dce", "subtraction", p) for p in range(1, phases)]
    return rows


def _write(converted: Path, rows: list[dict], labels: dict[str, int] | None = None, shuffle_seed: int = 1) -> Path:
    """A converted folder: manifest.csv (rows shuffled) + empty volume files; labels.csv beside it."""
    converted.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    random.Random(shuffle_seed).shuffle(rows)  # the datalist must not rely on manifest order
    with open(converted / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        (converted / row["path"]).parent.mkdir(parents=True, exist_ok=True)
        (converted / row["path"]).write_bytes(b"")
    labels_path = converted.parent / "labels.csv"
    if labels is not None:
        with open(labels_path, "w", newline="") as f:
            f.write("case,label,notes\n")
            for case, label in labels.items():
                f.write(f"{case},{label},x\n")
    return labels_path


@pytest.fixture
def cohort(tmp_path):
    """30 subjects (9 malignant), a third with a second session, 4 DCE phases each."""
    rows, labels = [], {}
    for n in range(30):
        subject = f"sub-{n:04d}"
        rows += _dce(subject)
        if n % 3 == 0:
            rows += _dce(subject, "ses-2")
        labels[subject] = int(n % 10 < 3)
    labels_path = _write(tmp_path / "conv", rows, labels)
    return tmp_path / "conv", labels_path, labels


def _splits(datalist) -> dict[str, list[dict]]:
    return {s: datalist[s] for s in ("training", "validation", "test")}


def test_split_is_grouped_stratified_and_deterministic(cohort, tmp_path):
    converted, labels_path, labels = cohort
    out = tmp_path / "lists" / "datalist.json"
    datalist = build_datalist(converted, labels_path, "case", out, SplitSpec(val=0.2, test=0.2, seed=5))
    assert json.loads(out.read_text()) == datalist
    subjects = {split: {e["subject"] for e in items} for split, items in _splits(datalist).items()}
    assert not subjects["training"] & subjects["validation"]
    assert not subjects["training"] & subjects["test"]
    assert not subjects["validation"] & subjects["test"]
    assert set.union(*subjects.values()) == set(labels)
    assert sum(len(items) for items in _splits(datalist).values()) == 40  # every session once
    for split, names in subjects.items():
        positives = sum(labels[s] for s in names)
        assert len(names) == {"training": 18, "validation": 6, "test": 6}[split]
        assert positives == {"training": 5, "validation": 2, "test": 2}[split]  # 9 positives, stratified
    for items in _splits(datalist).values():
        for entry in items:
            assert entry["label"] == labels[entry["subject"]]
            # four channels in phase order, relative to the datalist's folder
            assert [p[-9:-7] for p in entry["image"]] == ["00", "01", "02", "03"]
            assert all(p.startswith("../conv/") for p in entry["image"])
            assert all((out.parent / p).resolve().is_file() for p in entry["image"])
    again = build_datalist(converted, labels_path, "case", tmp_path / "again.json", SplitSpec(val=0.2, test=0.2, seed=5))
    assert {s: [e["subject"] for e in again[s]] for s in again if s in subjects} == \
        {s: [e["subject"] for e in datalist[s]] for s in subjects}
    other = build_datalist(converted, labels_path, "case", tmp_path / "other.json", SplitSpec(val=0.2, test=0.2, seed=6))
    assert {e["subject"] for e in other["test"]} != subjects["test"]


def test_folds_keep_subjects_together(cohort, tmp_path):
    converted, labels_path, labels = cohort
    datalist = build_datalist(converted, labels_path, "case", tmp_path / "d.json", SplitSpec(val=0.0, test=0.2, folds=3))
    assert datalist["folds"] == 3 and datalist["validation"] == []
    fold_of = {}
    for entry in datalist["training"]:
        assert entry["fold"] in (0, 1, 2)
        assert fold_of.setdefault(entry["subject"], entry["fold"]) == entry["fold"]
    for k in range(3):
        in_fold = {s for s, f in fold_of.items() if f == k}
        assert {labels[s] for s in in_fold} == {0, 1}


def test_channels_are_chosen_by_index_name_or_series_pattern(tmp_path):
    rows = _dce("sub-a", subtraction=True) + _dce("sub-b", subtraction=True)
    rows += [_row("sub-a", "ses-1", "s001-t2", "image", description="t2_tse_tra")]
    labels_path = _write(tmp_path / "conv", rows, {"sub-a": 0, "sub-b": 1})
    manifest = read_manifest(tmp_path / "conv")
    auto = collect_items(manifest)
    assert [i.channels for i in auto] == [["phase-00", "phase-01", "phase-02", "phase-03"]] * 2
    picked = collect_items(manifest, channels="0,1,-1")
    assert picked[0].channels == ["phase[0]", "phase[1]", "phase[-1]"]
    assert [p[-9:-7] for p in picked[0].images] == ["00", "01", "03"]
    assert collect_items(manifest, channels="subtraction")[1].channels == ["sub-01", "sub-02", "sub-03"]
    with pytest.raises(DatalistError, match="no image volume"):
        collect_items(manifest, channels="image")  # sub-b has no plain image series
    t2 = collect_items(manifest, channels="image", series="t2*")
    assert len(t2) == 1 and t2[0].images == ["sub-a/ses-1/sub-a_ses-1_s001-t2.nii.gz"]
    with pytest.raises(DatalistError, match="has 4 DCE phases"):
        collect_items(manifest, channels="0,7")
    with pytest.raises(DatalistError, match="--channels 'banana'"):
        collect_items(manifest, channels="banana")
    # a single channel is written as one path, not a list
    datalist = build_datalist(tmp_path / "conv", labels_path, "case", tmp_path / "d.json",
                              SplitSpec(val=0, test=0), channels="image", series="t2", ignore_missing=True)
    assert datalist["training"][0]["image"] == "conv/sub-a/ses-1/sub-a_ses-1_s001-t2.nii.gz"


def test_mixed_archive_picks_the_kind_asked_for(tmp_path):
    """DWI, field maps and fMRI beside the DCE series: auto takes DCE; dwi / timeseries pick those."""
    rows = _dce("sub-a") + _dce("sub-b")
    for subject in ("sub-a", "sub-b"):
        rows += [_row(subject, "ses-1", "s007-dwi", "dwi"), _row(subject, "ses-1", "s008-bold", "timeseries"),
                 _row(subject, "ses-1", "s009-b0map_part-mag", "image"),
                 _row(subject, "ses-1", "s009-b0map_part-fieldmap", "image")]
    _write(tmp_path / "conv", rows, {"sub-a": 0, "sub-b": 1})
    manifest = read_manifest(tmp_path / "conv")
    assert [i.channels for i in collect_items(manifest)] == [["phase-00", "phase-01", "phase-02", "phase-03"]] * 2
    dwi = collect_items(manifest, channels="dwi")
    assert [i.channels for i in dwi] == [["dwi"]] * 2 and dwi[0].images[0].endswith("s007-dwi.nii.gz")
    assert collect_items(manifest, channels="timeseries")[1].images[0].endswith("s008-bold.nii.gz")
    with pytest.raises(DatalistError, match="2 image series"):
        collect_items(manifest, channels="image")  # magnitude and field map: the user must choose
    assert collect_items(manifest, channels="image", series="*part-mag")[0].channels == ["image"]


def test_inconsistent_channels_and_ambiguous_series(tmp_path):
    rows = _dce("sub-a", phases=4) + _dce("sub-b", phases=3)
    _write(tmp_path / "conv", rows)
    with pytest.raises(DatalistError, match="different channels"):
        collect_items(read_manifest(tmp_path / "conv"))
    assert len(collect_items(read_manifest(tmp_path / "conv"), channels="0,1,-1")) == 2
    rows = [_row("sub-a", "ses-1", "s002-t1", "image"), _row("sub-a", "ses-1", "s005-t2", "image")]
    _write(tmp_path / "two", rows)
    with pytest.raises(DatalistError, match="choose one with --series"):
        collect_items(read_manifest(tmp_path / "two"))


def test_bad_labels_file_is_refused_naming_the_line_or_key(cohort, tmp_path):
    converted, labels_path, labels = cohort
    out = tmp_path / "d.json"
    with pytest.raises(DatalistError, match=r"--key 'patient' is not a column .*\['case', 'label', 'notes'\]"):
        build_datalist(converted, labels_path, "patient", out)
    # a label with no converted series, and sessions with no label
    text = labels_path.read_text().replace("sub-0007,", "sub-9999,")
    labels_path.write_text(text)
    with pytest.raises(DatalistError, match=r"1 converted sessions have no label \(e.g. \['sub-0007/ses-1'\]\)"):
        build_datalist(converted, labels_path, "case", out)
    assert not out.exists()
    with pytest.raises(DatalistError, match=r"1 labels match no converted series \(e.g. \['sub-9999'\]\)"):
        build_datalist(converted, labels_path, "case", out, ignore_unlabeled=True)
    datalist = build_datalist(converted, labels_path, "case", out, ignore_unlabeled=True, ignore_missing=True)
    assert "sub-0007" not in {e["subject"] for s in _splits(datalist).values() for e in s}
    labels_path.write_text("case,label\nsub-0001,benign\n")
    with pytest.raises(DatalistError, match="line 2: label 'benign' is not a non-negative integer"):
        build_datalist(converted, labels_path, "case", out)
    labels_path.write_text("case,label\nsub-0001,0\nsub-0001,1\n")
    with pytest.raises(DatalistError, match="line 3: duplicate key 'sub-0001'"):
        build_datalist(converted, labels_path, "case", out)
    with pytest.raises(DatalistError, match="no manifest.csv"):
        build_datalist(tmp_path / "nowhere", labels_path, "case", out)


def test_too_few_subjects_per_class(tmp_path):
    rows = [r for n in range(8) for r in _dce(f"sub-{n}")]
    labels_path = _write(tmp_path / "conv", rows, {f"sub-{n}": int(n < 2) for n in range(8)})
    with pytest.raises(DatalistError, match=r"class\(es\) \{1: 2\}.*at least 3 subjects per class"):
        build_datalist(tmp_path / "conv", labels_path, "case", tmp_path / "d.json", SplitSpec(val=0.2, test=0.2))
    with pytest.raises(DatalistError, match="at least 4 subjects per class"):
        build_datalist(tmp_path / "conv", labels_path, "case", tmp_path / "d.json", SplitSpec(val=0, test=0.2, folds=3))
    # 2 test subjects out of 6:2 cannot be stratified with a malignant one: an error, not a silent empty class
    with pytest.raises(DatalistError, match=r"test split \(2 subjects = 0.25 of 8\) would hold no subject of class\(es\) \[1\]"):
        build_datalist(tmp_path / "conv", labels_path, "case", tmp_path / "d.json", SplitSpec(val=0, test=0.25))
    datalist = build_datalist(tmp_path / "conv", labels_path, "case", tmp_path / "d.json", SplitSpec(val=0, test=0.5))
    assert sorted(e["label"] for e in datalist["test"]) == [0, 0, 0, 1]
    with pytest.raises(DatalistError, match="either --val or --folds"):
        SplitSpec(val=0.2, folds=3)


def test_masks_are_required_for_every_subject_and_linked_relative_to_the_datalist(cohort, tmp_path):
    converted, labels_path, labels = cohort
    truth = tmp_path / "truth"
    truth.mkdir()
    for subject in list(labels)[:-1]:
        (truth / f"{subject}_lesion.nii.gz").write_bytes(b"")
    with pytest.raises(DatalistError, match=r"no <subject>_lesion.nii.gz for 1 subjects \(e.g. \['sub-0029'\]\)"):
        build_datalist(converted, labels_path, "case", tmp_path / "d.json", masks=truth)
    (truth / "sub-0029_lesion.nii.gz").write_bytes(b"")
    datalist = build_datalist(converted, labels_path, "case", tmp_path / "d.json", masks=truth)
    assert datalist["test"][0]["mask"] == f"truth/{datalist['test'][0]['subject']}_lesion.nii.gz"


def test_missing_volume_file(cohort, tmp_path):
    converted, labels_path, _ = cohort
    next(converted.rglob("*phase-02.nii.gz")).unlink()
    with pytest.raises(DatalistError, match="1 volumes listed in manifest.csv are missing"):
        build_datalist(converted, labels_path, "case", tmp_path / "d.json")


def test_hash_keys_match_pseudonyms_without_leaking_ids(tmp_path):
    ids = {f"MRN{n:05d}": int(n % 2) for n in range(6)}
    rows = [r for pid in ids for r in _dce(pseudonymize(pid, "site-key"))]
    _write(tmp_path / "conv", rows)
    labels_path = tmp_path / "mrn.csv"
    labels_path.write_text("mrn,label\n" + "".join(f"{pid},{label}\n" for pid, label in ids.items())
                           + "MRN99999,1\n")
    spec = SplitSpec(val=0, test=0)
    with pytest.raises(DatalistError) as info:
        build_datalist(tmp_path / "conv", labels_path, "mrn", tmp_path / "d.json", spec, hash_keys=True,
                       deid_key="site-key")
    assert "1 labels match no converted series" in str(info.value) and "MRN" not in str(info.value)
    datalist = build_datalist(tmp_path / "conv", labels_path, "mrn", tmp_path / "d.json", spec, hash_keys=True,
                              deid_key="site-key", ignore_missing=True)
    assert len(datalist["training"]) == 6 and "MRN" not in (tmp_path / "d.json").read_text()


def test_cli_prints_class_counts_and_errors(cohort, tmp_path, capsys):
    converted, labels_path, _ = cohort
    out = tmp_path / "cli.json"
    assert main(["datalist", str(converted), "--labels", str(labels_path), "--key", "case", "-o", str(out),
                 "--test", "0.2", "--folds", "3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["split", "items", "subjects", "class", "0", "class", "1"]
    test_line = next(line.split() for line in printed.splitlines() if line.startswith("test"))
    assert test_line[2] == "6" and int(test_line[1]) == int(test_line[3]) + int(test_line[4])
    assert int(test_line[4]) >= 2  # the 2 malignant test subjects (one may have two sessions)
    assert "fold 2" in printed
    assert json.loads(out.read_text())["folds"] == 3
    assert main(["datalist", str(converted), "--labels", str(labels_path), "--key", "nope"]) == 2
    assert "--key 'nope' is not a column" in capsys.readouterr().err


def test_class_names_are_written_and_checked(cohort, tmp_path, capsys):
    converted, labels_path, _ = cohort
    out = tmp_path / "named.json"
    args = ["datalist", str(converted), "--labels", str(labels_path), "--key", "case", "-o", str(out)]
    assert main([*args, "--class-names", "benign, malignant"]) == 0
    assert json.loads(out.read_text())["class_names"] == ["benign", "malignant"]
    for bad in ("benign", "a,b,c", "a,a", "a,"):
        assert main([*args, "--class-names", bad]) == 2
        assert "give 2 distinct, non-empty names" in capsys.readouterr().err
    assert json.loads(out.read_text())["class_names"] == ["benign", "malignant"]  # a refused run writes nothing


def test_without_labels_every_session_goes_unlabelled_to_test(cohort, tmp_path, capsys):
    converted, _, labels = cohort
    out = tmp_path / "new.json"
    assert main(["datalist", str(converted), "-o", str(out), "--masks", str(tmp_path / "none")]) == 2
    assert "no <subject>_lesion.nii.gz" in capsys.readouterr().err
    assert main(["datalist", str(converted), "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "unlabelled: 40 items, 30 subjects (split test)"
    data = json.loads(out.read_text())
    assert set(data) == {"test", "channels", "labelled"} and data["labelled"] is False
    assert data["channels"] == ["phase-00", "phase-01", "phase-02", "phase-03"]
    assert len(data["test"]) == 40 and {e["subject"] for e in data["test"]} == set(labels)
    assert all("label" not in e and len(e["image"]) == 4 for e in data["test"])
    for flags in (["--key", "case"], ["--folds", "3"], ["--val", "0.1"], ["--hash-keys"]):
        assert main(["datalist", str(converted), "-o", str(tmp_path / "x.json"), *flags]) == 2
        assert "only work with --labels" in capsys.readouterr().err
    with pytest.raises(DatalistError, match="--class-names needs --labels"):
        build_datalist(converted, None, None, tmp_path / "x.json", class_names=["a", "b"])
    assert not (tmp_path / "x.json").exists()


def test_named_channels_are_picked_from_a_session_or_named_as_missing(tmp_path):
    rows = _dce("sub-a", phases=3, subtraction=True) + [_row("sub-a", "ses-1", "s002-t2", "image")]
    _write(tmp_path / "conv", rows)
    (session,) = read_sessions(tmp_path / "conv" / "sub-a" / "ses-1").values()  # rows of the manifest up there
    assert [Path(r["path"]).is_absolute() for r in session] == [True] * len(rows)
    names = lambda picked: [Path(r["path"]).name.split("s003-dce_")[-1] for r in picked]  # noqa: E731
    assert names(pick_named_channels(session, ["phase-00", "phase-02"], "sub-a/ses-1")) == [
        "phase-00.nii.gz", "phase-02.nii.gz"]
    assert names(pick_named_channels(session, ["phase[0]", "phase[-1]"], "x")) == ["phase-00.nii.gz", "phase-02.nii.gz"]
    assert names(pick_named_channels(session, ["sub-01", "sub-02"], "x")) == ["sub-01.nii.gz", "sub-02.nii.gz"]
    assert pick_named_channels(session, ["image"], "x")[0]["path"].endswith("s002-t2.nii.gz")
    with pytest.raises(DatalistError) as info:
        pick_named_channels(session, ["phase-00", "phase-01", "phase-02", "phase-03"], "case sub-a/ses-1")
    assert str(info.value) == ("case sub-a/ses-1: the model takes 4 DCE phases (phase-00..phase-03); found "
                               "phase-00, phase-01, phase-02")
    with pytest.raises(DatalistError, match=r"the model takes a dwi series; found no dwi volume; its series: "
                                            r"s002-t2 \(image\), s003-dce \(dce_phase\), s003-dce \(subtraction\)"):
        pick_named_channels(session, ["dwi"], "x")
    with pytest.raises(DatalistError, match="not named as medimb-prep names them"):
        pick_named_channels(session, ["t1", "t2"], "x")
    # files named as the converter names them, without a manifest: the kinds come from the names
    loose = tmp_path / "loose"
    for r in rows:
        target = loose / Path(r["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    (key, found), = read_sessions(loose).items()
    assert key == ("sub-a", "ses-1")
    assert sorted((r["kind"], r["phase"]) for r in found) == sorted((r["kind"], str(r["phase"])) for r in rows)
    assert read_sessions(tmp_path / "nothing_here") == {}


@pytest.mark.slow  # importing monai (torch) alone takes 5-20 s on the shared 2-core machine
def test_converted_synthetic_archive_loads_with_monai(tmp_path):
    """The real chain: synth -> convert -> datalist -> monai.data.load_decathlon_datalist."""
    monai_data = pytest.importorskip("monai.data")
    from data_prep.convert import convert_archive
    from data_prep.synth import PhantomConfig, synthesize_archive

    synth = tmp_path / "synth"
    synthesize_archive(synth, cases=6, positive_fraction=0.5, seed=2,
                       config=PhantomConfig(matrix=24, slices=10, slice_jitter=1, post_phases=2))
    converted = tmp_path / "converted"
    convert_archive(str(synth / "archive"), str(converted), workers=1, progress=False)
    out = tmp_path / "lists" / "datalist.json"
    assert main(["datalist", str(converted), "--labels", str(synth / "labels.csv"), "--key", "case",
                 "-o", str(out), "--val", "0.25", "--test", "0.25", "--masks", str(synth / "truth")]) == 0
    labels = {r["case"]: int(r["label"]) for r in csv.DictReader(open(synth / "labels.csv"))}
    seen = set()
    for split in ("training", "validation", "test"):
        items = monai_data.load_decathlon_datalist(str(out), data_list_key=split, base_dir=str(out.parent))
        assert len(items) == 2
        assert sorted(i["label"] for i in items) == sorted([0, 1] * (len(items) // 2))
        for item in items:
            assert len(item["image"]) == 3 and all(Path(p).is_file() for p in item["image"])
            assert "phase-00" in item["image"][0] and "phase-02" in item["image"][2]
            assert item["label"] == labels[item["subject"]]
            assert Path(item["mask"]).name == f"{item['subject']}_lesion.nii.gz" and Path(item["mask"]).is_file()
            assert item["subject"] not in seen
            seen.add(item["subject"])
    assert seen == set(labels)
