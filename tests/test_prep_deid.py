"""The PHI scrubber (PS3.15 Clean Descriptors), the key sources and the public-key warning."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import warnings

import pydicom
import pytest
from helpers.paths import REPO

from data_prep import deid
from data_prep.deid import PhiScrubber, identifying_values


@pytest.fixture
def scrubber():
    return PhiScrubber(identifying_values(
        name_values=["HFS^Zqxgiven", "Hartmann^Peter^^Dr."],
        other_values=["ZQX1234567", "19610203", "ACC-77"],
        institution_values=["Zqxville General Hospital"]))


@pytest.mark.parametrize("text, expected", [
    ("0001_1.3.12.2.1107.5.2.43.67060.2022040715053454597060816.dcm", "0001_[uid].dcm"),
    ("MR.1.3.12.2.1107.5.2.43", "MR.[uid]"),
    ("t1 post Dr Hartmann 07.04.2022", "t1 post Dr [removed] [date]"),
    ("dyn 2022-04-07 04/07/2022 7 Apr 2022 April 7, 2022 20220407", "dyn [date] [date] [date] [date] [date]"),
    ("Zqxville_T1 ZQX1234567", "[removed]_T1 [removed]"),
    ("General Hospital protocol", "General Hospital protocol"),  # generic words of an institution stay
    ("Peterson Annotation", "Peterson Annotation"),  # whole words only
    ("acc-77 x", "[removed] x"),
])
def test_scrubbing_removes_identifiers_keeps_generic_words_and_is_idempotent(scrubber, text, expected):
    assert scrubber.scrub(text) == expected
    assert scrubber.scrub(scrubber.scrub(text)) == expected  # idempotent


def _reference_scrub(values, text: str) -> str:
    """The scrubber's definition: one case-insensitive pattern of every value, longest first."""
    vals = sorted({v.strip() for v in values if len(v.strip()) >= 2}, key=lambda v: (-len(v), v))
    out = deid._UID.sub("[uid]", text)
    if vals:
        out = re.compile("|".join(deid._value_pattern(v) for v in vals), re.IGNORECASE).sub("[removed]", out)
    return deid._DATE.sub("[date]", out)


def test_scrubber_prefilter_matches_the_full_pattern():
    """Only the values that can occur in a text are tried (speed); the result must be the full
    pattern's, for ASCII and non-ASCII texts and values (Unicode case-insensitive matching: the long s
    matches s, the Kelvin sign k, dotted capital I matches i)."""
    rng = random.Random(0)
    values = sorted(identifying_values(
        name_values=["Moreau^Marta", "O'Neil^Ann-Marie", "Straße^Jürgen", "Kim^Sook", "Ivanova^Ida", "Li^Xi"],
        other_values=["MRN7129384020", "19681213", "A302789346", "84585", "MR4"],
        institution_values=["Riverside Medical Imaging", "Klinikum Süd"]))
    scrubber = PhiScrubber(values)
    words = values + ["t1", "fl3d", "tra", "dyn", "post", "Annotation", "Ida2", "xMR4", "MR45", "sook", "ſook",
                      "\u212aim", "\u0130vanova", "STRASSE", "straße", "MARTA", "marta_", "1.2.840.1.2", "2022-04-07",
                      "_", " ", "-", "^", "Riverside", "riverside medical imaging", "jürgen", "JÜRGEN"]
    for _ in range(3000):
        text = rng.choice(["", " ", "_", "-"]).join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.5:
            text = text.upper() if rng.random() < 0.5 else text.lower()
        assert scrubber.scrub(text) == _reference_scrub(values, text), text
    for text in ("\u212aIM sook", "\u0130VANOVA", "ſook", "Kim"):  # the Unicode case-folding cases
        assert "[removed]" in scrubber.scrub(text), text


def test_coded_values_are_not_name_scrubbed(scrubber):
    assert scrubber.scrub("HFS") == "[removed]"
    assert PhiScrubber.scrub_coded("HFS") == "HFS"


