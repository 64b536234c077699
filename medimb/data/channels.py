"""The input channels a checkpoint takes, assembled from what a user has: a converted session, a 4D NIfTI or a
datalist item.

A checkpoint records what each of its input channels is (``preprocessing["channels"]``, the training
datalist's ``"channels"`` as ``medimb-prep datalist`` names them: ``phase-00`` ... DCE phases by number,
``phase[i]`` by position, ``sub-NN`` subtractions, ``image``, ``4d``, ``dwi``, ``timeseries``). Checkpoints
written before it was recorded are assumed to take the first N DCE phases, pre-contrast first
(:attr:`ChannelSpec.note` says so). What cannot be assembled is a one-line :class:`~medimb.errors.UserError`
naming what is missing, e.g. ``case sub-0003/ses-01: the model takes 4 DCE phases (phase-00..phase-03);
found phase-00, phase-01``.

Volumes of a 4D file become 3D files (``<work_dir>/<case>/<case>_<channel>.nii.gz``, same affine), so every
channel has a file on the source grid that overlays, previews and 3D Slicer can show.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medimb.atomic import atomic_output
from medimb.errors import UserError

_PHASE = re.compile(r"^phase-(\d+)$")
_POSITION = re.compile(r"^phase\[(-?\d+)\]$")


@dataclass(frozen=True)
class ChannelSpec:
    """What a model takes, one name per input channel; ``recorded`` False: assumed (an older checkpoint)."""

    names: tuple[str, ...]
    recorded: bool = True

    @classmethod
    def from_preprocessing(cls, preprocessing: Mapping) -> ChannelSpec:
        """The channels a checkpoint's ``preprocessing`` records, else the first ``in_channels`` DCE phases."""
        count = int(preprocessing.get("in_channels", 1))
        names = preprocessing.get("channels")
        if names and len(names) == count:
            return cls(tuple(str(n) for n in names))
        return cls(tuple(f"phase-{i:02d}" for i in range(count)), recorded=False)

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        """E.g. ``4 DCE phases (phase-00..phase-03)``."""
        from data_prep.datalist import describe_channels

        return describe_channels(list(self.names)) if self.recorded or self.count > 1 else "one channel"

    @property
    def note(self) -> str | None:
        """What was assumed for a checkpoint that does not record its channels (None when it does)."""
        if self.recorded:
            return None
        assumed = (f"assuming {self.describe()}, pre-contrast first" if self.count > 1 else
                   "assuming one channel: a 3D scan, a study's one image series, or else its first DCE phase")
        return f"the checkpoint does not record which channels it was trained on (written before medimb stored them): {assumed}"


#: item key: True when the item's channels were picked by :attr:`ChannelSpec.note`'s assumption
ASSUMED = "channels_assumed"


def _names(spec: ChannelSpec) -> dict:
    """``channel_names`` of an item given as is: the checkpoint's names when it records them."""
    return {"channel_names": list(spec.names)} if spec.recorded else {}


def _where(case: str) -> str:
    return f"case {case}"


def _volumes(path: str | Path) -> int:
    """Volumes along the 4th axis of a NIfTI file (1 for a 3D one)."""
    shape = nib.load(str(path)).shape
    return int(shape[3]) if len(shape) > 3 else 1


def _volume_indices(spec: ChannelSpec, volumes: int, case: str) -> list[int]:
    """Which volumes of a 4D DCE file (the phases in time order, pre-contrast first) give the model's channels."""
    names = list(spec.names)
    found = f"found a 4D file of {volumes} volumes (phase-00..phase-{volumes - 1:02d})"
    if all(_PHASE.match(n) for n in names):
        indices = [int(_PHASE.match(n).group(1)) for n in names]
    elif all(_POSITION.match(n) for n in names):
        indices = [int(_POSITION.match(n).group(1)) for n in names]
        indices = [i % volumes if -volumes <= i < volumes else volumes for i in indices]
    else:  # sub-NN, image, ...: a 4D DCE file holds neither
        hint = " (convert the DICOM study with --subtract)" if names[0].startswith("sub-") else ""
        raise UserError(f"{_where(case)}: the model takes {spec.describe()}; {found}{hint}")
    if any(i >= volumes for i in indices):
        raise UserError(f"{_where(case)}: the model takes {spec.describe()}; {found}")
    return indices


def split_volumes(path: str | Path, indices: list[int], names: list[str], out_dir: Path, case: str) -> list[str]:
    """Write volumes ``indices`` of the 4D NIfTI ``path`` as 3D files ``out_dir/<case>/<case>_<name>.nii.gz`` (the
    source's affine, sform/qform codes and voxel values, scaling applied; its free-text header fields are not
    copied: they may hold acquisition details), atomically; returns their paths. The source is only read."""
    img = nib.load(str(path))
    folder = Path(out_dir) / case
    paths = []
    for index, name in zip(indices, names):
        data = np.asanyarray(img.dataobj[..., index])  # scaled values: int when the source is unscaled
        if data.dtype == np.float64:
            data = data.astype(np.float32)
        header = img.header.copy()
        header.set_data_shape(data.shape)
        header.set_data_dtype(data.dtype)
        header.set_slope_inter(None, None)
        for text in ("descrip", "aux_file", "intent_name", "db_name"):
            if text in header:
                header[text] = b""
        target = folder / f"{case}_{re.sub(r'[^A-Za-z0-9-]+', '', name) or index}.nii.gz"
        with atomic_output(target, suffix=".nii.gz") as tmp:
            nib.save(nib.Nifti1Image(data, img.affine, header), str(tmp))
        paths.append(str(target))
    return paths


