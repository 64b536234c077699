"""What ``medimb explain --data PATH`` accepts: a datalist JSON, a folder of NIfTI files, or one file."""

from __future__ import annotations

import json
from pathlib import Path

from medimb.data.datalist import NIFTI_SUFFIXES, case_ids
from medimb.errors import UserError

DATALIST_SPLITS = ("training", "validation", "test")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _from_datalist(path: Path, splits: list[str] | None) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read datalist {path}: {exc}") from exc
    if isinstance(data, list):
        tagged = [("", item) for item in data]
    elif isinstance(data, dict):
        missing = [s for s in splits or () if s not in data]
        if missing:
            raise UserError(f"datalist {path} has no split(s) {missing}; it has {sorted(data)}")
        wanted = splits or DATALIST_SPLITS  # default: every split, in the usual order
        tagged = [(key, item) for key in wanted for item in data.get(key, []) or []]
    else:
        raise UserError(f"datalist {path} must be a JSON object with splits or a list of items")
    base = path.parent.resolve()
    names = data.get("channels") if isinstance(data, dict) else None
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        names = None
    out = []
    for i, (split, item) in enumerate(tagged):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise UserError(f"datalist {path} item {i}: needs an 'image' key")
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        resolved = []
        for p in images:
            full = Path(p) if Path(p).is_absolute() else base / p
            if not full.is_file():
                raise UserError(f"datalist {path} item {i}: image file does not exist: {full}")
            resolved.append(str(full))
        label = item.get("label")
        entry = {"image": resolved, "label": None if label is None else int(label), "split": split}
        if item.get("mask"):
            mask = Path(item["mask"]) if Path(item["mask"]).is_absolute() else base / item["mask"]
            if not mask.is_file():
                raise UserError(f"datalist {path} item {i}: mask file does not exist: {mask}")
            entry["mask"] = str(mask)
        if names is not None and len(names) == len(resolved):
            entry["channel_names"] = list(names)
        out.append(entry)
    return out


def validation_items(path: str | Path) -> list[dict]:
    """The validation split of a datalist JSON as :func:`resolve_items` gives it (what ``--map-scale
    calibrated`` calibrates on); ``[]`` for a folder, a NIfTI file or a datalist without validation items."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".json"):
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(data, dict) or not data.get("validation"):
        return []
    return resolve_items(path, ["validation"])


def resolve_items(path: str | Path, splits: str | list[str] | None = None) -> list[dict]:
    """Items ``{"image": [abs path per channel], "label": int | None, "case": name, "split": str}`` to
    explain; datalist items also carry ``"mask"`` (absolute path of the item's truth mask, when the datalist has one)
    and ``"channel_names"`` (the datalist's ``"channels"``, e.g. ``["phase-00", "phase-01"]``, when given).

    ``path``: a datalist JSON (``splits`` picks datalist splits, e.g. ``["test"]``; default all), a folder
    (every ``.nii``/``.nii.gz`` below it, sorted) or a single NIfTI file. Raises :class:`UserError` for a missing path, an empty
    folder or a datalist with no items.
    """
    path = Path(path)
    splits = [splits] if isinstance(splits, str) else (list(splits) if splits else None)
    if not path.exists():
        raise UserError(f"--data {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p))
        if not files:
            raise UserError(f"--data folder {path} contains no .nii or .nii.gz files")
        items = [{"image": [str(p.resolve())], "label": None} for p in files]
    elif _is_nifti(path):
        items = [{"image": [str(path.resolve())], "label": None}]
    elif path.suffix.lower() == ".json":
        items = _from_datalist(path, splits)
        if not items:
            raise UserError(f"datalist {path} has no items" + (f" in split(s) {splits}" if splits else ""))
    else:
        raise UserError(f"--data must be a datalist .json, a folder or a .nii/.nii.gz file, got {path}")
    for item, case in zip(items, case_ids(items)):
        item["case"] = case
    return items
