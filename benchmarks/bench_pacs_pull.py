"""Throughput of ``medimb-prep pull`` against a local Orthanc, next to a plain file copy of the same data.

    .venv/bin/python benchmarks/bench_pacs_pull.py --cases 4 --matrix 256 --slices 64 --work /tmp/bench_pull

Writes a synthetic archive (``medimb-prep synth``), starts a throw-away Orthanc on loopback
(tests/helpers/orthanc.py) and uploads it (not timed). Then, each into an empty folder and timed:

- ``copytree``: a local copy of the archive's DICOM files (disk to disk, no network);
- ``http copy``: the same files served by ``python -m http.server`` on 127.0.0.1 and downloaded one by one
  with one keep-alive ``requests`` session: a plain file copy over loopback;
- ``pull`` over DICOMweb (WADO-RS), DIMSE C-GET and DIMSE C-MOVE (in-process ``data_prep.pacs.pull.pull``,
  the same code as the CLI, no progress bar), and a re-run of the DICOMweb pull (every study complete).

Prints one JSON line: per step seconds, instances, MB and MB/s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from synth_bench_args import fresh_synth_archive, synth_archive_parser  # noqa: E402


def main() -> None:
    args = synth_archive_parser(__doc__).parse_args()

    import requests

    from data_prep.pacs.pull import pull
    from data_prep.pacs.server import parse_server
    from helpers.dicom import dicom_files
    from helpers.orthanc import find_orthanc, free_port, start_orthanc

    w = args.work
    archive, _ = fresh_synth_archive(args)
    files = dicom_files(archive)
    binary, plugin, why = find_orthanc()
    if plugin is None:
        raise SystemExit(why)
    server = start_orthanc(binary, plugin, base_dir=str(w))
    results: dict = {"cases": args.cases, "matrix": args.matrix, "slices": args.slices}
    try:
        ids = server.upload_folder(archive)
        studies = server.study_uids()
        kept = set(ids)
        # the files Orthanc accepted (the synthetic archive's truncated junk file is not one of them)
        files = [p for p in files if p.stat().st_size > 1000]
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        results["instances_on_server"] = len(kept)
        results["source_files"] = len(files)
        results["source_mb"] = round(total_mb, 1)

        def record(name, seconds, n, mb):
            results[name] = {"s": round(seconds, 2), "instances": n, "mb": round(mb, 1),
                             "mb_per_s": round(mb / seconds, 1) if seconds else None}

        start = time.perf_counter()
        dest = w / "copytree"
        for p in files:
            target = dest / p.relative_to(archive)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
        record("copytree", time.perf_counter() - start, len(files), total_mb)

        port = free_port()
        http = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                 "--directory", str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    requests.get(f"http://127.0.0.1:{port}/", timeout=1)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            dest = w / "httpcopy"
            start = time.perf_counter()
            with requests.Session() as session:
                for p in files:
                    rel = p.relative_to(archive).as_posix()
                    r = session.get(f"http://127.0.0.1:{port}/{rel}", timeout=60)
                    r.raise_for_status()
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(r.content)
            record("http_copy", time.perf_counter() - start, len(files), total_mb)
        finally:
            http.terminate()
            http.wait(timeout=10)

        for name, text in (("pull_dicomweb", server.dicomweb_server), ("pull_cget", server.dimse_server("get")),
                           ("pull_cmove", server.dimse_server("move"))):
            spec = parse_server(text, credentials=server.credentials)
            start = time.perf_counter()
            r = pull(spec, w / name, study_uids=studies, progress=False)
            seconds = time.perf_counter() - start
            assert r.ok and r.received == len(kept), (name, r.counts(), r.received)
            record(name, seconds, r.received, r.bytes / 1e6)
        start = time.perf_counter()
        r = pull(parse_server(server.dicomweb_server, server.credentials), w / "pull_dicomweb", study_uids=studies,
                 progress=False)
        assert r.ok and r.received == 0
        results["rerun_complete_s"] = round(time.perf_counter() - start, 2)
    finally:
        server.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