def file_item(path: str | Path, spec: ChannelSpec, case: str, work_dir: Path | None) -> dict:
    """An item from one NIfTI file: a 3D scan for a one-channel model, or a 4D DCE file (its volumes the phases
    in time order, as ``medimb-prep convert --dce-4d`` writes them) split into the model's channels under
    ``work_dir``."""
    volumes = _volumes(path)
    if volumes == 1:
        if spec.count != 1:
            raise UserError(f"{_where(case)}: the model takes {spec.describe()}; found one 3D volume "
                            f"({Path(path).name})")
        return {"image": [str(path)], "case": case, **_names(spec)}
    indices = _volume_indices(spec, volumes, case)
    if work_dir is None:
        raise UserError(f"{_where(case)}: a 4D file must be split into its volumes, but no folder was given to "
                        "write them to")
    names = [f"phase-{i:02d}" for i in indices]  # the volumes are the phases: named by their number
    return {"image": split_volumes(path, indices, names, work_dir, case), "case": case, "channel_names": names,
            ASSUMED: not spec.recorded}


def session_item(subject: str, session: str, rows: list[dict], spec: ChannelSpec, work_dir: Path | None) -> dict:
    """The item of a converted session (``rows``: its manifest rows, paths absolute; see
    :func:`data_prep.datalist.read_sessions`) with the model's channels picked by name; a session holding its
    DCE series only as a 4D file (``--dce-4d``) has the phases split out of it."""
    from data_prep.datalist import DatalistError, pick_named_channels

    case, where = f"{subject}_{session}", f"{subject}/{session}"
    names = list(spec.names)
    if not spec.recorded and spec.count == 1 and not any(r["kind"] in ("dce_phase", "4d") for r in rows):
        names = ["image"]  # an older one-channel checkpoint, a study without DCE: its one image series
    try:
        picked = pick_named_channels(rows, names, _where(where))
    except DatalistError as exc:
        four_d = [r for r in rows if r["kind"] == "4d"]
        if len(four_d) == 1 and not any(r["kind"] == "dce_phase" for r in rows):
            item = file_item(four_d[0]["path"], spec, case, work_dir)
            return {**item, "subject": subject, "session": session}
        raise UserError(str(exc)) from None
    paths = [r["path"] for r in picked]
    if len(paths) != spec.count:
        raise UserError(f"{_where(where)}: the model takes {spec.describe()}; found {len(paths)} volume(s) "
                        f"({', '.join(Path(p).name for p in paths)})")
    prefix = {"dce_phase": "phase", "subtraction": "sub"}
    shown = [f"{prefix[r['kind']]}-{int(r['phase']):02d}" if r["kind"] in prefix else n for r, n in zip(picked, names)]
    return {"image": paths, "case": case, "channel_names": shown, "subject": subject, "session": session,
            ASSUMED: not spec.recorded}


def fit_item(item: dict, spec: ChannelSpec, case: str, work_dir: Path | None) -> dict:
    """A datalist item (:func:`medimb.data.datalist.read_inference_items`) with the model's channels: as given
    when they match (by name when both the datalist and the checkpoint name them, else by count), picked by
    name from more, or split out of a single 4D file."""
    images, given = list(item["image"]), item.get("channel_names")
    named = bool(given) and spec.recorded
    if named and list(given) == list(spec.names):
        return item
    if named and set(spec.names) <= set(given):
        return {**item, "image": [images[given.index(n)] for n in spec.names], "channel_names": list(spec.names)}
    positions = [_POSITION.match(n) for n in spec.names]
    if named and all(positions) and all(_PHASE.match(n) for n in given):  # phase[-1] of the datalist's phases
        picked = [int(m.group(1)) for m in positions]
        if all(-len(given) <= i < len(given) for i in picked):
            return {**item, "image": [images[i] for i in picked], "channel_names": [given[i] for i in picked]}
    if len(images) == 1 and _volumes(images[0]) > 1:
        return {**item, **file_item(images[0], spec, case, work_dir)}
    if named:
        raise UserError(f"{_where(case)}: the model takes {spec.describe()}; the datalist gives {', '.join(given)}")
    if len(images) != spec.count:
        raise UserError(f"{_where(case)}: the model takes {spec.describe()}; the datalist gives {len(images)} "
                        "image file(s) per item")
    return {**item, **({"channel_names": list(given)} if given else _names(spec))}
