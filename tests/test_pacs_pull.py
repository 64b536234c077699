"""`medimb-prep pull` against a real Orthanc (tests/helpers/orthanc.py), and convert's --link-table.

The synthetic archive (2 cases) is uploaded once; it is pulled over DICOMweb and DIMSE (C-GET, C-MOVE),
by UID and by query, cut half-way and resumed, and the server's refusals come back as one-line errors.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from data_prep import cli
from data_prep.pacs import links
from data_prep.pacs.pull import FAULT_ENV, pull
from data_prep.pacs.server import (Credentials, PacsError, load_credentials, open_server, parse_server,
                                   study_label, uid_hash)
from data_prep.scan import PULL_STATE_DIR
from helpers.dicom import dicom_files
from helpers.orthanc import free_port
from helpers.paths import REPO

HEX = re.compile(r"^[0-9a-f]{16}(\.dcm)?$")


@pytest.fixture(scope="module")
def source(orthanc, tmp_path_factory):
    """The synthetic archive (its own seed), uploaded to the shared Orthanc: paths, UIDs, dates. Other test
    modules use the same server (under xdist, interleaved): nothing here clears it or counts its studies."""
    root = tmp_path_factory.mktemp("synth")
    assert cli.main(["synth", str(root / "synth"), "--cases", "2", "--matrix", "24", "--slices", "8",
                     "--post-phases", "2", "--seed", "16", "-j", "1"]) == 0
    archive = root / "synth" / "archive"
    ids = orthanc.upload_folder(archive)
    by_sop, studies = {}, {}
    for p in dicom_files(archive):
        try:
            ds = pydicom.dcmread(p)
            ds.PixelData  # noqa: B018 - the truncated junk file has none: it is not on the server
        except Exception:
            continue
        by_sop[ds.SOPInstanceUID] = p
        studies.setdefault(ds.StudyInstanceUID, str(ds.StudyDate))
    assert len(ids) == len(by_sop) > 0
    return SimpleNamespace(root=root, archive=archive, by_sop=by_sop, studies=studies,
                           uids=sorted(studies))


@pytest.fixture
def creds_env(orthanc, monkeypatch):
    for k, v in orthanc.credentials_env().items():
        monkeypatch.setenv(k, v)
    for k in ("MEDIMB_PACS_TOKEN", "MEDIMB_PACS_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)


def _pulled(archive: Path) -> dict[str, Path]:
    """SOPInstanceUID -> file of a pulled archive (and checks that no name holds a UID)."""
    out = {}
    for p in archive.rglob("*"):
        rel = p.relative_to(archive)
        if rel.parts[0] == PULL_STATE_DIR or p.name.endswith(".part"):  # state, or a killed run's leftover
            continue
        assert all(HEX.match(part) for part in rel.parts), rel
        if p.is_file():
            out[pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID] = p
    return out


def _report(archive: Path) -> dict:
    return json.loads((archive / PULL_STATE_DIR / "report.json").read_text())


def _same_instances(pulled: dict[str, Path], source, study_uids=None) -> None:
    want = {sop for sop, p in source.by_sop.items()
            if study_uids is None or pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID in study_uids}
    assert set(pulled) == want
    for sop, p in pulled.items():
        a, b = pydicom.dcmread(p), pydicom.dcmread(source.by_sop[sop])
        assert a.PixelData == b.PixelData and a.PatientID == b.PatientID and a.ImagePositionPatient == \
            b.ImagePositionPatient


# ------------------------------------------------------------------------------------ pull, convert, link
def test_pull_dicomweb_by_uid_then_convert_with_link_table(orthanc, source, creds_env, tmp_path, capsys):
    archive = tmp_path / "pulled"
    assert cli.main(["pull", orthanc.dicomweb_server, str(archive), "--study", *source.uids, "--no-progress"]) == 0
    assert stat.S_IMODE(archive.stat().st_mode) == 0o700
    pulled = _pulled(archive)
    _same_instances(pulled, source)
    report = _report(archive)
    assert report["complete"] and report["by_status"] == {"complete": 2}
    assert report["received_instances"] == len(source.by_sop)
    for uid in source.uids:  # markers name the study by hash, hold its UID, list every file
        marker = json.loads((archive / PULL_STATE_DIR / "studies" / f"{study_label(uid)}.json").read_text())
        assert marker["study_uid"] == uid and marker["complete"]
    text = capsys.readouterr()
    assert "2 studies: 2 complete" in text.out and not any(u in text.out + text.err for u in source.uids)

    # a dry run by UID lists each study's folder name and instance count
    assert cli.main(["pull", orthanc.dicomweb_server, str(archive), "--study", source.uids[0], "--dry-run"]) == 0
    n_first = sum(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == source.uids[0]
                  for p in source.by_sop.values())
    assert f"{study_label(source.uids[0])}  -        {n_first:>6} instances" in capsys.readouterr().out

    # a re-run retrieves nothing
    assert cli.main(["pull", orthanc.dicomweb_server, str(archive), "--study", *source.uids, "--no-progress"]) == 0
    assert _report(archive)["by_status"] == {"already_complete": 2} and _report(archive)["received_instances"] == 0

    # convert the pulled archive: the same volumes as from the source archive, and the link table
    table = tmp_path / "private" / "links.csv"
    out_pulled, out_source = tmp_path / "nii_pulled", tmp_path / "nii_source"
    assert cli.main(["convert", str(archive), str(out_pulled), "-j", "1", "--no-progress",
                     "--link-table", str(table)]) == 0
    assert cli.main(["convert", str(source.archive), str(out_source), "-j", "1", "--no-progress"]) == 0
    m_pulled = (out_pulled / "manifest.csv").read_text().splitlines()
    assert m_pulled == (out_source / "manifest.csv").read_text().splitlines()
    import nibabel as nib

    rows = [r.split(",") for r in m_pulled[1:]]
    for r in rows:
        path = next(x for x in r if x.endswith(".nii.gz"))
        a, b = nib.load(out_pulled / path), nib.load(out_source / path)
        assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.allclose(a.affine, b.affine)
    assert not any(p.name == "links.csv" for p in out_pulled.rglob("*"))
    # the pull's bookkeeping is not read as images: nothing reported (the source's junk files, reported there,
    # are not on the server)
    summary = json.loads((out_pulled / "report.json").read_text())["summary"]
    assert summary["by_reason"] == {}, summary
    assert "not_dicom" in json.loads((out_source / "report.json").read_text())["summary"]["by_reason"]
    assert "report.json" not in {p.name for p in archive.iterdir()}  # convert wrote nothing into the archive

    # the link table: private, one entry per output, each slice's source instance in slice order
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    linked = links.read_link_table(table)
    assert set(linked) == {next(x for x in r if x.endswith(".nii.gz")) for r in rows}
    for output, item in linked.items():
        img = nib.load(out_pulled / output)
        n_vol = img.shape[3] if img.ndim == 4 else 1
        assert {i.volume for i in item.instances} == set(range(n_vol))
        assert item.study_uid in source.uids
        for v in range(n_vol):
            sops = item.sop_uids(v)
            assert len(sops) == img.shape[2]
            # slice k of the NIfTI is where the source instance lies: RAS affine @ (0, 0, k) == its LPS position
            for k, sop in enumerate(sops):
                ds = pydicom.dcmread(source.by_sop[sop], stop_before_pixels=True)
                ras = img.affine @ np.array([0.0, 0.0, k, 1.0])
                lps = np.array([-ras[0], -ras[1], ras[2]])
                assert np.allclose(lps, np.array(ds.ImagePositionPatient, float), atol=1e-3)
                assert ds.SeriesInstanceUID in item.series_uids and ds.StudyInstanceUID == item.study_uid


def test_link_table_refused_inside_output_and_merged_on_resume(source, tmp_path, capsys):
    out = tmp_path / "nii"
    code = cli.main(["convert", str(source.archive), str(out), "-j", "1", "--no-progress",
                     "--link-table", str(out / "sub" / "links.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "must not be inside the de-identified output" in err
    table = tmp_path / "links.csv"
    assert cli.main(["convert", str(source.archive), str(out), "-j", "1", "--no-progress",
                     "--link-table", str(table)]) == 0
    first = table.read_text()
    # an entry of another output (an earlier conversion into the same table) is kept; a resumed run rewrites
    # the same rows for its (resumed) outputs
    extra = "sub-x,ses-1,s001,sub-x/ses-1/other.nii.gz,image,0,0,1.2.3,1.2.3.4,1.2.3.4.5,\n"
    table.write_text(first + extra)
    os.chmod(table, 0o644)
    assert cli.main(["convert", str(source.archive), str(out), "-j", "1", "--no-progress",
                     "--link-table", str(table)]) == 0
    merged = table.read_text().splitlines()
    assert sorted(merged[1:]) == sorted(first.splitlines()[1:] + [extra.strip()])
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    assert "sub-x/ses-1/other.nii.gz" in links.read_link_table(table)
    table.write_text("a,b\n1,2\n")
    assert cli.main(["convert", str(source.archive), str(out), "-j", "1", "--no-progress",
                     "--link-table", str(table)]) == 2
    assert "not a medimb link table" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ DIMSE and queries
@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_pull_dimse(orthanc, source, tmp_path, retrieve):
    spec = parse_server(orthanc.dimse_server(retrieve), credentials=None)
    assert spec.retrieve == retrieve
    result = pull(spec, tmp_path / "a", study_uids=source.uids, progress=False)
    assert result.ok and result.counts() == {"complete": 2}
    pulled = _pulled(tmp_path / "a")
    _same_instances(pulled, source)
    for sop, p in pulled.items():  # DIMSE files are the data set exactly as stored (after each file's meta)
        assert _dataset_bytes(p) == _dataset_bytes(source.by_sop[sop])


def _dataset_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after its preamble and file meta group (128 + 4 bytes, the 12-byte group length
    element, then the group length's worth)."""
    meta = pydicom.filereader.read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def test_pull_by_query(orthanc, source, creds_env, tmp_path, capsys):
    """From the date of our later study on: that study, never the earlier one (other modules' studies on the
    shared server may match too)."""
    early, late = sorted(source.studies, key=source.studies.get)
    assert source.studies[early] < source.studies[late]
    query = ["--modality", "mr", "--date", f"{source.studies[late]}-", "--description", "*breast*"]
    assert cli.main(["pull", orthanc.dicomweb_server, str(tmp_path / "x"), *query, "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{study_label(late)}  MR +\d+ instances$", listed, re.M)
    assert study_label(early) not in listed
    assert not (tmp_path / "x").exists()  # a dry run writes nothing
    assert cli.main(["pull", orthanc.dimse_server(), str(tmp_path / "a"), *query, "--no-progress"]) == 0
    assert (tmp_path / "a" / study_label(late)).is_dir() and not (tmp_path / "a" / study_label(early)).exists()
    ours = {sop: p for sop, p in _pulled(tmp_path / "a").items() if sop in source.by_sop}
    _same_instances(ours, source, study_uids=[late])
    # a description nothing has: nothing to pull, exit 1
    assert cli.main(["pull", orthanc.dicomweb_server, str(tmp_path / "b"), "--modality", "MR",
                     "--description", "*knee*", "--no-progress"]) == 1
    assert "no study matched" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ cut and resume
def test_pull_killed_half_way_resumes(orthanc, source, tmp_path):
    """SIGKILL-like death after 10 instances (mid-write of the 11th): nothing marked complete; a re-run
    (here over DIMSE C-GET, instance by instance for the cut series) completes it."""
    archive = tmp_path / "a"
    env = dict(os.environ, **orthanc.credentials_env(), **{FAULT_ENV: "10"}, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "data_prep", "pull", orthanc.dicomweb_server, str(archive),
           "--study", *source.uids, "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 137
    assert not list(archive.glob(f"{PULL_STATE_DIR}/studies/*.json"))  # no study marked complete
    assert len(list(archive.rglob(".*.part"))) == 1 and len(_pulled(archive)) == 10
    # the re-run, over another protocol: the 10 are kept, the rest arrive
    result = pull(parse_server(orthanc.dimse_server()), archive, study_uids=source.uids, progress=False)
    assert result.ok and not list(archive.rglob(".*.part"))
    assert sum(s.present for s in result.studies) == 10
    assert result.received == len(source.by_sop) - 10
    _same_instances(_pulled(archive), source)


def test_pull_interrupted_in_process_is_not_marked(orthanc, source, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) from inside the C-GET storage handler after 5 instances."""
    import data_prep.pacs.pull as pull_module

    original = pull_module._Writer.__call__
    seen = []

    def interrupting(self, ds):
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(1)
        original(self, ds)

    monkeypatch.setattr(pull_module._Writer, "__call__", interrupting)
    archive = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        pull(parse_server(orthanc.dimse_server()), archive, study_uids=source.uids, progress=False)
    report = _report(archive)
    assert not report["complete"]
    assert [s["status"] for s in report["studies"]] == ["interrupted", "not_started"]
    assert not list(archive.glob(f"{PULL_STATE_DIR}/studies/*.json"))
    monkeypatch.setattr(pull_module._Writer, "__call__", original)
    assert pull(parse_server(orthanc.dimse_server()), archive, study_uids=source.uids, progress=False).ok
    _same_instances(_pulled(archive), source)


# ------------------------------------------------------------------------------------ errors
def _one_line_error(capsys, code: int, expected_code: int, *needles: str, secret: str = "") -> str:
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert code == expected_code, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    if secret:
        assert secret not in cap.out + cap.err
    return err


def test_server_errors_are_one_line(orthanc, source, creds_env, tmp_path, capsys, monkeypatch):
    uid = source.uids[0]
    def run(server, *more):
        return cli.main(["pull", server, str(tmp_path / "a"), "--study", uid, "--no-progress", *more])

    port = free_port()
    for server in (f"dimse://ORTHANC@127.0.0.1:{port}", f"dicomweb+http://127.0.0.1:{port}/dicom-web"):
        err = _one_line_error(capsys, run(server), 2, "cannot reach", f"127.0.0.1:{port}")
        assert len(err.splitlines()) == 1
    err = _one_line_error(capsys, run(orthanc.dimse_server(called_aet="WRONGAET")), 2, "refused the association")
    assert len(err.splitlines()) == 1
    import socket

    with socket.socket() as blocker:  # our C-MOVE port taken by another program
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # an earlier C-MOVE's port may be in TIME_WAIT
        blocker.bind(("127.0.0.1", orthanc.move_port))
        blocker.listen()
        _one_line_error(capsys, run(orthanc.dimse_server("move")), 2, "cannot listen on port", "for C-MOVE")
    not_allowed = orthanc.dimse_server().replace("calling=MEDIMB", "calling=STRANGER")
    assert len(_one_line_error(capsys, run(not_allowed), 2, "refused C-FIND", "STRANGER").splitlines()) == 1
    monkeypatch.setenv("MEDIMB_PACS_PASSWORD", "wrong-password-123")
    err = _one_line_error(capsys, run(orthanc.dicomweb_server), 2, "refused the login", "HTTP 401",
                          secret="wrong-password-123")
    assert len(err.splitlines()) == 1
    monkeypatch.delenv("MEDIMB_PACS_USER")
    monkeypatch.delenv("MEDIMB_PACS_PASSWORD")
    _one_line_error(capsys, run(orthanc.dicomweb_server), 2, "no credentials given")
    # a credentials file works (and its password is never shown)
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"user": orthanc.user, "password": orthanc.password}))
    cred.chmod(0o600)
    assert run(orthanc.dicomweb_server, "--credentials-file", str(cred)) == 0
    assert orthanc.password not in capsys.readouterr().out


def test_unknown_study_fails_alone(orthanc, source, tmp_path, capsys):
    """An unknown study is reported (exit 1, one line naming its hash), not marked; the other completes."""
    unknown = "1.2.826.0.1.3680043.8.498.1"
    archive = tmp_path / "a"
    for server in (orthanc.dimse_server(), orthanc.dicomweb_server):
        studies = tmp_path / "studies.txt"  # the same two studies, once as a file
        studies.write_text(f"# to pull\n{unknown}\n\n{source.uids[0]}  # the known one\n")
        selection = ["--studies-file", str(studies)] if server.startswith("dicomweb") else \
            ["--study", unknown, source.uids[0]]
        with pytest.MonkeyPatch.context() as mp:
            for k, v in orthanc.credentials_env().items():
                mp.setenv(k, v)
            code = cli.main(["pull", server, str(archive), *selection, "--no-progress"])
        cap = capsys.readouterr()
        assert code == 1
        assert cap.err.strip().splitlines() == [f"medimb-prep pull: study {study_label(unknown)}: unknown_study: "
                                                f"not found on {parse_server(server).display()}"]
        statuses = {s["study"]: s["status"] for s in _report(archive)["studies"]}
        assert statuses[study_label(unknown)] == "unknown_study"
        assert statuses[study_label(source.uids[0])] in ("complete", "already_complete")
        assert not (archive / PULL_STATE_DIR / "studies" / f"{study_label(unknown)}.json").exists()


def test_unregistered_move_destination(orthanc, source, tmp_path, capsys):
    """C-MOVE to an AE title the server does not know: the study fails with a hint, nothing is marked."""
    server = orthanc.dimse_server("move").replace("move_dest=MEDIMB", "move_dest=NOBODY")
    code = cli.main(["pull", server, str(tmp_path / "a"), "--study", source.uids[0], "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "failed" in err and "is NOBODY registered at the PACS as a move destination" in err
    assert not (tmp_path / "a" / PULL_STATE_DIR / "studies").exists()


def test_bad_arguments(tmp_path, capsys):
    for argv, needle in [
        (["ftp://x", "--study", "1.2.3"], "unknown server"),
        (["dimse://127.0.0.1:104", "--study", "1.2.3"], "no called AE title"),
        (["dimse://PACS@host", "--study", "1.2.3"], "no port"),
        (["dicomweb+http://u:secretpw@host/dicom-web", "--study", "1.2.3"], "not in the server URL"),
        (["dimse://PACS@host:104?retrieve=move", "--study", "1.2.3"], "store_port"),
        (["dimse://PACS@host:104?calling=MUCH_TOO_LONG_AE_TITLE", "--study", "1.2.3"], "not a valid AE title"),
        (["dimse://PACS@host:104?colour=red", "--study", "1.2.3"], "unknown parameter"),
        (["dimse://PACS@host:104"], "say which studies"),
        (["dimse://PACS@host:104", "--study", "1.2.x"], "not a DICOM UID"),
        (["dimse://PACS@host:104", "--study", "1.2.3", "--modality", "MR"], "not both"),
        (["dimse://PACS@host:104", "--date", "2024"], "--date"),
        (["dimse://PACS@host:104", "--description", "breast*"], "needs --modality or --date"),
    ]:
        code = cli.main(["pull", argv[0], str(tmp_path / "a"), *argv[1:]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and needle in err and len(err.splitlines()) == 1, (argv, err)
        assert "secretpw" not in err
    assert not (tmp_path / "a").exists()


def test_credentials_sources(tmp_path):
    assert load_credentials(env={}) is None
    c = load_credentials(env={"MEDIMB_PACS_USER": "u", "MEDIMB_PACS_PASSWORD": "pw-secret"})
    assert (c.user, c.password) == ("u", "pw-secret") and "pw-secret" not in repr(c) + str(c)
    assert load_credentials(env={"MEDIMB_PACS_TOKEN": "tok"}).token == "tok"
    f = tmp_path / "c.txt"
    f.write_text("alice:pa:ss\n")
    f.chmod(0o600)
    assert load_credentials(env={"MEDIMB_PACS_CREDENTIALS_FILE": str(f)}) == Credentials("alice", "pa:ss", "", str(f))
    f.write_text("no separator")
    with pytest.raises(PacsError, match="user:password"):
        load_credentials(f)
    with pytest.raises(PacsError, match="MEDIMB_PACS_USER is not"):
        load_credentials(env={"MEDIMB_PACS_PASSWORD": "x"})
    spec = parse_server("dimse://PACS@10.0.0.5:11112?calling=ME&move_dest=ME2&store_port=104",
                        Credentials("u", "pw-secret"))
    assert (spec.retrieve, spec.move_dest, spec.calling_aet, spec.store_port) == ("move", "ME2", "ME", 104)
    assert "pw-secret" not in repr(spec) and spec.display() == "dimse://PACS@10.0.0.5:11112"
    assert parse_server("https://pacs.example.org/dicom-web/").url == "https://pacs.example.org:443/dicom-web"
    assert uid_hash("1.2.3") == uid_hash(" 1.2.3 ") and len(uid_hash("1.2.3")) == 16


def test_echo_both_protocols(orthanc):
    for server in (orthanc.dicomweb_server, orthanc.dimse_server()):
        with open_server(parse_server(server, orthanc.credentials)) as s:
            s.echo()


def test_docs_cover_statuses_columns_and_options():
    """docs/pacs.md documents every report status, link-table column and pull option the code has."""
    from data_prep.cli import build_parser
    from data_prep.pacs.pull import STATUSES

    text = (REPO / "docs" / "pacs.md").read_text()
    for status in STATUSES:
        assert f"| `{status}` |" in text, status
    for column in links.COLUMNS:
        assert f"`{column}`" in text, column
    sub = build_parser(["pull"])._subparsers._group_actions[0].choices["pull"]
    for action in sub._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in text, flag


def test_verbose_output_holds_no_phi(orthanc, source, tmp_path):
    """--verbose shows the libraries' request logs, scrubbed: no UID, name, ID or birth date of the study."""
    ds = pydicom.dcmread(next(iter(source.by_sop.values())), stop_before_pixels=True)
    env = dict(os.environ, **orthanc.credentials_env(), PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "data_prep", "--verbose", "pull", orthanc.dimse_server(),
                        str(tmp_path / "a"), "--study", ds.StudyInstanceUID, "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "DEBUG" in out, out[-2000:]
    family = str(ds.PatientName).split("^")[0]
    for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, family, ds.PatientID,
                  ds.PatientBirthDate, orthanc.password):
        assert value and value not in out, value


def test_qido_paging(orthanc, source, monkeypatch):
    """Queries page through results (servers cap their answers): with 4 per page, every instance once."""
    import data_prep.pacs.server as server_module

    monkeypatch.setattr(server_module, "QIDO_PAGE", 4)
    with open_server(parse_server(orthanc.dicomweb_server, orthanc.credentials)) as s:
        for uid in source.uids:
            refs = s.find_instances(uid)
            want = {sop for sop, p in source.by_sop.items()
                    if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == uid}
            assert len(refs) == len(want) > 4 and {r.sop_uid for r in refs} == want
        assert set(source.uids) <= {st["StudyInstanceUID"] for st in s.find_studies({"ModalitiesInStudy": "MR"})}
