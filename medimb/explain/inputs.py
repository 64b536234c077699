"""What ``medimb explain --data PATH`` accepts: a datalist JSON, a folder of NIfTI files, or one file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from medimb.cli import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DATALIST_SPLITS = ("training", "validation", "test")


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def case_name(path: str | Path) -> str:
    """File name without ``.nii``/``.nii.gz``, reduced to ``[A-Za-z0-9._-]`` (safe in file names)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def _from_datalist(path: Path, split: str | None) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read datalist {path}: {exc}") from exc
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        if split is not None:
            if split not in data:
                raise UserError(f"datalist {path} has no split {split!r}; it has {sorted(data)}")
            items = data[split]
        else:  # every split, in the usual order
            items = [it for key in DATALIST_SPLITS for it in data.get(key, []) or []]
    else:
        raise UserError(f"datalist {path} must be a JSON object with splits or a list of items")
    base = path.parent.resolve()
    out = []
    for i, item in enumerate(items):
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
        out.append({"image": resolved, "label": None if label is None else int(label)})
    return out


def resolve_items(path: str | Path, split: str | None = None) -> list[dict]:
    """Items ``{"image": [abs path per channel], "label": int | None, "case": name}`` to explain.

    ``path``: a datalist JSON (``split`` picks one split; default all), a folder (every ``.nii``/``.nii.gz``
    below it, sorted) or a single NIfTI file. Raises :class:`UserError` for a missing path, an empty
    folder or a datalist with no items.
    """
    path = Path(path)
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
        items = _from_datalist(path, split)
        if not items:
            raise UserError(f"datalist {path} has no items" + (f" in split {split!r}" if split else ""))
    else:
        raise UserError(f"--data must be a datalist .json, a folder or a .nii/.nii.gz file, got {path}")
    seen: dict[str, int] = {}
    for item in items:
        name = case_name(item["image"][0])
        seen[name] = seen.get(name, 0) + 1
        item["case"] = name if seen[name] == 1 else f"{name}_{seen[name]}"
    return items
