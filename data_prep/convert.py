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
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep import deid
from data_prep.diffusion import format_bval, format_bvec, fsl_bvecs
from data_prep.geometry import voxel_sizes
from data_prep.headers import ORIENTATION_TOL, SPACING_RANGE_MM
from data_prep.io import (GZIP_LEVEL, exclusive_lock, lock_holder, remove_partial_files, write_json_atomic,
                          write_nifti_atomic, write_text_atomic)
from data_prep.pixels import PixelError, read_frames, to_volume
from data_prep.report import Issue, summarize
from data_prep.scan import ScanResult, SeriesOutcome, SeriesPlan, scan_archive
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
    descriptors: bool = True  # False: SeriesDescription / ProtocolName written nowhere (labels "s003-series")


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


def check_volume(data: np.ndarray, affine: np.ndarray, slope: float, inter: float) -> str | None:
    """Why a volume must not be written, or None when it passes (the step before any output).

    ``data`` (X, Y, Z[, T]) stored values, physical value = ``data * slope + inter``; ``affine`` (4, 4)
    RAS. Checks: no empty axis; a finite, non-singular affine whose axes are orthogonal within
    :data:`data_prep.headers.ORIENTATION_TOL` (NIfTI's qform cannot hold a sheared grid) with voxel
    sizes in :data:`data_prep.headers.SPACING_RANGE_MM`; a scaling float32 can hold; finite voxels.
    """
    if data.size == 0 or min(data.shape) < 1:
        return f"empty volume {data.shape}"
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)):
        return "the affine is not finite"
    zooms = voxel_sizes(affine)
    lo, hi = SPACING_RANGE_MM
    if not np.all((zooms >= lo) & (zooms <= hi)):
        return f"voxel size {_fmt([float(z) for z in zooms])} mm is outside {lo:g}-{hi:g} mm"
    axes = affine[:3, :3] / zooms
    if np.abs(axes.T @ axes - np.eye(3)).max() > ORIENTATION_TOL:
        return "the voxel axes are not orthogonal (sheared or tilted stack)"
    if not (np.isfinite(np.float32(slope)) and np.isfinite(np.float32(inter)) and slope != 0):
        return "the rescale slope/intercept cannot be stored as float32"
    if data.dtype.names:  # RGB24: bytes, nothing to overflow
        return None
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            return "non-finite voxel values"
    else:
        peak = max(abs(float(data.min())), abs(float(data.max())))
        if peak * abs(slope) + abs(inter) > np.finfo(np.float32).max:
            return "scaled voxel values overflow float32"
    return None


def convert_series(plan: SeriesPlan, root: str, out: str, options: ConvertOptions,
                   scrubber: deid.PhiScrubber | None = None) -> tuple[list[dict], list[Issue]]:
    """Assemble, check and write every output of one plan; returns manifest rows and issues.

    Never raises: an unexpected error becomes an ``internal_error`` issue of this series, and any
    output of the series already written is removed (no half-converted series is left behind).
    """
    scrubber = scrubber or deid.PhiScrubber()
    deid.set_log_scrubber(scrubber, root)
    written: list[Path] = []
    try:
        rows, issues = _convert_series(plan, root, out, options, scrubber, written)
    except Exception as exc:
        log.debug("converting %s failed", plan.label, exc_info=True)
        rows, issues = [], [_series_issue(plan, "internal_error",
                                          f"unexpected {type(exc).__name__} while converting this series")]
    if issues:
        for path in written:
            path.unlink(missing_ok=True)
    return rows, issues


