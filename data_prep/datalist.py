"""Converted volumes + a labels table -> a MONAI datalist split by subject and stratified by class.

Output (docs/datalist.md, docs/architecture.md)::

    {"training": [{"image": ..., "label": 0, "subject": "sub-...", "session": "ses-1"[, "fold": k]}, ...],
     "validation": [...], "test": [...], ...metadata}

or, without a labels table (studies to predict), ``{"test": [items without "label"], "channels": [...],
"labelled": false}``.

``image`` is one path, or a list of paths (one per channel; DCE phases in time order, pre-contrast
first), relative to the datalist file's folder. Subjects never straddle two splits (every session of
a subject goes where the subject goes); splits are stratified by class with scikit-learn and
deterministic for a seed.
"""

from __future__ import annotations

import csv
import fnmatch
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from data_prep import deid
from data_prep.io import write_json_atomic

#: the manifest.csv columns (``data_prep.convert.MANIFEST_COLUMNS``) a datalist is built from
REQUIRED_MANIFEST_COLUMNS = ("subject", "session", "series", "description", "phase", "kind", "path")
SPLITS = ("training", "validation", "test")
CHANNEL_MODES = ("auto", "dce", "subtraction", "image", "4d", "dwi", "timeseries")
#: --channels mode -> manifest kind; the last three are one (3D or 4D) file each
_MODE_KINDS = {"dce": "dce_phase", "subtraction": "subtraction", "image": "image", "4d": "4d", "dwi": "dwi",
               "timeseries": "timeseries"}
_SINGLE_FILE_KINDS = ("image", "4d", "dwi", "timeseries")
_SHOWN = 5  # how many offending keys an error message lists


class DatalistError(ValueError):
    """A problem with the manifest, the labels or the requested split; the message says which."""


@dataclass(frozen=True)
class SplitSpec:
    """Fractions of subjects held out for validation and test, or K cross-validation folds over
    the non-test subjects (then there is no validation split: each training item gets a ``fold``)."""

    val: float = 0.2
    test: float = 0.2
    folds: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val", "test"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise DatalistError(f"--{name} must be in [0, 1), got {value}")
        if self.val + self.test >= 1.0:
            raise DatalistError(f"--val + --test must leave subjects for training, got {self.val + self.test}")
        if self.folds == 1 or self.folds < 0:
            raise DatalistError(f"--folds must be 0 (no folds) or at least 2, got {self.folds}")
        if self.folds and self.val:
            raise DatalistError("use either --val or --folds: with folds, each fold is the validation set in turn")


@dataclass
class Item:
    subject: str
    session: str
    images: list[str]  # manifest paths (relative to the converted folder), one per channel
    channels: list[str]  # what each channel is, e.g. "phase-00" or "image"
    label: int | None = None


# ----------------------------------------------------------------------------------------- reading
def read_manifest(converted: str | os.PathLike) -> list[dict]:
    """Rows of ``converted/manifest.csv`` (written by ``medimb-prep convert``)."""
    path = Path(converted) / "manifest.csv"
    if not path.is_file():
        raise DatalistError(f"no manifest.csv in {converted}; run `medimb-prep convert ARCHIVE {converted}` first")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatalistError(f"{path} lacks the columns {missing}; is it a medimb-prep convert manifest?")
        rows = list(reader)
    if not rows:
        raise DatalistError(f"{path} lists no converted volumes")
    return rows


