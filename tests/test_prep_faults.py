"""Faults around a conversion: a locked or unwritable OUT, an interrupted run, an unexpected error in
one series, the accounting of every archive file in report.json."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import data_prep.convert as convert_module
from data_prep import cli
from data_prep.convert import convert_archive, output_lock


@pytest.fixture
def archive(tmp_path, dicom_series):
    arc = tmp_path / "arc"
    for n in range(3):
        dicom_series(arc / f"s{n}", patient_id=f"PID-{n}", series_number=n + 1, description=f"series {n}",
                     shape=(4, 6, 5), seed=n)
    (arc / "notes.txt").write_text("not dicom\n")
    return arc


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _accounted(report: dict) -> int:
    reported = {i["path"] for i in report["issues"] if i.get("path") and i["action"] in ("skipped", "failed", "dropped")}
    return sum(s["files"] for s in report["series"]) + len(reported)


def test_report_accounts_for_every_file(archive, tmp_path):
    result = convert_archive(str(archive), str(tmp_path / "out"), progress=False)
    report = _report(tmp_path / "out")
    assert report["complete"] and report["archive_files"] == 16 == result.n_files
    assert [s["status"] for s in report["series"]] == ["converted"] * 3
    assert _accounted(report) == report["archive_files"]


def test_second_convert_into_the_same_out_refuses_and_touches_nothing(archive, tmp_path, capsys):
    out = tmp_path / "out"
    with output_lock(str(out)):
        code = cli.main(["convert", str(archive), str(out), "-j", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "another medimb-prep convert" in err and "Traceback" not in err
    assert not (out / "report.json").exists() and not list(out.rglob("*.nii.gz"))
    # once the first run is gone, the lock is free again
    assert cli.main(["convert", str(archive), str(out), "-j", "1", "--no-progress"]) == 0


def test_unwritable_out_is_a_one_line_error(archive, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(convert_module.os, "open", read_only)  # the lock file is the first write
    code = cli.main(["convert", str(archive), str(tmp_path / "out"), "-j", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.endswith("Read-only file system") and "\n" not in err


def test_an_unexpected_error_in_one_series_is_reported_and_the_rest_converts(archive, tmp_path, monkeypatch):
    real = convert_module.to_volume
    calls = []

    def flaky(stacks, frames):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("simulated")
        return real(stacks, frames)

    monkeypatch.setattr(convert_module, "to_volume", flaky)
    result = convert_archive(str(archive), str(tmp_path / "out"), progress=False)
    report = _report(tmp_path / "out")
    assert len(result.rows) == 2 and result.failed == 1
    [failed] = [i for i in report["issues"] if i["reason"] == "internal_error"]
    assert "MemoryError" in failed["detail"] and failed["series"]
    assert sorted(s["status"] for s in report["series"]) == ["converted", "converted", "failed"]
    assert _accounted(report) == report["archive_files"]


def test_interrupted_run_still_writes_its_report_and_resumes(archive, tmp_path, monkeypatch):
    real = convert_module.convert_series
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "convert_series", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert_archive(str(archive), str(out), progress=False)
    report = _report(out)
    assert report["complete"] is False and report["series_converted"] == 1
    monkeypatch.setattr(convert_module, "convert_series", real)
    again = convert_archive(str(archive), str(out), progress=False)
    assert (again.resumed, again.converted) == (1, 2) and _report(out)["complete"]


def test_a_half_written_series_leaves_no_files(archive, tmp_path, monkeypatch):
    real = convert_module.build_sidecar

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(convert_module, "build_sidecar", disk_full)  # after the first .nii.gz is written
    result = convert_archive(str(archive), str(tmp_path / "out"), progress=False)
    assert result.rows == [] and {i.reason for i in result.issues} >= {"write_error"}
    assert not list((tmp_path / "out").rglob("*.nii.gz"))
    monkeypatch.setattr(convert_module, "build_sidecar", real)


def test_interrupted_scan_still_leaves_a_report(archive, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "scan_archive", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_archive(str(archive), str(tmp_path / "out"), progress=False)
    assert _report(tmp_path / "out") == {"complete": False, "interrupted_during": "scan"}