def test_paths_are_scrubbed_per_component(scrubber):
    path = scrubber.scrub_path("Zqxgiven Smith 12.03.1947/SE0004/1.2.840.10008.1.2.3.4/0001_1.2.840.10008.9.9.dcm")
    folder, series, uid_folder, name = path.split("/")
    assert folder.startswith("[removed]~") and len(folder) == len("[removed]~") + 8  # Smith: not in any header
    assert series == "SE0004"  # nothing identifying: unchanged
    assert uid_folder.startswith("[uid]~") and name.startswith("0001_[uid].dcm~")
    other = scrubber.scrub_path("Zqxgiven Smith 12.03.1947/SE0004/1.2.840.10008.1.2.3.4/0001_1.2.840.10008.9.8.dcm")
    assert other != path  # different files stay different in the report
    assert "Smith" not in path and "1947" not in path


def test_deid_key_comes_from_env_then_key_file_then_default_and_empty_file_fails(tmp_path, monkeypatch):
    monkeypatch.delenv(deid.KEY_ENV, raising=False)
    monkeypatch.delenv(deid.KEY_FILE_ENV, raising=False)
    assert deid.resolve_key() == deid.DEFAULT_KEY
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert deid.resolve_key(key_file=key_file) == "s3cret"
    monkeypatch.setenv(deid.KEY_FILE_ENV, str(key_file))
    assert deid.resolve_key() == "s3cret"
    monkeypatch.setenv(deid.KEY_ENV, "from-env")
    assert deid.resolve_key() == "from-env"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(deid.KeyFileError, match="empty"):
        deid.resolve_key(key_file=tmp_path / "empty")


def _convert(args, capsys=None):
    """The real command line in a subprocess (logging set up as a user gets it)."""
    env = {k: v for k, v in os.environ.items() if k not in (deid.KEY_ENV, deid.KEY_FILE_ENV)}
    run = subprocess.run([sys.executable, "-m", "data_prep", "convert", *args, "-j", "1", "--no-progress"],
                         capture_output=True, text=True, env=env, cwd=REPO)
    return run.returncode, run


