"""MONAI datalists written by ``medimb-prep datalist``.

``{"training": [...], "validation": [...], "test": [...]}``; each item is
``{"image": path | [path per channel], "label": int, "subject": "sub-..."}``. Paths are relative to the
datalist file's folder and are resolved against it, never against the working directory.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from medimb.validation import check_labels
from medimb.data.errors import DataError

#: datalist key -> our split name
DATALIST_SPLITS = {"training": "train", "validation": "val", "test": "test"}


def _resolve(item: dict, base: Path, where: str) -> list[str]:
    image = item["image"]
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise DataError(f"{where}: 'image' must be a path or a non-empty list of paths, got {image!r}")
    resolved = []
    for p in paths:
        full = (base / p) if not Path(p).is_absolute() else Path(p)
        if not full.exists():
            raise DataError(f"{where}: image file does not exist: {full}")
        resolved.append(str(full))
    return resolved


@dataclass
class Datalist:
    """A validated datalist: ``splits`` ``{"train"|"val"|"test": [item, ...]}`` (absolute image paths),
    ``num_classes`` and one name per class."""

    splits: dict[str, list[dict]]
    num_classes: int
    class_names: list[str]


def load_datalist(path: str | Path, num_classes: int | None = None) -> dict[str, list[dict]]:
    """:func:`read_datalist`'s splits: ``{"train"|"val"|"test": [item, ...]}`` (bundles use it in their JSON)."""
    return read_datalist(path, num_classes).splits


def read_datalist(path: str | Path, num_classes: int | None = None) -> Datalist:
    """Read (once) and validate a datalist; returns its items with absolute paths, class count and names.

    Every item keeps its keys; ``image`` becomes a list of absolute paths (one per channel) and ``label``
    an int. Raises :class:`DataError` for a missing file or split, wrong keys, a path that does not exist,
    items with different numbers of channels, labels outside ``[0, num_classes)`` or a one-class split.
    ``num_classes`` defaults to the datalist's own ``num_classes`` entry, else ``max(label) + 1``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist does not exist: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: a datalist must be a JSON object with keys {list(DATALIST_SPLITS)}")
    missing = [k for k in DATALIST_SPLITS if k not in data]
    if missing:
        raise DataError(f"{path}: datalist has no {missing} split(s); found keys {sorted(data)}")
    base = path.parent.resolve()
    splits: dict[str, list[dict]] = {}
    n_channels = None
    for key, split in DATALIST_SPLITS.items():
        items = data[key]
        if not isinstance(items, list) or not items:
            raise DataError(f"{path}: split '{key}' must be a non-empty list of items")
        out = []
        for i, item in enumerate(items):
            where = f"{path.name} {key}[{i}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise DataError(f"{where}: items need keys 'image' and 'label', got {keys}")
            label = item["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise DataError(f"{where}: 'label' must be an integer class index, got {label!r}")
            images = _resolve(item, base, where)
            if n_channels is None:
                n_channels = len(images)
            elif len(images) != n_channels:
                raise DataError(
                    f"{where}: item has {len(images)} channel image(s) but earlier items have {n_channels}: "
                    "mismatched channels"
                )
            out.append({**item, "image": images, "label": label})
        splits[split] = out
    if num_classes is None:
        num_classes = datalist_num_classes(data, splits)
    for split, items in splits.items():
        check_labels([it["label"] for it in items], num_classes, split)
    return Datalist(splits, num_classes, datalist_class_names(data, num_classes))


def datalist_num_classes(data: dict, splits: dict[str, list[dict]]) -> int:
    """The class count of a datalist (``data``: its parsed JSON; ``splits``: :func:`load_datalist`'s items): its
    own ``num_classes`` entry (written by ``medimb-prep datalist``), else ``max(label) + 1``."""
    declared = data.get("num_classes")
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    return max(it["label"] for items in splits.values() for it in items) + 1


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_name(path: str | Path) -> str:
    """File name without ``.nii``/``.nii.gz``, reduced to ``[A-Za-z0-9._-]`` (safe in file names)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def case_ids(items: list[dict]) -> list[str]:
    """One identifier per item, the same in every output (predictions.csv of evaluate, explain, bundles):
    the item's ``case`` when it has one, else :func:`case_name` of its first image path, made unique
    with ``_2``, ``_3`` ...; items whose image is an array (MedMNIST) are numbered in order."""
    ids, seen = [], {}
    for index, item in enumerate(items):
        image = item.get("image")
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        if item.get("case"):
            name = str(item["case"])
        elif isinstance(first, (str, Path)):
            name = case_name(first)
        else:
            name = str(index)
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return ids


def class_counts(items: list[dict], num_classes: int) -> list[int]:
    """Items per class ``(K,)`` of datalist ``items`` (each with an int ``label``), as
    :attr:`medimb.data.DataSplits.class_counts` counts the training split."""
    counts = [0] * int(num_classes)
    for item in items:
        counts[int(item["label"])] += 1
    return counts


def datalist_class_names(data: dict, num_classes: int) -> list[str]:
    """The datalist's ``class_names`` (a list, or ``labels`` as a name -> index map), else ``"0"``, ``"1"``..."""
    names = data.get("class_names") or data.get("labels")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    if isinstance(names, dict):
        try:
            by_index = {int(v): str(k) for k, v in names.items()}
            if sorted(by_index) == list(range(num_classes)):
                return [by_index[i] for i in range(num_classes)]
        except (TypeError, ValueError):
            pass
    return [str(i) for i in range(num_classes)]