def _write_gradients(stem_path: Path, plan: SeriesPlan, affine: np.ndarray) -> None:
    """``<stem>.bval`` / ``<stem>.bvec`` of a DWI plan, in the FSL convention dcm2niix writes
    (gradients in the voxel frame of this file's affine; :func:`data_prep.diffusion.fsl_bvecs`)."""
    weights = [ph.frames[0].diffusion for ph in plan.phases]
    bvalues = [w.bvalue for w in weights]
    write_text_atomic(stem_path.with_name(stem_path.name + ".bval"), format_bval(bvalues))
    if all(w.is_trace for w in weights):  # a trace image alone: no direction, dcm2niix writes no .bvec
        return
    directions = [w.direction or (0.0, 0.0, 0.0) for w in weights]
    write_text_atomic(stem_path.with_name(stem_path.name + ".bvec"),
                      format_bvec(fsl_bvecs(directions, affine, bvalues)))


def _series_issue(plan: SeriesPlan, reason: str, detail: str) -> Issue:
    return Issue(reason, detail, subject=plan.subject, session=plan.session, series=plan.label, action="failed")


def _convert_series(plan, root, out, options, scrubber, written) -> tuple[list[dict], list[Issue]]:
    scrub = scrubber.scrub
    folder = Path(out) / plan.subject / plan.session
    stem = f"{plan.subject}_{plan.session}_{plan.label}"
    frames = [p.frames for p in plan.phases]
    try:
        stacks = read_frames(root, frames)
    except PixelError as exc:
        # a series-level failure (its files are counted in the series' outcome): the file is named
        # in the detail, not as a file-level path
        return [], [_series_issue(plan, "pixel_decode_error",
                                  f"{scrubber.scrub_path(exc.path)}: {scrubber.scrub(exc.detail)}")]
    vol = to_volume(stacks, frames)
    del stacks
    affine = np.asarray(plan.affine)
    problem = check_volume(vol.data, affine, vol.slope, vol.inter)
    if problem:
        return [], [_series_issue(plan, "invalid_volume", problem)]
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
        written.append(nii)
        sc = build_sidecar(plan.params, modality=plan.modality, description=desc, series_number=number,
                           scrub=scrubber.scrub_descriptor, extra=extra)
        write_json_atomic(side, sc)
        written.append(side)
        rows.append({
            "subject": plan.subject, "session": plan.session, "series": plan.label,
            "series_number": "" if number is None else number, "description": desc,
            "modality": plan.modality, "phase": phase,
            "phase_time_s": "" if time_s is None else time_s, "kind": kind, "shape": _fmt(data.shape),
            "spacing": spacing, "path": nii.relative_to(out).as_posix(), "sidecar": side.relative_to(out).as_posix(),
        })

    try:
        if plan.kind in ("image", "localizer"):
            emit(stem, vol.data, vol.slope, vol.inter, plan.kind)
        elif plan.kind in ("timeseries", "dwi"):  # one 4D file; pixdim[4] is TR in s, as dcm2niix writes it
            tr = plan.params.get("RepetitionTime")
            emit(stem, vol.data, vol.slope, vol.inter, plan.kind, pixdim4=tr / 1000.0 if tr else None,
                 extra={"NumberOfVolumes": len(plan.phases)})
            if plan.kind == "dwi":
                _write_gradients(folder / stem, plan, affine)
                written.extend(p for ext in ("bval", "bvec") if (p := folder / f"{stem}.{ext}").exists())
        else:
            times = [p.time_s for p in plan.phases]
            for p, ph in enumerate(plan.phases):
                emit(f"{stem}_phase-{p:02d}", vol.data[..., p], vol.slope, vol.inter, "dce_phase", phase=p,
                     time_s=ph.time_s, series_number=ph.series_number, description=ph.description,
                     extra={"PhaseIndex": p, "PhaseTime": ph.time_s, "NumberOfPhases": len(plan.phases)})
            if options.subtract and not vol.data.dtype.names:  # no subtraction of colour images
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
        return [], [_series_issue(plan, "write_error", scrub(f"{type(exc).__name__}: {exc.strerror or exc}"))]
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
    plan, root, out, options, scrubber = args
    rows, issues = convert_series(plan, root, out, options, scrubber)
    if rows and not issues:
        try:
            write_json_atomic(_marker(out, plan), {"options": asdict(options), "rows": rows}, indent=None)
        except OSError:  # without its marker the series is simply converted again next time
            log.warning("could not record %s as done; a re-run converts it again", plan.label)
    return plan.task_id, rows, issues


