"""Header-only scan of a DICOM archive into a conversion plan.

``scan_archive(root)`` walks the folders (symlink loops detected), reads every file's header in
parallel (:mod:`data_prep.headers`), groups frames by subject / study / series, splits a series by
echo, image part (magnitude/phase/water/fat/field map), plane, matrix and pixel spacing, groups the
rest into volumes (diffusion weightings via :mod:`data_prep.diffusion`, repeats by time), tells
DCE, other time series and DWI apart (:func:`_series_kind`), merges one-series-per-phase DCE
(identical geometry and sequence), sorts slices along the normal and validates spacing. The result
is a list of picklable :class:`SeriesPlan` (one conversion task each), a list of report issues and
what became of every series that was not planned (:class:`SeriesOutcome`).
No UIDs or PHI leave this module except inside the plan's internal fields.
"""

from __future__ import annotations

import contextlib
import os
import logging
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from data_prep import deid
from data_prep.diffusion import (B0_MAX, Diffusion, DiffusionError, canon_series, dwi_volumes,
                                 is_one_volume_dwi, untagged_images_are_b0)
from data_prep.geometry import GeometryError, affine_ras, orientation_key, slice_normal, sort_slices
from data_prep.headers import FileHeader, FileIssue, Frame, read_header
from data_prep.report import Issue

#: the encoding of an image without diffusion tags inside a diffusion series (:func:`_volumes`)
UNTAGGED_B0 = Diffusion(0.0, None)

log = logging.getLogger("data_prep.scan")

#: a stray orientation group with at least this many slices is kept as its own volume
MIN_STACK_SLICES = 4


#: what a plan becomes: one 3D ``image``; ``dce`` (contrast dynamics, one 3D volume per phase);
#: ``timeseries`` (fMRI, ASL, cine, ...: one 4D file); ``dwi`` (one 4D file with .bval/.bvec)
KINDS = ("image", "dce", "timeseries", "dwi", "localizer")
#: consecutive DCE phases are at least this far apart (s); faster repeats are other time series
DCE_MIN_PHASE_GAP_S = 2.0


@dataclass
class PhasePlan:
    """One 3D volume to assemble: frames in ascending slice-normal order (k = 0..N-1)."""

    frames: list[Frame]
    time_s: float | None = None  # acquisition time relative to the first phase
    series_number: int | None = None
    description: str = ""
    series_uid: str = ""  # the source SeriesInstanceUID (for the optional link table; never in outputs)


@dataclass
class SeriesPlan:
    """One conversion task: a series (or a DCE group of series) -> one or more NIfTI volumes.

    ``affine`` (4, 4) is RAS (see :mod:`data_prep.geometry`); ``shape`` is ``(cols, rows, slices)``.
    ``task_id`` is a keyed hash (no UID) used for resume markers.
    """

    task_id: str
    subject: str
    session: str
    label: str
    modality: str
    description: str
    series_number: int | None
    phases: list[PhasePlan]
    affine: list
    shape: tuple
    kind: str  # one of KINDS
    params: dict = field(default_factory=dict)
    n_files: int = 0
    split: bool = False  # one of several volumes its series was split into (echo, image part, plane)
    study_uid: str = ""  # the source StudyInstanceUID (for the optional link table; never in outputs)

    @property
    def n_slices(self) -> int:
        return sum(len(p.frames) for p in self.phases)

    @property
    def dce(self) -> bool:
        return self.kind == "dce"


@dataclass
class SeriesOutcome:
    """What became of one series (for report.json's ``series`` list): ``status`` is ``converted``,
    ``resumed``, ``failed`` or ``skipped``; ``files`` the distinct source files whose pixels are in
    its outputs (or would have been); files dropped from it are file-level issues instead."""

    subject: str
    session: str
    series: str
    status: str
    files: int
    outputs: int = 0
    reason: str = ""


@dataclass
class ScanResult:
    plans: list[SeriesPlan]
    issues: list[Issue]
    n_files: int
    scrubber: deid.PhiScrubber
    outcomes: list[SeriesOutcome] = field(default_factory=list)  # series failed or skipped while planning
    synthetic: bool = False  # every image comes from `medimb-prep synth`