def read_labels(path: str | os.PathLike, key: str, label_column: str = "label",
                hash_keys: bool = False, deid_key: str | None = None) -> dict[str, int]:
    """``{key value: integer label}`` from a CSV table.

    With ``hash_keys`` the key column holds PatientIDs, which are turned into the converter's subject
    pseudonyms (same ``deid_key``); error messages then name rows, never the IDs.
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistError(f"labels file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for wanted, option in ((key, "--key"), (label_column, "--label-column")):
            if wanted not in columns:
                raise DatalistError(f"{option} {wanted!r} is not a column of {path.name}; columns: {columns}")
        rows = list(reader)
    labels: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path.name} line {line}"
        value = (row[key] or "").strip()
        if not value:
            raise DatalistError(f"{where}: empty {key!r}")
        text = (row[label_column] or "").strip()
        try:
            label = int(float(text))
            if label != float(text) or label < 0:
                raise ValueError
        except ValueError:
            raise DatalistError(f"{where}: label {text!r} is not a non-negative integer class index") from None
        name = deid.pseudonymize(value, deid_key) if hash_keys else value
        if name in labels:
            shown = "" if hash_keys else f" {value!r}"
            raise DatalistError(f"{where}: duplicate key{shown}")
        labels[name] = label
    if not labels:
        raise DatalistError(f"{path} holds no labels")
    return labels


# ------------------------------------------------------------------------------- channel selection
def _phase_rows(rows: list[dict], kind: str) -> list[dict]:
    return sorted((r for r in rows if r["kind"] == kind), key=lambda r: int(r["phase"]))


def _pick_phases(rows: list[dict], indices: list[int], where: str) -> list[dict]:
    try:
        return [rows[i] for i in indices]
    except IndexError:
        raise DatalistError(f"{where}: has {len(rows)} DCE phases, --channels asks for {indices}") from None


def select_channels(rows: list[dict], channels: str, where: str) -> tuple[list[dict], list[str]]:
    """Pick the volumes that form one item's image from the manifest rows of one session.

    ``channels``: ``auto`` (the DCE phases if the session has a DCE series, else its one image
    series), ``dce``, ``subtraction``, ``image``, ``4d``, ``dwi`` (a 4D diffusion series),
    ``timeseries`` (a 4D fMRI/ASL/cine series), or comma-separated DCE phase indices such as
    ``0,1,-1`` (pre-contrast, first and last post-contrast). Returns (rows, channel names).
    """
    series = sorted({r["series"] for r in rows})
    by_kind = defaultdict(set)
    for r in rows:
        by_kind[r["kind"]].add(r["series"])
    mode = channels
    if mode == "auto":
        mode = "dce" if by_kind.get("dce_phase") else "image"
    wanted_kind = _MODE_KINDS.get(mode, "dce_phase")
    candidates = sorted(by_kind.get(wanted_kind, ()))
    if not candidates:
        raise DatalistError(f"{where}: no {wanted_kind} volume among its series {series}; "
                            "pick others with --channels or --series")
    if len(candidates) > 1:
        raise DatalistError(f"{where}: {len(candidates)} {wanted_kind} series {candidates}; "
                            "choose one with --series PATTERN")
    chosen = [r for r in rows if r["series"] == candidates[0]]
    if wanted_kind in _SINGLE_FILE_KINDS:
        picked = [r for r in chosen if r["kind"] == wanted_kind]
        return picked[:1], [wanted_kind]
    picked = _phase_rows(chosen, wanted_kind)
    if mode not in CHANNEL_MODES:
        try:
            indices = [int(v) for v in mode.split(",")]
        except ValueError:
            raise DatalistError(f"--channels {channels!r}: expected one of {CHANNEL_MODES} or phase indices "
                                "like 0,1,-1") from None
        picked = _pick_phases(picked, indices, where)
    prefix = "phase" if wanted_kind == "dce_phase" else "sub"
    if mode not in CHANNEL_MODES:  # named by the selection, so "last phase" matches across studies
        return picked, [f"phase[{i}]" for i in indices]
    return picked, [f"{prefix}-{int(r['phase']):02d}" for r in picked]


# ------------------------------------------------------------- channels named by a datalist (inference)
_NAMED = re.compile(r"^(phase|sub)-(\d+)$")
_POSITION = re.compile(r"^phase\[(-?\d+)\]$")
#: the file names `medimb-prep convert` writes (docs/data_prep.md, "Output layout")
CONVERTED_NAME = re.compile(r"^(?P<subject>sub-[A-Za-z0-9]+)_(?P<session>ses-[A-Za-z0-9]+)_(?P<series>.+?)"
                            r"(?:_(?P<suffix>phase|sub)-(?P<phase>\d+)|_(?P<four>4d))?\.nii(?:\.gz)?$")
_KIND_NAMES = {"dce_phase": "DCE phases", "subtraction": "subtraction volumes"}


def describe_channels(names: list[str]) -> str:
    """What channel names ask for, in words: ``4 DCE phases (phase-00..phase-03)``, ``1 image``."""
    names = list(names)
    numbers = [int(m.group(2)) for m in map(_NAMED.match, names) if m]
    if len(numbers) == len(names) and names and len({n.split("-")[0] for n in names}) == 1:
        what = "DCE phases" if names[0].startswith("phase") else "subtraction volumes"
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers))) and len(names) > 2
        shown = f"{names[0]}..{names[-1]}" if consecutive else ", ".join(names)
        return f"{len(names)} {what} ({shown})"
    if names and all(_POSITION.match(n) for n in names):
        return f"{len(names)} DCE phases by position ({', '.join(names)})"
    if len(names) == 1:
        return {"image": "1 image (a 3D series)", "4d": "a 4D DCE series"}.get(names[0], f"a {names[0]} series")
    return f"{len(names)} channels ({', '.join(names)})"


def _found(rows: list[dict], kind: str) -> str:
    """What a session has of ``kind`` (for error messages), or which series it has instead."""
    prefix = {"dce_phase": "phase", "subtraction": "sub"}.get(kind)
    have = _phase_rows(rows, kind) if prefix else [r for r in rows if r["kind"] == kind]
    if have:
        return ", ".join(f"{prefix}-{int(r['phase']):02d}" if prefix else r["series"] for r in have)
    series = sorted({f"{r['series']} ({r['kind']})" for r in rows})
    return f"no {_KIND_NAMES.get(kind, kind + ' volume')}; its series: {', '.join(series) or 'none'}"


def pick_named_channels(rows: list[dict], names: list[str], where: str) -> list[dict]:
    """The manifest rows of one session that give the channels ``names``: a datalist's ``"channels"`` as
    :func:`select_channels` names them (``phase-NN``, ``sub-NN``, ``phase[i]``, ``image``, ``4d``, ``dwi``,
    ``timeseries``), e.g. what a model was trained on. One row per name; a single-file kind gives its one row
    (``4d``: the 4D file, else every DCE phase of the session, which is the same stack). Raises
    :class:`DatalistError` naming what is missing, e.g. ``sub-0003/ses-01: the model takes 4 DCE phases
    (phase-00..phase-03); found phase-00, phase-01``."""
    names = list(names)
    wanted = describe_channels(names)
    if len(names) == 1 and names[0] in _SINGLE_FILE_KINDS:
        kind = names[0]
        if kind == "4d" and not any(r["kind"] == "4d" for r in rows):
            kind = "dce_phase"  # the phases are the 4D file's volumes
    elif names and all(_POSITION.match(n) for n in names):
        kind = "dce_phase"
    elif names and all(_NAMED.match(n) for n in names) and len({n.split("-")[0] for n in names}) == 1:
        kind = "dce_phase" if names[0].startswith("phase") else "subtraction"
    else:
        raise DatalistError(f"{where}: the model's channels {names} are not named as medimb-prep names them "
                            "(phase-NN, sub-NN, phase[i], image, 4d, dwi, timeseries); give a datalist instead")
    candidates = sorted({r["series"] for r in rows if r["kind"] == kind})
    if not candidates:
        hint = " (convert the study with --subtract)" if kind == "subtraction" else ""
        raise DatalistError(f"{where}: the model takes {wanted}; found {_found(rows, kind)}{hint}")
    if len(candidates) > 1:
        raise DatalistError(f"{where}: the model takes {wanted}; found {len(candidates)} {kind} series "
                            f"{candidates}; choose one with --series PATTERN (medimb predict / explain, "
                            "medimb-prep datalist)")
    chosen = [r for r in rows if r["series"] == candidates[0]]
    if kind in _SINGLE_FILE_KINDS:
        return [r for r in chosen if r["kind"] == kind][:1]
    ordered = _phase_rows(chosen, kind)
    if names[0] == "4d":
        return ordered
    if _POSITION.match(names[0]):
        indices = [int(_POSITION.match(n).group(1)) for n in names]
        if any(not -len(ordered) <= i < len(ordered) for i in indices):
            raise DatalistError(f"{where}: the model takes {wanted}; found {len(ordered)} DCE phases "
                                f"({_found(chosen, kind)})")
        return [ordered[i] for i in indices]
    by_phase = {int(r["phase"]): r for r in ordered}
    numbers = [int(_NAMED.match(n).group(2)) for n in names]
    if any(n not in by_phase for n in numbers):
        raise DatalistError(f"{where}: the model takes {wanted}; found {_found(chosen, kind)}")
    return [by_phase[n] for n in numbers]


def read_sessions(folder: str | os.PathLike) -> dict[tuple[str, str], list[dict]]:
    """The converted sessions under ``folder``, ``{(subject, session): manifest rows}`` with each row's ``path``
    made absolute: a converted folder (its ``manifest.csv``), a subject or session folder inside one (the rows
    of the manifest two or one level up that lie below it), or any folder of files named as ``medimb-prep
    convert`` names them (rows rebuilt from the names: ``_phase-NN`` a DCE phase, ``_sub-NN`` a subtraction,
    ``_4d`` the 4D DCE file, a ``.bval`` beside it a DWI series, anything else an image). ``{}`` when none."""
    folder = Path(folder).absolute()
    for root in (folder, folder.parent, folder.parent.parent):
        if (root / "manifest.csv").is_file():
            rows = read_manifest(root)
            inside = [dict(r, path=str(root / r["path"])) for r in rows]
            inside = [r for r in inside if Path(r["path"]).is_relative_to(folder)]
            return _group(inside)
    rows = []
    for path in sorted(folder.rglob("*.nii*")):
        match = CONVERTED_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[: -len(".nii")]
        if match["suffix"]:
            kind = "dce_phase" if match["suffix"] == "phase" else "subtraction"
        else:
            kind = "4d" if match["four"] else ("dwi" if (path.parent / f"{stem}.bval").is_file() else "image")
        rows.append({"subject": match["subject"], "session": match["session"], "series": match["series"],
                     "description": "", "phase": str(int(match["phase"])) if match["phase"] else "", "kind": kind,
                     "path": str(path)})
    return _group(rows)


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    sessions: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        sessions[(row["subject"], row["session"])].append(row)
    return dict(sorted(sessions.items()))


def collect_items(manifest: list[dict], channels: str = "auto", series: str | None = None) -> list[Item]:
    """One :class:`Item` per (subject, session) of the manifest; ``series`` keeps only rows whose
    series label or description matches the glob or substring (case-insensitive)."""
    sessions: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in manifest:
        if series and not series_matches(row, series):
            continue
        sessions[(row["subject"], row["session"])].append(row)
    if not sessions:
        raise DatalistError(f"no manifest row matches --series {series!r}")
    items = []
    for (subject, session), rows in sorted(sessions.items()):
        picked, names = select_channels(rows, channels, f"{subject}/{session}")
        items.append(Item(subject, session, [r["path"] for r in picked], names))
    shapes = Counter(tuple(item.channels) for item in items)
    if len(shapes) > 1:
        (common, _), = shapes.most_common(1)
        odd = [f"{i.subject}/{i.session} {i.channels}" for i in items if tuple(i.channels) != common][:_SHOWN]
        raise DatalistError(f"items have different channels (most have {list(common)}; e.g. {odd}); "
                            "select the same channels for all with --channels, e.g. 0,1,-1")
    return items


def series_matches(row: dict, pattern: str) -> bool:
    """Whether a manifest row's series label or description matches ``pattern`` (a glob or substring,
    case-insensitive): how ``--series`` picks series."""
    pattern = pattern.lower()
    for value in (row.get("series", ""), row.get("description", "")):
        value = (value or "").lower()
        if fnmatch.fnmatch(value, pattern) or pattern in value:
            return True
    return False


# ---------------------------------------------------------------------------------------- labelling
def attach_labels(items: list[Item], labels: dict[str, int], ignore_unlabeled: bool = False,
                  ignore_missing: bool = False, hashed: bool = False) -> list[Item]:
    """Give each item its label: a key matches a ``subject`` (every session) or a
    ``subject/session``. Raises on items without a label and labels without an item, unless told to
    ignore them. Returns the labelled items."""
    used: set[str] = set()
    labelled, unlabeled = [], []
    for item in items:
        for key in (f"{item.subject}/{item.session}", item.subject):  # the session's own label first
            if key in labels:
                item.label = labels[key]
                used.add(key)
                break
        (labelled if item.label is not None else unlabeled).append(item)
    if unlabeled and not ignore_unlabeled:
        shown = [f"{i.subject}/{i.session}" for i in unlabeled[:_SHOWN]]
        raise DatalistError(f"{len(unlabeled)} converted sessions have no label (e.g. {shown}); "
                            "add them to the labels file or pass --ignore-unlabeled")
    missing = sorted(set(labels) - used)
    if missing and not ignore_missing:
        shown = "" if hashed else f" (e.g. {missing[:_SHOWN]})"
        raise DatalistError(f"{len(missing)} labels match no converted series{shown}; check --key (and "
                            "--deid-key / --hash-keys), or pass --ignore-missing-images")
    if not labelled:
        raise DatalistError("no converted series has a label")
    return labelled


# ---------------------------------------------------------------------------------------- splitting
def split_subjects(subjects: list[str], classes: list[int], spec: SplitSpec) -> dict[str, str]:
    """``{subject: split}`` with ``spec.test`` and ``spec.val`` of the subjects held out, stratified by
    class (scikit-learn ``train_test_split``); one class per subject."""
    counts = Counter(classes)
    needed = 1 + (spec.test > 0) + (spec.val > 0)
    if spec.folds:
        needed = max(needed, spec.folds + (spec.test > 0))
    thin = {c: n for c, n in sorted(counts.items()) if n < needed}
    if thin:
        raise DatalistError(
            f"too few subjects to stratify: class(es) {thin} (class: subjects) but this split needs at least "
            f"{needed} subjects per class (one per split{' and fold' if spec.folds else ''}); "
            "lower --val/--test/--folds or add data")
    assignment = {s: "training" for s in subjects}
    remaining, remaining_y = list(subjects), list(classes)
    for split, fraction in (("test", spec.test), ("validation", spec.val)):
        if not fraction:
            continue
        share = fraction * len(subjects) / len(remaining)  # of what is left
        try:
            keep, held, keep_y, held_y = train_test_split(remaining, remaining_y, test_size=share,
                                                     stratify=remaining_y, random_state=spec.seed)
        except ValueError as exc:
            raise DatalistError(f"cannot hold out {fraction:g} of {len(subjects)} subjects for {split} "
                                f"with every class in it: {exc}") from None
        empty = sorted(set(remaining_y) - set(held_y))
        if empty:
            raise DatalistError(f"the {split} split ({len(held)} subjects = {fraction:g} of {len(subjects)}) "
                                f"would hold no subject of class(es) {empty}; raise --{split[:4] if split == 'test' else 'val'} "
                                "or add data")
        for s in held:
            assignment[s] = split
        remaining, remaining_y = keep, keep_y
    return assignment


def assign_folds(items: list[Item], folds: int, seed: int) -> list[int]:
    """Fold index per item (scikit-learn ``StratifiedGroupKFold``, grouped by subject)."""
    y = [item.label for item in items]
    groups = [item.subject for item in items]
    fold_of = np.zeros(len(items), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(items)), y, groups)):
        fold_of[held] = k
    return fold_of.tolist()


# ------------------------------------------------------------------------------------------ building
def build_datalist(
    converted: str | os.PathLike,
    labels_path: str | os.PathLike | None,
    key: str | None,
    output: str | os.PathLike,
    spec: SplitSpec = SplitSpec(),
    label_column: str = "label",
    channels: str = "auto",
    series: str | None = None,
    ignore_unlabeled: bool = False,
    ignore_missing: bool = False,
    hash_keys: bool = False,
    deid_key: str | None = None,
    masks: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
) -> dict:
    """Build the datalist and write it (atomically) to ``output``; returns it.

    ``class_names`` (one per class index 0..K-1) are written as ``"class_names"``.

    Image paths are written relative to ``output``'s folder. With ``masks`` (e.g. a synthetic
    archive's ``truth/`` folder), each item also gets ``"mask"``: ``<masks>/<subject>_lesion.nii.gz``.

    Without ``labels_path`` (new, unlabelled studies to predict): every session becomes an item without
    ``"label"`` in the one split ``"test"`` (:func:`build_unlabelled_datalist`).
    """
    converted, output = Path(converted), Path(output)
    items = collect_items(read_manifest(converted), channels, series)
    if labels_path is None:
        if class_names is not None:
            raise DatalistError("--class-names needs --labels (an unlabelled datalist has no classes)")
        _check_volumes(converted, items)
        return build_unlabelled_datalist(converted, items, output, masks)
    if key is None:
        raise DatalistError("--labels needs --key (the labels column that names the subjects)")
    labels = read_labels(labels_path, key, label_column, hash_keys, deid_key)
    items = attach_labels(items, labels, ignore_unlabeled, ignore_missing, hashed=hash_keys)
    _check_volumes(converted, items)
    subject_class: dict[str, int] = {}
    for item in items:  # a subject with sessions of different classes is stratified by its highest
        subject_class[item.subject] = max(item.label, subject_class.get(item.subject, item.label))
    subjects = sorted(subject_class)
    split_of = split_subjects(subjects, [subject_class[s] for s in subjects], spec)
    mask_of = _lesion_masks(Path(masks), items) if masks is not None else {}
    datalist: dict = {split: [] for split in SPLITS}
    for item in items:
        entry = _entry(converted, item, output, mask_of)
        datalist[split_of[item.subject]].append(entry)
    if spec.folds:
        training = [i for i in items if split_of[i.subject] == "training"]
        for entry, fold in zip(datalist["training"], assign_folds(training, spec.folds, spec.seed)):
            entry["fold"] = fold
        datalist["folds"] = spec.folds
    datalist["channels"] = items[0].channels
    datalist["num_classes"] = max(max(labels.values()), max(i.label for i in items)) + 1
    if class_names is not None:
        names = [n.strip() for n in class_names]
        if len(names) != datalist["num_classes"] or not all(names) or len(set(names)) != len(names):
            raise DatalistError(f"--class-names {','.join(class_names)!r}: give {datalist['num_classes']} distinct, "
                                f"non-empty names, one per class 0..{datalist['num_classes'] - 1}")
        datalist["class_names"] = names
    datalist["seed"] = spec.seed
    write_json_atomic(output, datalist)
    return datalist


def build_unlabelled_datalist(converted: Path, items: list[Item], output: Path,
                              masks: str | os.PathLike | None = None) -> dict:
    """Write the datalist of studies without labels (to predict, not to train): ``{"test": [items], "channels":
    [...], "labelled": false}``; items as :func:`build_datalist` writes them, without ``"label"``. One split,
    ``"test"`` (the split MONAI's decathlon datalists leave unlabelled), so the channel names can travel with
    the items; returns it."""
    mask_of = _lesion_masks(Path(masks), items) if masks is not None else {}
    datalist = {"test": [_entry(converted, item, output, mask_of) for item in items],
                "channels": items[0].channels, "labelled": False}
    write_json_atomic(output, datalist)
    return datalist


def _check_volumes(converted: Path, items: list[Item]) -> None:
    absent = [p for item in items for p in item.images if not (converted / p).is_file()]
    if absent:
        raise DatalistError(f"{len(absent)} volumes listed in manifest.csv are missing (e.g. {absent[:_SHOWN]}); "
                            "re-run `medimb-prep convert`")


def _entry(converted: Path, item: Item, output: Path, mask_of: dict[str, Path]) -> dict:
    """One datalist item: image path(s) relative to ``output``'s folder, label (when known), subject, session."""
    base = output.absolute().parent
    paths = [Path(os.path.relpath((converted / p).absolute(), base)).as_posix() for p in item.images]
    entry: dict = {"image": paths[0] if len(paths) == 1 else paths}
    if item.label is not None:
        entry["label"] = int(item.label)
    entry.update(subject=item.subject, session=item.session)
    if mask_of:
        entry["mask"] = Path(os.path.relpath(mask_of[item.subject].absolute(), base)).as_posix()
    return entry


def _lesion_masks(folder: Path, items: list[Item]) -> dict[str, Path]:
    """``{subject: <folder>/<subject>_lesion.nii.gz}``; every item must have one."""
    found = {i.subject: folder / f"{i.subject}_lesion.nii.gz" for i in items}
    absent = sorted(s for s, p in found.items() if not p.is_file())
    if absent:
        raise DatalistError(f"--masks {folder}: no <subject>_lesion.nii.gz for {len(absent)} subjects "
                            f"(e.g. {absent[:_SHOWN]})")
    return found


def class_count_summary(datalist: dict) -> str:
    """A small table of items, subjects and items per class in each split."""
    if datalist.get("labelled") is False:
        entries = datalist.get("test", [])
        return f"unlabelled: {len(entries)} items, {len({e['subject'] for e in entries})} subjects (split test)"
    classes = list(range(int(datalist.get("num_classes", 0))))
    header = ["split", "items", "subjects"] + [f"class {c}" for c in classes]
    lines = [header]
    for split in SPLITS:
        entries = datalist.get(split, [])
        per_class = Counter(e["label"] for e in entries)
        lines.append([split, str(len(entries)), str(len({e["subject"] for e in entries}))]
                     + [str(per_class.get(c, 0)) for c in classes])
    if datalist.get("folds"):
        for k in range(datalist["folds"]):
            entries = [e for e in datalist["training"] if e.get("fold") == k]
            per_class = Counter(e["label"] for e in entries)
            lines.append([f"  fold {k}", str(len(entries)), str(len({e["subject"] for e in entries}))]
                         + [str(per_class.get(c, 0)) for c in classes])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)