def write_manifest(out: str, rows: list[dict]) -> None:
    kind_order = {"image": 0, "dce_phase": 1, "subtraction": 2, "4d": 3, "timeseries": 4, "dwi": 5, "localizer": 6}
    rows = sorted(rows, key=lambda r: (r["subject"], r["session"], r["series"], kind_order.get(r["kind"], 9),
                                       str(r["phase"]).zfill(4), r["path"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(out) / "manifest.csv", buf.getvalue())


class OutputLocked(RuntimeError):
    """Another process is converting into the same output folder."""


@contextlib.contextmanager
def output_lock(out: str):
    """Hold an exclusive lock on ``OUT/.medimb-prep/lock`` (:func:`data_prep.io.exclusive_lock`: a killed run
    never leaves a stale lock). Raises :class:`OutputLocked` when another process holds it and ``OSError`` when
    ``OUT`` cannot be written."""
    state = Path(out) / STATE_DIR
    with exclusive_lock(state) as held:
        if held is None:
            raise OutputLocked(f"another medimb-prep convert (pid {lock_holder(state)}) is writing into {out}; wait "
                               "for it to finish or choose another output folder")
        yield


def convert_archive(root: str, out: str, workers: int = 1, key: str | None = None,
                    options: ConvertOptions = ConvertOptions(), progress: bool = True,
                    scan: ScanResult | None = None, link_table: str | None = None) -> ConvertResult:
    """Scan ``root`` and convert every planned series into ``out``; writes manifest and report.

    One bad file or series never stops the archive: it becomes a report entry. ``report.json`` is
    written however the run ends (``"complete": false`` when interrupted). Raises ``ValueError`` for a
    usage error, :class:`OutputLocked` when another run writes into ``out`` and ``OSError`` when ``out``
    cannot be written at all. ``link_table``: also write the private link table there
    (:mod:`data_prep.pacs.links`; PHI, refused inside ``out``), merged with the one already there.
    """
    root = os.path.abspath(root)
    out = os.path.abspath(out)
    if Path(out).resolve().is_relative_to(Path(root).resolve()):
        raise ValueError("the output folder must not be inside the archive (the archive is never modified)")
    if link_table is not None:
        from data_prep.pacs.links import check_location

        link_table = str(check_location(link_table, out))
    Path(out).mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        removed = remove_partial_files(out)
        if removed:
            log.info("removed %d temporary file(s) left by an interrupted run", removed)
        with contextlib.ExitStack() as stack:
            # the pool is forked now, while this process is small: workers then hold one series each,
            # not a copy of the whole archive's plan
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers)) if workers > 1 else None
            return _convert(root, out, key, options, progress, scan, pool, link_table)


