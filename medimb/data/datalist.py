"""MONAI datalists written by ``medimb-prep datalist``: the one reader, for training and for inference.

``{"training": [...], "validation": [...], "test": [...]}``; each item is
``{"image": path | [path per channel], "label": int, "subject": "sub-..."}``. Paths are relative to the
datalist file's folder and are resolved against it, never against the working directory.

Training (:func:`read_datalist`) needs the three splits and a label on every item; inference
(:func:`read_inference_items`: ``medimb predict`` / ``explain``) takes any splits (or a top-level list of
items), items without ``"label"`` (``medimb-prep datalist`` without ``--labels`` writes such a datalist) and
plain path strings as items. Both check the same things the same way: keys, paths, channel counts.
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


def _load_json(path: Path):
    if not path.is_file():
        raise DataError(f"datalist does not exist: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc


def datalist_channel_names(data) -> list[str] | None:
    """The datalist's ``"channels"`` (what each image path is, e.g. ``["phase-00", "phase-01"]``), or None."""
    names = data.get("channels") if isinstance(data, dict) else None
    return list(names) if isinstance(names, list) and names and all(isinstance(n, str) for n in names) else None


def _item(item, base: Path, where: str, names: list[str] | None, require_label: bool) -> dict:
    """One datalist item with absolute ``image`` paths, an int ``label`` (None when absent and not required),
    an absolute ``mask`` (when given) and ``channel_names`` (the datalist's ``"channels"``, when they match)."""
    if isinstance(item, str) and not require_label:
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item or (require_label and "label" not in item):
        keys = sorted(item) if isinstance(item, dict) else type(item).__name__
        needed = "keys 'image' and 'label'" if require_label else "an 'image' key"
        raise DataError(f"{where}: items need {needed}, got {keys}")
    label = item.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise DataError(f"{where}: 'label' must be an integer class index, got {label!r}")
    images = _resolve(item, base, where)
    out = {**item, "image": images, "label": label}
    if item.get("mask"):
        mask = Path(item["mask"]) if Path(item["mask"]).is_absolute() else base / item["mask"]
        if not require_label and not mask.is_file():  # inference scores maps against it; training never reads it
            raise DataError(f"{where}: mask file does not exist: {mask}")
        out["mask"] = str(mask)
    if names is not None and len(names) == len(images):
        out["channel_names"] = list(names)
    return out


def _check_channels(items: list[dict], where: list[str]) -> None:
    """All items have as many channel images as the first (``where``: each item's place, for the message)."""
    for item, place in zip(items[1:], where[1:]):
        if len(item["image"]) != len(items[0]["image"]):
            raise DataError(
                f"{place}: item has {len(item['image'])} channel image(s) but earlier items have "
                f"{len(items[0]['image'])}: mismatched channels"
            )


@dataclass
class Datalist:
    """A validated datalist: ``splits`` ``{"train"|"val"|"test": [item, ...]}`` (absolute image paths),
    ``num_classes``, one name per class and the datalist's channel names (None when it has none)."""

    splits: dict[str, list[dict]]
    num_classes: int
    class_names: list[str]
    channels: list[str] | None = None


def load_datalist(path: str | Path, num_classes: int | None = None) -> dict[str, list[dict]]:
    """:func:`read_datalist`'s splits: ``{"train"|"val"|"test": [item, ...]}`` (bundles use it in their JSON)."""
    return read_datalist(path, num_classes).splits