# ----------------------------------------------------------------------------------------- walk
#: ``medimb-prep pull``'s bookkeeping (markers, report) at the top of an archive it filled: not images
PULL_STATE_DIR = ".medimb-pull"


def walk_archive(root: str) -> tuple[list[str], list[Issue]]:
    """All candidate files under ``root`` (sorted), following directory symlinks once.

    A directory reached again through a symlink (a loop) and a self-referencing file link are
    reported as ``symlink_loop``; a dangling link as ``broken_link``.
    """
    root = os.path.abspath(root)
    files, issues = [], []
    seen_dirs = set()

    def unreadable(exc: OSError) -> None:
        issues.append(Issue("unreadable", f"folder cannot be listed ({exc.strerror or type(exc).__name__})",
                            path=os.path.relpath(exc.filename or root, root), action="not_followed"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            unreadable(exc)
            dirnames[:] = []
            continue
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            issues.append(Issue("symlink_loop", "folder reached again through a link", path=os.path.relpath(dirpath, root),
                                action="not_followed"))
            dirnames[:] = []
            continue
        seen_dirs.add(ident)
        kept = []
        for d in sorted(dirnames):
            if d == PULL_STATE_DIR and dirpath == root:
                continue
            full = os.path.join(dirpath, d)
            try:
                sd = os.stat(full)
            except OSError:
                issues.append(Issue("symlink_loop", "link cannot be resolved", path=os.path.relpath(full, root),
                                    action="not_followed"))
                continue
            if (sd.st_dev, sd.st_ino) in seen_dirs:
                issues.append(Issue("symlink_loop", "link points back to an ancestor folder",
                                    path=os.path.relpath(full, root), action="not_followed"))
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                try:
                    os.stat(full)
                except OSError as exc:
                    reason = "symlink_loop" if getattr(exc, "errno", None) == 40 else "broken_link"
                    issues.append(Issue(reason, "link cannot be resolved", path=os.path.relpath(full, root)))
                    continue
            files.append(full)
    return files, issues


def _read_one(path: str, root: str) -> FileHeader | FileIssue:
    """``read_header`` that cannot fail: one file never stops the archive."""
    try:
        return read_header(path, root)
    except Exception as exc:  # read_header turns known problems into FileIssues; this is the net
        return FileIssue(os.path.relpath(path, root), "internal_error",
                         f"unexpected {type(exc).__name__} while reading the header")


def _read_many(args):
    paths, root = args
    return [_read_one(p, root) for p in paths]


def read_headers(paths: list[str], root: str, workers: int = 1, progress: bool = True, pool=None):
    """``read_header`` for every path; ``workers`` processes (or the given ``pool``), 64 files per task."""
    chunk = 64
    batches = [(paths[i:i + chunk], root) for i in range(0, len(paths), chunk)]
    results: list = []
    bar = tqdm(total=len(paths), desc="scan", unit="file", disable=not progress, leave=False)
    if pool is not None or (workers > 1 and len(batches) > 1):
        with contextlib.ExitStack() as stack:
            if pool is None:
                pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            for out in pool.map(_read_many, batches):
                results.extend(out)
                bar.update(len(out))
    else:
        for b in batches:
            out = _read_many(b)
            results.extend(out)
            bar.update(len(out))
    bar.close()
    return results


# -------------------------------------------------------------------------------------- grouping
def _volumes(frames: list[Frame], normal, manufacturer=None) -> tuple[list[list[Frame]], list[Frame], list[Frame]]:
    """Split one stack (one echo, one image part) into 3D volumes, each in ascending slice order
    where it matters (:func:`_phases` sorts again and checks the spacing).

    Diffusion series (images with several b-values or gradients) are grouped and ordered by
    :func:`data_prep.diffusion.dwi_volumes`, as dcm2niix does; everything else by
    :func:`_time_rank_phases`. Untagged images in a Toshiba/Canon diffusion series are its b=0 images
    (:func:`data_prep.diffusion.untagged_images_are_b0`). Returns ``(volumes, duplicate_files,
    conflicts)``; raises :class:`data_prep.diffusion.DiffusionError` for a diffusion series that is not
    complete.
    """
    encodings = {f.diffusion for f in frames}
    if any(d is not None and d.scanner is not None for d in encodings):
        # a Canon series' gradients are read one way for the whole series, by its first image (dcm2niix)
        resolved = canon_series([f.diffusion for f in frames],
                                [(f.instance if f.instance is not None else 0, f.frame or 0) for f in frames])
        frames = [f if d is f.diffusion else replace(f, diffusion=d) for f, d in zip(frames, resolved)]
        encodings = {f.diffusion for f in frames}
    if len(encodings) < 2:
        return _time_rank_phases(frames, normal)
    if None in encodings and untagged_images_are_b0(manufacturer) and any(
            d is not None and d.bvalue > B0_MAX for d in encodings):
        frames = [replace(f, diffusion=UNTAGGED_B0) if f.diffusion is None else f for f in frames]
    kept, dups, seen = [], [], set()
    for f in sorted(frames, key=lambda f: (f.path, f.frame or 0)):
        (dups if f.sop_uid in seen else kept).append(f)
        seen.add(f.sop_uid)
    grouped = dwi_volumes([float(np.dot(f.position, normal)) for f in kept], [f.diffusion for f in kept],
                          [(f.instance if f.instance is not None else 0, f.frame or 0) for f in kept])
    return [[kept[i] for i in vol] for vol in grouped.volumes], dups, []


def _is_epi(params: dict) -> bool:
    seq = params.get("ScanningSequence") or ""
    return "EP" in ([seq] if isinstance(seq, str) else list(seq))


def _series_kind(volumes: list[list[Frame]], params: dict, times: list) -> str:
    """``image``, ``dwi``, ``dce`` or ``timeseries`` (docs/data_prep.md, *Series types*).

    One volume is ``dwi`` when it is a diffusion image (:func:`data_prep.diffusion.is_one_volume_dwi`).

    DCE: repeated non-EPI acquisitions of the same stack at least :data:`DCE_MIN_PHASE_GAP_S` apart
    (when the times are known). EPI repeats (fMRI, ASL) and fast repeats (cine) are time series.
    """
    if len(volumes) == 1:
        encodings = {f.diffusion for f in volumes[0]}
        one = encodings.pop() if len(encodings) == 1 else None
        mosaic = volumes[0][0].tile is not None
        return "dwi" if is_one_volume_dwi(one, params.get("Manufacturer"), mosaic) else "image"
    if len({f.diffusion for v in volumes for f in v}) > 1:
        return "dwi"
    if _is_epi(params):
        return "timeseries"
    known = [t for t in times if t is not None]
    if len(known) == len(times) and np.median(np.diff(known)) < DCE_MIN_PHASE_GAP_S:
        return "timeseries"
    return "dce"


def _time_rank_phases(frames: list[Frame], normal) -> tuple[list[list[Frame]], list[Frame], list[Frame]]:
    """Split one stack into phases: at each slice position, frames ordered by time are phases 0..P-1.

    Images at one position whose time keys are equal are repeats told apart by InstanceNumber, then
    frame index (GE fMRI stores no per-volume time: every image carries the series' AcquisitionTime;
    dcm2niix stacks them the same way). Returns ``(phases, duplicate_files, conflicts)``: exact
    duplicates (same SOP instance) are dropped; different images at the same position with the same
    time key and nothing else to order them (the same or no InstanceNumber, the same frame) are conflicts.
    """
    by_pos: dict[float, list[Frame]] = defaultdict(list)
    dist = np.array([np.dot(f.position, normal) for f in frames])
    for f, d in zip(frames, dist):
        by_pos[round(float(d), 2)].append(f)

    def repeat_order(f: Frame) -> tuple:
        return (f.instance is None, f.instance or 0, f.frame or 0)

    dups, conflicts = [], []
    phases: dict[int, list[Frame]] = defaultdict(list)
    for pos_frames in by_pos.values():
        pos_frames.sort(key=lambda f: (f.time_key, repeat_order(f), f.path))
        kept: list[Frame] = []
        for f in pos_frames:
            if kept and f.sop_uid == kept[-1].sop_uid:
                dups.append(f)
                continue
            last = kept[-1] if kept else None
            if last is not None and f.time_key == last.time_key and (
                    f.instance is None or last.instance is None or repeat_order(f) == repeat_order(last)):
                conflicts.append(f)
                continue
            kept.append(f)
        for p, f in enumerate(kept):
            phases[p].append(f)
    return [phases[p] for p in sorted(phases)], dups, conflicts


def _series_number(headers) -> int | None:
    """The SeriesNumber most files of a series agree on (a damaged value in one file is outvoted)."""
    numbers = Counter(h.series_number for h in headers if h.series_number is not None)
    return numbers.most_common(1)[0][0] if numbers else None


def _typical_header(headers: list[FileHeader]) -> FileHeader:
    """The first header whose acquisition parameters most files share: one damaged file must not
    speak for its series in the sidecar."""
    reprs: dict[int, str] = {}  # params are mostly shared dicts (:func:`_share_repeated_values`)
    key = []
    for h in headers:
        k = reprs.get(id(h.params))
        if k is None:
            k = reprs[id(h.params)] = repr(sorted(h.params.items()))
        key.append(k)
    common = Counter(key).most_common(1)[0][0]
    return headers[key.index(common)]


def _series_label(number, description) -> str:
    num = f"s{int(number):03d}" if number is not None else "s000"
    return f"{num}-{deid.sanitize_label(description, max_len=30, fallback='series')}"


def _is_localizer(h: FileHeader) -> bool:
    return "LOCALIZER" in h.image_type or "SCOUT" in h.image_type


def _plane_groups(frames: list[Frame], head_of: dict) -> dict[tuple, list[Frame]]:
    """Frames grouped by (orientation, matrix size, pixel spacing, samples per pixel): the stacks a
    series holds. Colour images are a stack of their own, as dcm2niix writes them (a Siemens XA ASL
    series holds its grey perfusion images and their colour-map copies at the same positions)."""
    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for f in frames:
        h = head_of[f.path]
        groups[(orientation_key(f.orientation), h.rows, h.cols, tuple(round(v, 4) for v in f.spacing),
                h.samples)].append(f)
    return groups


def _how_differs(key: tuple, main_key: tuple) -> str:
    """What sets a :func:`_plane_groups` group apart from the series' main one, in words."""
    if key[4] != main_key[4]:
        return f"another pixel format ({'colour' if key[4] > 1 else 'grey'})"
    if (key[1], key[2]) != (main_key[1], main_key[2]):
        return "another matrix size"
    return "another plane" if key[0] != main_key[0] else "another pixel spacing"


def _paths(items) -> set[str]:
    """Source file paths of frames or headers."""
    return {x.path for x in items}


def _unique_labels(plans: list[SeriesPlan]) -> None:
    """Output names must be unique, whatever the headers say: ``-2``, ``-3``, ... in label order.
    ``plans`` are one study's (names only meet within a subject and session)."""
    taken: set[tuple] = set()
    for plan in sorted(plans, key=lambda p: (p.subject, p.session, p.label)):
        base, n = plan.label, 2
        while (plan.subject, plan.session, plan.label) in taken:
            plan.label, n = f"{base}-{n}", n + 1
        taken.add((plan.subject, plan.session, plan.label))


class _Planner:
    def __init__(self, headers: list[FileHeader], key: str | None, scrubber: deid.PhiScrubber, on_plans=None):
        self.on_plans = on_plans
        self.headers = headers
        self.key = key
        self.scrub = scrubber.scrub
        self.scrub_path = scrubber.scrub_path
        self.scrub_descriptor = scrubber.scrub_descriptor
        self.issues: list[Issue] = []
        self.plans: list[SeriesPlan] = []
        self.outcomes: list[SeriesOutcome] = []
        self._counted: set[str] = set()  # files already in some series' count (each file counts once)

    def _count(self, paths: set[str]) -> int:
        """How many of ``paths`` no earlier series counted (a multi-frame file split into several
        series, e.g. magnitude and field map, counts in the first one only)."""
        new = paths - self._counted
        self._counted |= new
        return len(new)

    def run(self) -> None:
        # grouped by pseudonym and stripped UIDs: IDs that differ only in padding are one subject
        by_subject: dict[str, list[FileHeader]] = defaultdict(list)
        pseudonyms: dict[str, str] = {}
        for h in self.headers:
            subject = pseudonyms.get(h.patient_id)
            if subject is None:
                subject = pseudonyms[h.patient_id] = deid.pseudonymize(h.patient_id, self.key)
            by_subject[subject].append(h)
        for subject, hs in by_subject.items():
            studies: dict[str, list[FileHeader]] = defaultdict(list)
            for h in hs:
                studies[h.study_uid.strip()].append(h)
            order = sorted(studies, key=lambda uid: (min(h.study_datetime for h in studies[uid]), deid.keyed_hash(uid, self.key)))
            for n, uid in enumerate(order, start=1):
                self._study(subject, f"ses-{n}", studies[uid])

    def _study(self, subject, session, headers):
        series: dict[str, list[FileHeader]] = defaultdict(list)
        for h in headers:
            series[h.series_uid.strip()].append(h)
        study_plans = []
        used_labels: set[str] = set()
        for uid in sorted(series, key=lambda u: (_series_number(series[u]) or 0, deid.keyed_hash(u, self.key))):
            hs = series[uid]
            label = self._label(hs, used_labels)
            try:
                study_plans.extend(self._series(subject, session, uid, label, hs))
            except Exception as exc:  # one series never stops the archive; the report says which
                log.debug("planning %s failed", label, exc_info=True)
                self._fail("internal_error", f"unexpected {type(exc).__name__} while planning this series",
                           subject, session, label, _paths(hs))
        plans = self._merge_dce(subject, session, study_plans)
        _unique_labels(plans)
        self.plans.extend(plans)
        if self.on_plans is not None and plans:
            self.on_plans(plans)

    def _label(self, headers, used_labels) -> str:
        h0 = min(headers, key=lambda h: h.path)
        base = _series_label(_series_number(headers), self.scrub_descriptor(h0.description))
        label, i = base, 2
        while label in used_labels:
            label = f"{base}-{i}"
            i += 1
        used_labels.add(label)
        return label

    def _issue(self, reason, detail, subject, session, label="", path="", action="skipped"):
        self.issues.append(Issue(reason, self.scrub(detail), path=self.scrub_path(path) if path else "",
                                 subject=subject, session=session, series=label, action=action))

    def _fail(self, reason, detail, subject, session, label, paths: set[str], action="failed"):
        """A whole series (or split part of one) is not converted: one issue and one outcome."""
        self._issue(reason, detail, subject, session, label, action=action)
        self.outcomes.append(SeriesOutcome(subject, session, label, "skipped" if action == "skipped" else "failed",
                                           self._count(paths), reason=reason))

    def _drop(self, reason, detail, subject, session, label, frames):
        """Images left out of a series that is converted: one issue per file."""
        for path in sorted({f.path for f in frames}):
            self._issue(reason, detail, subject, session, label, path=path, action="dropped")

    def _series(self, subject, session, uid, label, headers):
        localizers = [h for h in headers if _is_localizer(h)]
        localizer = 2 * len(localizers) >= len(headers)  # a scout series: every plane on its own
        if localizers and not localizer:  # a few images tagged LOCALIZER inside a real series: drop them
            self._drop("localizer_in_series", f"ImageType says localizer, unlike the {len(headers) - len(localizers)} "
                       "other files of its series", subject, session, label, [f for h in localizers for f in h.frames])
            headers = [h for h in headers if not _is_localizer(h)]
        frames = [f for h in headers for f in h.frames]
        head_of = {h.path: h for h in headers}
        bad = [f for f in frames if f.position is None or f.orientation is None or f.spacing is None]
        if bad:
            self._fail("missing_geometry", f"{len(bad)} of {len(frames)} images lack position, orientation or "
                       "pixel spacing", subject, session, label, _paths(frames))
            return []
        # split by echo and image part (magnitude/phase, water/fat, field map): separate volumes,
        # named with BIDS-like entities, never phases of one series
        # echoes numbered in acquisition order: for an enhanced file the order of its frames (a Philips
        # field map stores the magnitude echo before the derived field map, whose echo time is 0)
        first_frame = {}
        for f in frames:
            first_frame[f.echo] = min(first_frame.get(f.echo, f.frame or 0), f.frame or 0)
        echoes = sorted(first_frame, key=lambda e: (first_frame[e], e is None, e))
        parts = sorted({f.part for f in frames})
        out = []
        for e_idx, echo in enumerate(echoes, start=1):
            for part in parts:
                sub = [f for f in frames if f.echo == echo and f.part == part]
                if not sub:
                    continue
                # the images whose header names no part (e.g. the DWI beside its trace images) keep the label
                sub_label = label + (f"_echo-{e_idx}" if len(echoes) > 1 else "") + \
                    (f"_part-{part}" if len(parts) > 1 and part else "")
                entities = {"EchoNumber": e_idx} if len(echoes) > 1 else {}
                if part:
                    entities["ImagePart"] = part
                out.extend(self._stacks(subject, session, sub_label, uid, sub, head_of, entities,
                                        split=len(echoes) > 1 or len(parts) > 1, localizer=localizer))
        return out

    def _planes(self, subject, session, label, uid, groups, head_of, entities, localizer=True):
        """One plan per group of :func:`_plane_groups`, largest first: ``<series>``, ``<series>-o2``, ...
        as dcm2niix writes each stack of a series. In a localizer the planes are ``kind=localizer``
        (groups holding repeats become whatever their repeats are); otherwise every group after the
        first is reported as ``split_orientation``."""
        out = []
        # largest first; ties by the group's geometry (never by file names: the same series must get the
        # same names from any copy of the archive)
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        main_key, main = ordered[0]
        for n, (key, group) in enumerate(ordered, start=1):
            sub_label = label if n == 1 else f"{label}-o{n}"
            if n > 1 and not localizer:
                detail = (f"{len(group)} image(s) in {_how_differs(key, main_key)} than the {len(main)} others of "
                          "the series, converted separately")
                strays = sorted(_paths(group)) if len(group) < MIN_STACK_SLICES else [""]
                for path in strays:  # a few stray images are named, as a file-level finding
                    self._issue("split_orientation", detail, subject, session, sub_label, path=path, action="split")
            for plan in self._phases(subject, session, sub_label, uid, group, head_of, entities, split=True):
                if localizer and plan.kind == "image":
                    plan.kind = "localizer"
                out.append(plan)
        return out

    def _stacks(self, subject, session, label, uid, frames, head_of, entities, split=False, localizer=False):
        """Group by (orientation, matrix size, pixel spacing): each group is converted on its own. A
        localizer (tagged, or a few images in each of several planes) becomes ``kind=localizer`` plans."""
        groups = _plane_groups(frames, head_of)
        if len(groups) == 1 and not localizer:
            return self._phases(subject, session, label, uid, frames, head_of, entities, split)
        localizer = localizer or max(len(g) for g in groups.values()) < MIN_STACK_SLICES
        return self._planes(subject, session, label, uid, groups, head_of, entities, localizer)

    def _phases(self, subject, session, label, uid, frames, head_of, entities, split=False):
        used = _paths(frames)
        normal = slice_normal(frames[0].orientation)
        try:
            phases, dups, conflicts = _volumes(frames, normal, head_of[frames[0].path].params.get("Manufacturer"))
        except DiffusionError as exc:
            self._fail(exc.reason, exc.detail, subject, session, label, used)
            return []
        self._drop("duplicate_file", "second copy of an image", subject, session, label,
                   [f for f in dups if f.path not in {g.path for p in phases for g in p}])
        used -= _paths(dups) - _paths(g for p in phases for g in p)
        if conflicts:
            self._fail("duplicate_slice_position",
                       f"{len(conflicts)} image(s) share a slice position and acquisition time with another",
                       subject, session, label, used)
            return []
        counts = {len(p) for p in phases}
        if len(counts) > 1:
            # phases of unequal length: either DCE with a missing slice, or a missing slice at some positions
            self._fail("inconsistent_phases" if len(phases) > 1 else "missing_slice",
                       f"{len(phases)} phases with {sorted(counts)} slices", subject, session, label, used)
            return []
        ordered = []
        for p in phases:
            try:
                so = sort_slices([f.position for f in p], p[0].orientation)
            except GeometryError as exc:
                self._fail(exc.reason, exc.detail, subject, session, label, used)
                return []
            ordered.append([p[i] for i in so.order])
        h0 = head_of[ordered[0][0].path]
        times = [min((f.time_s for f in p if f.time_s is not None), default=None) for p in ordered]
        t0 = times[0]
        single = h0.spacing_between_slices or h0.slice_thickness or 1.0
        first = ordered[0]
        affine = affine_ras(first[0].position, first[-1].position, first[0].orientation, first[0].spacing,
                            len(first), single_slice_spacing=single)
        number = _series_number([head_of[f.path] for f in first])
        description = deid.sanitize_label(self.scrub_descriptor(h0.description), max_len=64, fallback="")
        h0 = _typical_header([head_of[f.path] for f in first])
        params = dict(h0.params, SliceThickness=h0.slice_thickness, SpacingBetweenSlices=h0.spacing_between_slices,
                      ImageType=list(h0.image_type), **entities)
        if first[0].frame is not None and first[0].echo is not None:  # enhanced: the frame's echo time
            params["EchoTime"] = first[0].echo
        plan = SeriesPlan(
            task_id=deid.keyed_hash(f"{subject}|{session}|{uid}|{label}", self.key, digits=16),
            subject=subject, session=session, label=label, modality=h0.modality,
            description=description, series_number=number,
            phases=[PhasePlan(p, None if (t is None or t0 is None) else round(t - t0, 3), number, description, uid)
                    for p, t in zip(ordered, times)],
            affine=affine.tolist(), shape=(h0.cols, h0.rows, len(first)),
            kind=_series_kind(ordered, params, times), params=params, n_files=self._count(used), split=split,
            study_uid=h0.study_uid.strip(),
        )
        return [plan]

    def _merge_dce(self, subject, session, plans: list[SeriesPlan]) -> list[SeriesPlan]:
        """Several single-phase MR series of one study on the same voxel grid with the same
        ScanningSequence are DCE phases, ordered by acquisition time (then SeriesNumber)."""
        def signature(p: SeriesPlan):
            # only single-echo magnitude images of a non-EPI sequence: never field maps, echoes of a
            # multi-echo series, diffusion or fMRI
            if (p.kind != "image" or p.modality != "MR" or "DERIVED" in p.params.get("ImageType", [])
                    or p.split or p.params.get("ImagePart", "mag") != "mag" or _is_epi(p.params)):
                return None
            # same grid (affine to 0.01 mm, shape) and same kind of sequence; TR/TE may differ slightly
            # between phases on some scanners, and descriptions are not reliable
            return (tuple(np.round(np.asarray(p.affine), 2).ravel()), p.shape, str(p.params.get("ScanningSequence")))
        groups: dict[tuple, list[SeriesPlan]] = defaultdict(list)
        rest = []
        for p in plans:
            s = signature(p)
            (groups[s].append(p) if s is not None else rest.append(p))
        out = list(rest)
        for members in groups.values():
            if len(members) < 2:
                out.extend(members)
                continue
            def start(p):
                t = min((f.time_s for f in p.phases[0].frames if f.time_s is not None), default=None)
                return (t is None, t or 0.0, p.series_number or 0)
            members.sort(key=start)
            t0 = start(members[0])[1]
            first = members[0]
            phases = []
            for p in members:
                ph = p.phases[0]
                t = start(p)
                ph.time_s = None if t[0] or start(first)[0] else round(t[1] - t0, 3)
                ph.series_number = p.series_number
                ph.description = p.description
                phases.append(ph)
            first_num = f"s{int(first.series_number):03d}" if first.series_number is not None else "s000"
            out.append(SeriesPlan(
                task_id=deid.keyed_hash("|".join(p.task_id for p in members), self.key, digits=16),
                subject=subject, session=session, label=f"{first_num}-dce", modality=first.modality,
                description=first.description, series_number=first.series_number, phases=phases,
                affine=first.affine, shape=first.shape, kind="dce", params=first.params,
                n_files=sum(p.n_files for p in members), study_uid=first.study_uid,
            ))
        return out


def plan_series(headers: list[FileHeader], key: str | None, scrubber: deid.PhiScrubber, on_plans=None):
    """Group headers into :class:`SeriesPlan` tasks; returns ``(plans, issues, outcomes)`` where
    ``outcomes`` lists the series that were not planned (failed or skipped). ``on_plans(plans)``, if
    given, receives each study's finished plans as soon as they are planned (conversion can start
    while the rest of the archive is planned)."""
    planner = _Planner(headers, key, scrubber, on_plans)
    planner.run()
    planner.plans.sort(key=lambda p: (p.subject, p.session, p.label))
    return planner.plans, planner.issues, planner.outcomes


def _share_repeated_values(headers: list[FileHeader]) -> None:
    """Slices of one series repeat the same parameters: keep one copy (main-process memory then grows
    with the number of files by a few hundred bytes each, not kilobytes)."""
    params: dict = {}
    by_id: dict = {}  # the workers already share equal dicts within a batch: one repr per object
    small: dict = {}
    for h in headers:
        shared = by_id.get(id(h.params))
        if shared is None:
            shared = by_id[id(h.params)] = params.setdefault(repr(sorted(h.params.items())), h.params)
        h.params = shared
        h.phi = small.setdefault(h.phi, h.phi)
        h.image_type = small.setdefault(h.image_type, h.image_type)


#: file-level reasons that mean "this file should have been an image but cannot be read"
_FAILED_FILE_REASONS = {"truncated", "corrupt_header", "unreadable", "invalid_value", "invalid_geometry",
                        "internal_error"}


def scan_archive(root: str, workers: int = 1, key: str | None = None, progress: bool = True,
                 pool=None, on_plans=None, descriptors: bool = True) -> ScanResult:
    """Walk, read headers and plan; see module docstring. ``pool``: an executor to reuse.
    ``on_plans(plans, scrubber)``: called with each study's plans as soon as they are planned.
    ``descriptors=False``: no SeriesDescription / ProtocolName text in labels, names or sidecars
    (:class:`data_prep.deid.PhiScrubber`).

    ``n_files`` counts every file-like entry of the archive, broken links included, so that each one
    is either in a series' outputs or named by a file-level issue."""
    root = os.path.abspath(root)
    paths, walk_issues = walk_archive(root)
    results = read_headers(paths, root, workers=workers, progress=progress, pool=pool)
    headers = [r for r in results if isinstance(r, FileHeader)]
    file_issues = [r for r in results if isinstance(r, FileIssue)]
    _share_repeated_values(headers)
    distinct_phi = {id(r.phi): r.phi for r in (*headers, *file_issues)}  # shared tuples: each set once
    scrubber = deid.PhiScrubber((v for phi in distinct_phi.values() for v in phi), key=key, descriptors=descriptors)
    issues = [Issue(i.reason, scrubber.scrub(i.detail), path=scrubber.scrub_path(i.path), action=i.action)
              for i in walk_issues]
    for r in file_issues:
        issues.append(Issue(r.reason, scrubber.scrub(r.detail), path=scrubber.scrub_path(r.path),
                            action="failed" if r.reason in _FAILED_FILE_REASONS else "skipped"))
    plans, plan_issues, outcomes = plan_series(
        headers, key, scrubber, None if on_plans is None else (lambda study_plans: on_plans(study_plans, scrubber)))
    n_files = len(paths) + sum(i.action != "not_followed" for i in walk_issues)
    synthetic = bool(headers) and all(h.synthetic for h in headers)
    return ScanResult(plans, issues + plan_issues, n_files, scrubber, outcomes, synthetic)