def _convert(root, out, key, options, progress, scan, pool, link_table=None) -> ConvertResult:
    resumed: list[tuple[SeriesPlan, list[dict]]] = []
    todo: list[SeriesPlan] = []
    futures: dict = {}
    broken: list[tuple[SeriesPlan, Exception]] = []

    def start(plans: list[SeriesPlan], scrubber: deid.PhiScrubber) -> None:
        """A study's plans: resumed ones noted; the others queued in the pool at once (workers convert
        while the main process plans the next study), else kept for after the scan."""
        deid.set_log_scrubber(scrubber, root)
        for plan in sorted(plans, key=lambda p: -p.n_slices):  # big series first: better load balance
            done = _resume_rows(out, plan, options)
            if done is not None:
                resumed.append((plan, done))
            elif pool is not None:
                try:
                    futures[pool.submit(_task, (plan, root, out, options, scrubber))] = plan
                except RuntimeError as exc:  # the pool broke (a worker died): as its queued series would
                    broken.append((plan, exc))
            else:
                todo.append(plan)

    if scan is None:
        try:
            scan = scan_archive(root, key=key, progress=progress, pool=pool, on_plans=start,
                                descriptors=options.descriptors)
        except KeyboardInterrupt:  # stopped while scanning: say so, nothing else is known yet
            for f in futures:
                f.cancel()
            write_json_atomic(Path(out) / "report.json", {"complete": False, "interrupted_during": "scan"})
            raise
    else:
        start(scan.plans, scan.scrubber)
    deid.set_log_scrubber(scan.scrubber, root)
    if deid.is_public_key(key) and not scan.synthetic:
        log.warning(deid.PUBLIC_KEY_WARNING)
    issues = list(scan.issues)
    outcomes: list[SeriesOutcome] = list(scan.outcomes)
    rows: list[dict] = []
    finished: list[tuple[SeriesPlan, list[dict]]] = list(resumed)  # plans with all outputs written (link table)
    for plan, done in resumed:
        rows.extend(done)
        outcomes.append(_outcome(plan, "resumed", done))
    todo.sort(key=lambda p: -p.n_slices)

    def collect(plan, r, i):
        rows.extend(r)
        issues.extend(i)
        if r and not i:
            finished.append((plan, r))
        outcomes.append(_outcome(plan, "failed" if i else "converted", r))
        bar.update(1)

    complete = False
    bar = tqdm(total=len(todo) + len(futures) + len(broken), desc="convert", unit="series", disable=not progress)
    try:
        for plan, exc in broken:
            collect(plan, [], [_worker_died(plan, exc)])
        try:
            for f in as_completed(futures):
                plan = futures[f]
                try:
                    _, r, i = f.result()
                except Exception as exc:  # a worker died (killed, out of memory): that series only
                    r, i = [], [_worker_died(plan, exc)]
                collect(plan, r, i)
        except BaseException:  # interrupted: queued series are not started (the pool would wait for them)
            for f in futures:
                f.cancel()
            raise
        for plan in todo:
            _, r, i = _task((plan, root, out, options, scan.scrubber))
            collect(plan, r, i)
        complete = True
    finally:
        bar.close()
        report = _report(scan, outcomes, issues, rows, complete)
        write_manifest(out, rows)
        write_json_atomic(Path(out) / "report.json", report)
        if link_table is not None:  # even when interrupted: the series finished so far are linked
            from data_prep.pacs.links import plan_rows, write_link_table

            write_link_table(link_table, [lr for plan, r in finished for lr in plan_rows(plan, r)])
    counts = Counter(o.status for o in outcomes)
    return ConvertResult(rows, issues, counts["converted"], counts["resumed"], counts["failed"], scan.n_files)


def _worker_died(plan: SeriesPlan, exc: Exception) -> Issue:
    return _series_issue(plan, "internal_error", f"the worker process converting this series died ({type(exc).__name__})")


def _outcome(plan: SeriesPlan, status: str, rows: list[dict]) -> SeriesOutcome:
    return SeriesOutcome(plan.subject, plan.session, plan.label, status, plan.n_files, outputs=len(rows))


def _report(scan: ScanResult, outcomes: list[SeriesOutcome], issues: list[Issue], rows: list[dict],
            complete: bool) -> dict:
    """report.json: counts, one entry per series (what became of it) and every issue."""
    counts = Counter(o.status for o in outcomes)
    return {
        "complete": complete,
        "archive_files": scan.n_files,
        "series_planned": len(scan.plans),
        "series_converted": counts["converted"],
        "series_resumed": counts["resumed"],
        "series_failed": counts["failed"],
        "series_skipped": counts["skipped"],
        "outputs": len(rows),
        "summary": summarize(issues),
        "series": [asdict(o) for o in sorted(outcomes, key=lambda o: (o.subject, o.session, o.series))],
        "issues": [i.to_dict() for i in issues],
    }