def test_public_key_warns_on_real_archives_only(tmp_path, dicom_series, monkeypatch, capsys):
    monkeypatch.delenv(deid.KEY_ENV, raising=False)
    monkeypatch.delenv(deid.KEY_FILE_ENV, raising=False)
    dicom_series(tmp_path / "arc" / "s", patient_id="PID-1")
    code, run = _convert([str(tmp_path / "arc"), str(tmp_path / "out")], capsys)
    assert code == 0 and "public default de-identification key" in run.stderr
    key_file = tmp_path / "key"
    key_file.write_text("site-secret\n")
    code, run = _convert([str(tmp_path / "arc"), str(tmp_path / "out2"), "--deid-key-file", str(key_file)], capsys)
    assert code == 0 and "public default" not in run.stderr
    code, run = _convert([str(tmp_path / "arc"), str(tmp_path / "out3"), "--deid-key", "site-secret"], capsys)
    assert "other users of this machine" in run.stderr  # a key on argv is visible in ps
    # the synthetic archive is marked, so the demo runs without the warning
    for f in (tmp_path / "arc" / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.file_meta.ImplementationVersionName = "MEDIMB_SYNTH"
        ds.save_as(f)
    code, run = _convert([str(tmp_path / "arc"), str(tmp_path / "out4")], capsys)
    assert code == 0 and "public default" not in run.stderr


def test_patient_named_like_a_position_keeps_the_position(tmp_path, dicom_series, capsys):
    dicom_series(tmp_path / "arc" / "s", patient_id="PID-1", patient_name="HFS^ZQXGIVEN", description="t1 HFS")
    for f in (tmp_path / "arc" / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientPosition = "HFS"
        ds.save_as(f)
    code, _ = _convert([str(tmp_path / "arc"), str(tmp_path / "out"), "--deid-key", "k"], capsys)
    assert code == 0
    [sidecar] = (tmp_path / "out").glob("sub-*/ses-*/*.json")
    side = json.loads(sidecar.read_text())
    assert side["PatientPosition"] == "HFS"
    assert "HFS" not in side["SeriesDescription"]  # in free text the name is removed


def test_library_warnings_are_scrubbed(tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)  # as with --verbose
    try:
        logging.captureWarnings(False)  # undo an earlier in-process CLI run's capture (pytest records warnings)
        filt = deid.install_log_scrubbing()
        deid.set_log_scrubber(PhiScrubber(["ZQXNAME"]), root=str(tmp_path))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"odd value in {tmp_path}/ZQXNAME/1.2.826.0.1.3680043.8.498.1.dcm", UserWarning)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        for h in root.handlers:
            h.removeFilter(filt)
        logging.captureWarnings(False)
    text = stream.getvalue()
    assert "ARCHIVE/[removed]/[uid]" in text and "ZQXNAME" not in text and str(tmp_path) not in text


def test_report_paths_hide_unknown_words_and_locate_finds_them(tmp_path, dicom_series):
    from data_prep.convert import convert_archive
    from data_prep.locate_command import locate

    arc = tmp_path / "arc"
    dicom_series(arc / "Zqxname, Zqxgiven" / "SE0001", patient_name="HFS^X")  # the folder's name: in no header
    (arc / "Zqxname, Zqxgiven" / "SE0001" / "notes.txt").write_text("junk\n")
    convert_archive(str(arc), str(tmp_path / "out"), key="k", progress=False)
    report = (tmp_path / "out" / "report.json").read_text()
    assert "zqx" not in report.lower()
    [issue] = json.loads(report)["issues"]
    folder, series, name = issue["path"].split("/")
    assert folder.startswith("[folder]~") and series == "SE0001" and name.startswith("[file].txt~")
    assert locate(str(arc), [name], "k") == ["Zqxname, Zqxgiven/SE0001/notes.txt"]
    assert len(locate(str(arc), [folder], "k")) == len(list((arc / "Zqxname, Zqxgiven" / "SE0001").iterdir()))
    assert locate(str(arc), [folder], "another key") == []


def test_no_descriptors_keeps_names_no_header_field_names_out_of_every_output(tmp_path, dicom_series, capsys):
    """A description naming a person whom no header name field names (here PatientName is junk) cannot be
    recognised by the scrubber: by default it reaches the series label; --no-descriptors writes no
    description or protocol text anywhere."""
    dicom_series(tmp_path / "arc" / "s", patient_id="PID-1", patient_name="ANONYMOUS",
                 description="t1 ZQXNAME Zqxgiven")
    for f in (tmp_path / "arc" / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.ProtocolName = "ZQXNAME protocol"
        ds.save_as(f)

    def outputs(folder):
        text = "\n".join(str(p.relative_to(folder)) for p in folder.rglob("*"))
        for p in folder.rglob("*"):
            if p.is_file() and p.suffix in (".json", ".csv"):
                text += p.read_text()
        return text.lower()

    code, _ = _convert([str(tmp_path / "arc"), str(tmp_path / "default"), "--deid-key", "k"], capsys)
    assert code == 0 and "zqxname" in outputs(tmp_path / "default")  # the documented limit
    code, _ = _convert([str(tmp_path / "arc"), str(tmp_path / "plain"), "--deid-key", "k", "--no-descriptors"], capsys)
    assert code == 0 and "zqxname" not in outputs(tmp_path / "plain")
    [sidecar] = (tmp_path / "plain").glob("sub-*/ses-*/*.json")
    side = json.loads(sidecar.read_text())
    assert side["SeriesDescription"] == "" and "ProtocolName" not in side
    assert sidecar.name.endswith("_s001-series.json")
