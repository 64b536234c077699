"""Benchmark: medimb-prep convert vs dcm2niix on one synthetic archive, in one run.

    .venv/bin/python benchmarks/bench_prep.py --cases 90 --workers 2

Writes a synthetic archive (``medimb-prep synth``; >= 100 series / 10,000 slices at the default
size), then converts it with dcm2niix (internal zlib gzip, at its default level 6 and at level 1) and
with ``medimb-prep convert`` (``--workers`` processes, gzip level 1), each as a child process.
Reports wall time, CPU time (user + sys of the converter and the workers it waited for: less
sensitive than wall time to other load on the machine), slices/s, the ratio to dcm2niix, the size of
the .nii.gz files written, and peak memory (psutil, polled every 20 ms): the largest single process,
the largest worker (child) process, and the summed RSS of the whole process tree (which counts pages
that forked workers share with the parent more than once).
``--memory-cases`` adds a second, smaller archive to show that peak memory does not grow with the
archive. ``--archive FOLDER`` (repeatable) measures existing archives instead, e.g. the shared vendor
corpora; ``--repeats N`` runs every measurement N times in a row (one table row per repeat). Prints a
Markdown table for docs/benchmarks.md. CPU is shared: note ``uptime``.

    .venv/bin/python benchmarks/bench_prep.py --repeats 3 --archive ../shared/data/dicom_qa/dcm_qa \
        --archive ../shared/data/dicom_qa/dcm_qa_fmap --archive ../shared/data/dicom_qa/dcm_qa_philips_dwi
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``; wall time, peak tree RSS (MiB, polled) and the exit status."""
    log = tempfile.TemporaryFile()  # not a pipe: a chatty child would block on a full pipe buffer
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak = single = worker = 0
    while proc.poll() is None:
        try:
            children = ps.children(recursive=True)
            rss = [p.memory_info().rss for p in [ps] + children]
            peak, single = max(peak, sum(rss)), max(single, max(rss))
            worker = max([worker] + [c.memory_info().rss for c in children])
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and the workers it waited for
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    log.seek(0)
    out = log.read().decode(errors="replace")
    log.close()
    return {"wall_s": wall, "cpu_s": cpu, "tree_peak_mib": peak / 2**20, "rc": proc.returncode,
            "max_process_mib": single / 2**20, "max_worker_mib": worker / 2**20, "output_tail": out[-400:]}


def synth(out: Path, cases: int, seed: int) -> dict:
    if not (out / "synth.json").exists():
        subprocess.run([str(VENV_BIN / "medimb-prep"), "synth", str(out), "--cases", str(cases), "--seed", str(seed)],
                       check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "synth.json").read_text())


def count_slices(archive: Path) -> int:
    """Image slices = DICOM files the converter plans to read (header scan, not timed)."""
    from data_prep.scan import scan_archive

    res = scan_archive(str(archive), workers=2, progress=False)
    return sum(p.n_slices for p in res.plans)


def bench(archive: Path, work: Path, workers: int) -> dict:
    dcm2niix = str(VENV_BIN / "dcm2niix") if (VENV_BIN / "dcm2niix").exists() else "dcm2niix"
    results = {}
    for name, level in (("dcm2niix -z i (level 6, default)", "6"), ("dcm2niix -z i -1", "1")):
        out = work / f"d2n{level}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        results[name] = run_measured([dcm2niix, "-z", "i", f"-{level}", "-b", "y", "-f", "%j_%s_%t",
                                      "-o", str(out), str(archive)])
        results[name]["nii_mb"] = nii_megabytes(out)
    out = work / "medimb"
    shutil.rmtree(out, ignore_errors=True)
    name = f"medimb-prep convert -j {workers}"
    results[name] = run_measured(
        [str(VENV_BIN / "medimb-prep"), "convert", str(archive), str(out), "--workers", str(workers), "--no-progress"])
    results[name]["nii_mb"] = nii_megabytes(out)
    return results


def nii_megabytes(folder: Path) -> float:
    """Total size of the .nii.gz files written (MB, 10^6 bytes): the compression each converter did."""
    return sum(p.stat().st_size for p in folder.rglob("*.nii.gz")) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=90)
    ap.add_argument("--memory-cases", type=int, default=0, help="also measure a smaller archive (memory scaling)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--archive", action="append", default=[], help="measure this existing archive (repeatable)")
    ap.add_argument("--repeats", type=int, default=1, help="measure every converter this many times in a row")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args(argv)
    tmp = None if args.work else tempfile.mkdtemp(prefix="bench_prep_")
    work = Path(args.work or tmp)
    try:
        print(f"uptime before: {os.getloadavg()}")
        archives = [(Path(a).name, Path(a), None) for a in args.archive]
        if not archives:
            for cases in [args.cases] + ([args.memory_cases] if args.memory_cases else []):
                info = synth(work / f"synth{cases}", cases, args.seed)
                archives.append((f"synth{cases}", work / f"synth{cases}" / "archive",
                                 f"{cases} cases, {info['series']} series, {info['dicom_files']} DICOM files"))
        for name, archive, what in archives:
            slices = count_slices(archive)
            print(f"\narchive {name}: {what or archive}, {slices} image slices; load {os.getloadavg()}")
            print("| repeat | converter | wall (s) | CPU user+sys (s) | slices/s | wall / dcm2niix -1 | wall / dcm2niix default | "
                  "peak RSS, largest process (MiB) | peak RSS, largest worker (MiB) | peak RSS, process tree (MiB) | "
                  ".nii.gz written (MB) | exit |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for rep in range(1, args.repeats + 1):
                res = bench(archive, work / f"run_{name}", args.workers)
                ref = res["dcm2niix -z i -1"]["wall_s"]
                ref6 = res["dcm2niix -z i (level 6, default)"]["wall_s"]
                for conv, r in res.items():
                    print(f"| {rep} | {conv} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {slices / r['wall_s']:.0f} | "
                          f"{r['wall_s'] / ref:.2f} | {r['wall_s'] / ref6:.2f} | {r['max_process_mib']:.0f} | "
                          f"{r['max_worker_mib']:.0f} | {r['tree_peak_mib']:.0f} | {r['nii_mb']:.1f} | {r['rc']} |")
            print(f"load after: {os.getloadavg()}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
