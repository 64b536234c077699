"""Convert a scanned archive: one process-pool task per series (memory bounded by one series).

Layout (docs/architecture.md)::

    OUT/sub-<pseudonym>/ses-<n>/sub-<pseudonym>_ses-<n>_<series>[_phase-NN|_sub-NN|_4d].nii.gz (+ .json)
    OUT/manifest.csv   one row per output volume (columns: :data:`MANIFEST_COLUMNS`)
    OUT/report.json    every skipped/failed file or series with a reason (data_prep.report.REASONS)

Resumable: every file is written atomically, and a series is marked done (``OUT/.medimb-prep/done/
<task id>.json``, holding its manifest rows) only after all its outputs exist. A re-run skips
done series, redoes interrupted ones and removes temporary files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import deid
from data_prep.geometry import voxel_sizes
from data_prep.io import GZIP_LEVEL, remove_partial_files, write_json_atomic, write_nifti_atomic, write_text_atomic
from data_prep.pixels import PixelError, read_frames, to_volume
from data_prep.report import Issue, summarize
from data_prep.scan import ScanResult, SeriesPlan, scan_archive
from data_prep.sidecar import build_sidecar

log = logging.getLogger("data_prep.convert")

MANIFEST_COLUMNS = [
    "subject", "session", "series", "series_number", "description", "modality", "phase", "phase_time_s",
    "kind", "shape", "spacing", "path", "sidecar",
]
STATE_DIR = ".medimb-prep"
#: fault injection for tests: the process dies (os._exit) in the middle of this many-th volume write
FAULT_ENV = "MEDIMB_PREP_FAULT_AT_WRITE"


@dataclass(frozen=True)
class ConvertOptions:
    """What to write besides one 3D volume per series/phase."""

    dce_4d: bool = False      # also a 4D file of all DCE phases, PhaseTimes in its sidecar
    subtract: bool = False    # also post-minus-pre float32 volumes for every post-contrast phase
    compresslevel: int = GZIP_LEVEL


@dataclass
class ConvertResult:
    rows: list[dict]
    issues: list[Issue]
    converted: int
    resumed: int
    failed: int
    n_files: int

    @property
    def exit_ok(self) -> bool:
        return bool(self.rows)


_writes = 0


def _maybe_fault(tmp_target: Path) -> None:
    """Test hook: simulate a kill in the middle of writing a volume."""
    global _writes
    at = os.environ.get(FAULT_ENV)
    if not at:
        return
    _writes += 1
    if _writes == int(at):
        partial = tmp_target.parent / f".{tmp_target.name}.killed.part"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"\x1f\x8b\x08partial")
        os._exit(137)


def _fmt(values) -> str:
    return "x".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values)


def convert_series(plan: SeriesPlan, root: str, out: str, options: ConvertOptions,
                   scrub_values: tuple = ()) -> tuple[list[dict], list[Issue]]:
    """Assemble and write every output of one plan; returns manifest rows and issues."""
    scrub = deid.PhiScrubber(scrub_values).scrub
    folder = Path(out) / plan.subject / plan.session
    stem = f"{plan.subject}_{plan.session}_{plan.label}"
    frames = [p.frames for p in plan.phases]
    try:
        stacks = read_frames(root, frames)
    except PixelError as exc:
        return [], [Issue("pixel_decode_error", scrub(exc.detail), path=scrub(exc.path), subject=plan.subject,
                          session=plan.session, series=plan.label, action="failed")]
    vol = to_volume(stacks, frames)
    del stacks
    affine = np.asarray(plan.affine)
    spacing = _fmt([round(float(v), 4) for v in voxel_sizes(affine)])
    rows: list[dict] = []

    def emit(name: str, data, slope, inter, kind, phase="", time_s=None, extra=None, series_number=None,
             description=None, pixdim4=None):
        nii = folder / f"{name}.nii.gz"
        side = folder / f"{name}.json"
        desc = plan.description if description is None else description
        number = plan.series_number if series_number is None else series_number
        _maybe_fault(nii)
        write_nifti_atomic(nii, data, affine, slope, inter, pixdim4=pixdim4, compresslevel=options.compresslevel)
        sc = build_sidecar(plan.params, modality=plan.modality, description=desc, series_number=number,
                           scrub=scrub, extra=extra)
        write_json_atomic(side, sc)
        rows.append({
            "subject": plan.subject, "session": plan.session, "series": plan.label,
            "series_number": "" if number is None else number, "description": desc,
            "modality": plan.modality, "phase": phase,
            "phase_time_s": "" if time_s is None else time_s, "kind": kind, "shape": _fmt(data.shape),
            "spacing": spacing, "path": nii.relative_to(out).as_posix(), "sidecar": side.relative_to(out).as_posix(),
        })

    try:
        if not plan.dce:
            emit(stem, vol.data, vol.slope, vol.inter, "image")
        else:
            times = [p.time_s for p in plan.phases]
            for p, ph in enumerate(plan.phases):
                emit(f"{stem}_phase-{p:02d}", vol.data[..., p], vol.slope, vol.inter, "dce_phase", phase=p,
                     time_s=ph.time_s, series_number=ph.series_number, description=ph.description,
                     extra={"PhaseIndex": p, "PhaseTime": ph.time_s, "NumberOfPhases": len(plan.phases)})
            if options.subtract:
                scaled = vol.scaled()
                for p in range(1, len(plan.phases)):
                    emit(f"{stem}_sub-{p:02d}", scaled[..., p] - scaled[..., 0], 1.0, 0.0, "subtraction", phase=p,
                         time_s=plan.phases[p].time_s,
                         extra={"Subtraction": f"phase {p} minus phase 0", "PhaseTime": plan.phases[p].time_s})
            if options.dce_4d:
                known = [t for t in times if t is not None]
                step = float(np.median(np.diff(known))) if len(known) > 1 else None
                emit(f"{stem}_4d", vol.data, vol.slope, vol.inter, "4d", time_s=None, pixdim4=step,
                     extra={"PhaseTimes": times, "NumberOfPhases": len(times)})
    except OSError as exc:
        return [], [Issue("write_error", scrub(f"{type(exc).__name__}: {exc.strerror or exc}"), subject=plan.subject,
                          session=plan.session, series=plan.label, action="failed")]
    return rows, []


def _marker(out: str, plan: SeriesPlan) -> Path:
    return Path(out) / STATE_DIR / "done" / f"{plan.task_id}.json"


def _resume_rows(out: str, plan: SeriesPlan, options: ConvertOptions) -> list[dict] | None:
    """Manifest rows of a series a previous run finished with the same options, else None."""
    m = _marker(out, plan)
    if not m.is_file():
        return None
    try:
        state = json.loads(m.read_text())
    except (OSError, ValueError):
        return None
    if state.get("options") != asdict(options):
        return None
    rows = state.get("rows", [])
    if all((Path(out) / r["path"]).is_file() and (Path(out) / r["sidecar"]).is_file() for r in rows):
        return rows
    return None


def _task(args):
    plan, root, out, options, scrub_values = args
    rows, issues = convert_series(plan, root, out, options, scrub_values)
    if rows and not issues:
        write_json_atomic(_marker(out, plan), {"options": asdict(options), "rows": rows})
    return plan.task_id, rows, issues


def write_manifest(out: str, rows: list[dict]) -> None:
    kind_order = {"image": 0, "dce_phase": 1, "subtraction": 2, "4d": 3}
    rows = sorted(rows, key=lambda r: (r["subject"], r["session"], r["series"], kind_order.get(r["kind"], 9),
                                       str(r["phase"]).zfill(4), r["path"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(out) / "manifest.csv", buf.getvalue())


def convert_archive(root: str, out: str, workers: int = 1, key: str | None = None,
                    options: ConvertOptions = ConvertOptions(), progress: bool = True,
                    scan: ScanResult | None = None) -> ConvertResult:
    """Scan ``root`` and convert every planned series into ``out``; writes manifest and report."""
    root = os.path.abspath(root)
    out = os.path.abspath(out)
    if Path(out).resolve().is_relative_to(Path(root).resolve()):
        raise ValueError("the output folder must not be inside the archive (the archive is never modified)")
    Path(out).mkdir(parents=True, exist_ok=True)
    removed = remove_partial_files(out)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    with contextlib.ExitStack() as stack:
        # the pool is forked now, while this process is small: workers then hold one series each,
        # not a copy of the whole archive's plan
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers)) if workers > 1 else None
        return _convert(root, out, key, options, progress, scan, pool)


def _convert(root, out, key, options, progress, scan, pool) -> ConvertResult:
    scan = scan or scan_archive(root, key=key, progress=progress, pool=pool)
    scrub_values = tuple(getattr(scan.scrubber, "values", ()))
    issues = list(scan.issues)
    rows: list[dict] = []
    todo = []
    resumed = 0
    for plan in scan.plans:
        done = _resume_rows(out, plan, options)
        if done is not None:
            rows.extend(done)
            resumed += 1
        else:
            todo.append(plan)
    todo.sort(key=lambda p: -p.n_slices)  # big series first: better load balance
    converted = failed = 0
    bar = tqdm(total=len(todo), desc="convert", unit="series", disable=not progress)
    args = [(p, root, out, options, scrub_values) for p in todo]
    if pool is not None and len(todo) > 1:
        futures = [pool.submit(_task, a) for a in args]
        for f in as_completed(futures):
            _, r, i = f.result()
            rows.extend(r)
            issues.extend(i)
            converted += bool(r and not i)
            failed += bool(i)
            bar.update(1)
    else:
        for a in args:
            _, r, i = _task(a)
            rows.extend(r)
            issues.extend(i)
            converted += bool(r and not i)
            failed += bool(i)
            bar.update(1)
    bar.close()
    write_manifest(out, rows)
    report = {
        "archive_files": scan.n_files,
        "series_planned": len(scan.plans),
        "series_converted": converted,
        "series_resumed": resumed,
        "series_failed": failed,
        "outputs": len(rows),
        "summary": summarize(issues),
        "issues": [i.to_dict() for i in issues],
    }
    write_json_atomic(Path(out) / "report.json", report)
    return ConvertResult(rows, issues, converted, resumed, failed, scan.n_files)