def read_datalist(path: str | Path, num_classes: int | None = None) -> Datalist:
    """Read (once) and validate a datalist to train or evaluate on; returns its items with absolute paths,
    class count and names.

    Every item keeps its keys; ``image`` becomes a list of absolute paths (one per channel), ``label`` an int,
    ``mask`` an absolute path, and items get ``channel_names`` (the datalist's ``"channels"``, which training
    records in the checkpoint: ``medimb.training.config.preprocessing_for``). Raises :class:`DataError` for a
    missing file or split, wrong keys, a path that does not exist, items with different numbers of channels,
    labels outside ``[0, num_classes)`` or a one-class split. ``num_classes`` defaults to the datalist's own
    ``num_classes`` entry, else ``max(label) + 1``.
    """
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: a datalist must be a JSON object with keys {list(DATALIST_SPLITS)}")
    missing = [k for k in DATALIST_SPLITS if k not in data]
    if missing:
        hint = (" (an unlabelled datalist: predict on it with medimb predict)" if data.get("labelled") is False
                else "")
        raise DataError(f"{path}: datalist has no {missing} split(s); found keys {sorted(data)}{hint}")
    base = path.parent.resolve()
    names = datalist_channel_names(data)
    splits: dict[str, list[dict]] = {}
    every, places = [], []
    for key, split in DATALIST_SPLITS.items():
        items = data[key]
        if not isinstance(items, list) or not items:
            raise DataError(f"{path}: split '{key}' must be a non-empty list of items")
        out = []
        for i, item in enumerate(items):
            where = f"{path.name} {key}[{i}]"
            out.append(_item(item, base, where, names, require_label=True))
            places.append(where)
        splits[split] = out
        every += out
    _check_channels(every, places)
    if num_classes is None:
        num_classes = datalist_num_classes(data, splits)
    for split, items in splits.items():
        check_labels([it["label"] for it in items], num_classes, split)
    return Datalist(splits, num_classes, datalist_class_names(data, num_classes), names)


def read_inference_items(path: str | Path, splits: list[str] | None = None) -> list[dict]:
    """The items of a datalist to predict or explain: ``[{"image": [abs path per channel], "label": int | None,
    "split": datalist key ("" for a top-level list), ...}]`` in split order, each keeping its keys (``mask``
    absolute, ``channel_names`` from the datalist's ``"channels"``).

    ``data`` may be an object with splits (``splits`` picks some, e.g. ``["test"]``; default every one of
    training/validation/test it has) or a list of items; an item may be a plain path. Labels are optional.
    Raises :class:`DataError` for unreadable JSON, a requested split it lacks, a bad item or a missing file.
    """
    path = Path(path)
    data = _load_json(path)
    if isinstance(data, list):
        tagged = [("", i, item) for i, item in enumerate(data)]
    elif isinstance(data, dict):
        absent = [s for s in splits or () if s not in data]
        if absent:
            raise DataError(f"datalist {path} has no split(s) {absent}; it has {sorted(data)}")
        wanted = splits or list(DATALIST_SPLITS)
        tagged = []
        for key in wanted:
            items = data.get(key) or []
            if not isinstance(items, list):
                raise DataError(f"{path}: split '{key}' must be a list of items")
            tagged += [(key, i, item) for i, item in enumerate(items)]
    else:
        raise DataError(f"datalist {path} must be a JSON object with splits or a list of items")
    base = path.parent.resolve()
    names = datalist_channel_names(data)
    out, places = [], []
    for key, i, item in tagged:
        where = f"{path.name} {key}[{i}]" if key else f"{path.name} item {i}"
        out.append({**_item(item, base, where, names, require_label=False), "split": key})
        places.append(where)
    _check_channels(out, places)
    return out


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
    the item's ``case`` when it has one, else ``<subject>_<session>`` when it has both (``medimb-prep datalist``
    items; the name ``medimb predict`` gives a converted session), else :func:`case_name` of its first image
    path; made unique with ``_2``, ``_3`` ...; items whose image is an array (MedMNIST) are numbered in order."""
    ids, seen = [], {}
    for index, item in enumerate(items):
        image = item.get("image")
        first = image[0] if isinstance(image, (list, tuple)) and image else image
        if item.get("case"):
            name = str(item["case"])
        elif isinstance(item.get("subject"), str) and isinstance(item.get("session"), str):
            name = case_name(f"{item['subject']}_{item['session']}")
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
