"""What ``medimb predict --input PATH`` and ``medimb explain --data PATH`` accept, as items with the channels the
checkpoint takes (:mod:`medimb.data.channels`):

- a datalist JSON, labelled or not (``medimb-prep datalist`` without ``--labels``), or a list of items;
- a converted folder (``medimb-prep convert`` output, ``manifest.csv``), a ``sub-*`` or ``sub-*/ses-*`` folder
  inside one, or any folder of files named as the converter names them: one case per session;
- a NIfTI file: a 3D scan (one-channel models) or a 4D DCE file (``--dce-4d``; its volumes are the phases);
- a folder of NIfTI files that are none of the above: one case per file;
- a DICOM study or archive folder (one or several studies): converted with ``medimb-prep convert``'s code and
  de-identification into ``work_dir``, then one case per session.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medimb.data.channels import ChannelSpec, file_item, fit_item, session_item
from medimb.data.datalist import NIFTI_SUFFIXES, case_ids, case_name, read_inference_items
from medimb.errors import UserError

logger = logging.getLogger(__name__)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def validation_items(path: str | Path, channels: ChannelSpec | None = None,
                     work_dir: Path | None = None) -> list[dict]:
    """The validation split of a datalist JSON as :func:`resolve_items` gives it (what ``--map-scale
    calibrated`` calibrates on); ``[]`` for a folder, a NIfTI file or a datalist without validation items."""
    path = Path(path)
    if not (path.is_file() and path.suffix.lower() == ".json"):
        return []
    try:
        items = read_inference_items(path)
    except UserError:
        return []
    if not any(item["split"] == "validation" for item in items):
        return []
    return resolve_items(path, ["validation"], channels=channels, work_dir=work_dir)


def convert_dicom(folder: Path, work_dir: Path, deid_key: str | None, subtract: bool = False,
                  progress: bool = False, link_table: str | Path | None = None, descriptors: bool = True) -> Path:
    """Convert the DICOM study/archive ``folder`` into ``work_dir`` as ``medimb-prep convert`` does (same code,
    same de-identification and key; resumes a killed run); returns ``work_dir``. ``subtract``: also write the
    subtraction volumes (a model trained on them needs them). ``link_table``: also write the private link
    table there (``medimb-prep convert --link-table``). ``descriptors=False``: ``--no-descriptors``."""
    from data_prep.convert import ConvertOptions, OutputLocked, convert_archive

    try:
        result = convert_archive(str(folder), str(work_dir), workers=1, key=deid_key,
                                 options=ConvertOptions(subtract=subtract, descriptors=descriptors),
                                 progress=progress,
                                 link_table=None if link_table is None else str(link_table))
    except (ValueError, OutputLocked) as exc:
        raise UserError(str(exc)) from exc
    except OSError as exc:
        raise UserError(f"cannot write into {work_dir}: {exc.strerror or exc}") from exc
    if not result.rows:
        raise UserError(f"folder {folder} contains no .nii or .nii.gz files, converted sessions or DICOM series "
                        f"that convert (`medimb-prep scan {folder}` lists what is there)")
    return work_dir


def _sessions(folder: Path) -> dict:
    from data_prep.datalist import DatalistError, read_sessions

    try:
        return read_sessions(folder)
    except DatalistError as exc:
        raise UserError(str(exc)) from None


def _session_items(sessions: dict, channels: ChannelSpec, work_dir: Path | None, series: str | None) -> list[dict]:
    """One item per converted session; ``series``: only the rows of series whose label or description matches
    (``--series``, as ``medimb-prep datalist --series``), e.g. to choose between two DCE series of a study."""
    if series:
        from data_prep.datalist import series_matches

        sessions = {key: kept for key, rows in sessions.items()
                    if (kept := [r for r in rows if series_matches(r, series)])}
        if not sessions:
            raise UserError(f"no converted series matches --series {series!r} (their labels and descriptions are "
                            "in the converted folder's manifest.csv)")
    return [session_item(subject, session, rows, channels, work_dir) for (subject, session), rows in sessions.items()]


def resolve_items(path: str | Path, splits: str | list[str] | None = None, *, channels: ChannelSpec | None = None,
                  work_dir: str | Path | None = None, deid_key: str | None = None,
                  progress: bool = False, link_table: str | Path | None = None,
                  series: str | None = None, descriptors: bool = True) -> list[dict]:
    """Items ``{"image": [abs path per channel], "label": int | None, "case": name, "split": str}`` to predict
    and explain; datalist items also carry ``"mask"`` (absolute path of the item's truth mask, when the datalist
    has one), items carry ``"channel_names"`` (e.g. ``["phase-00", "phase-01"]``) when known.

    ``path``: see the module docstring (``splits`` picks datalist splits, e.g. ``["test"]``; default all).
    ``channels``: what the model takes (:meth:`ChannelSpec.from_preprocessing` of its checkpoint); the items get
    exactly those channels, or a one-line :class:`UserError` names what is missing. None: items as given (one
    channel per file; a session's image or first DCE phase). ``work_dir``: where DICOM is converted and 4D files are split (the commands
    pass ``OUT/converted``); ``deid_key``: the de-identification key of the conversion; ``link_table``: where the
    conversion also writes its private link table (DICOM input only; else refused); ``series``: converted sessions
    and DICOM only, keep the series whose label or description matches (else refused); ``descriptors=False``:
    DICOM is converted with ``medimb-prep convert --no-descriptors``. Raises
    :class:`UserError` for a missing path, an empty folder or a datalist with no items.
    """
    path = Path(path)
    work_dir = Path(work_dir) if work_dir is not None else None
    splits = [splits] if isinstance(splits, str) else (list(splits) if splits else None)
    spec = channels or ChannelSpec.from_preprocessing({})  # without a model: one channel
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if link_table is not None and not (path.is_dir() and not _sessions(path)
                                       and not any(_is_nifti(p) for p in path.rglob("*"))):
        raise UserError(f"--link-table links converted DICOM to its source; {path} is not a DICOM folder")
    if series and path.is_file():
        raise UserError(f"--series picks series of converted sessions or DICOM studies; {path} is a file")
    if path.is_file() and path.suffix.lower() == ".json":
        items = read_inference_items(path, splits)
        if not items:
            raise UserError(f"datalist {path} has no items" + (f" in split(s) {splits}" if splits else ""))
        for item, case in zip(items, case_ids(items)):
            item["case"] = case
        if channels is not None:
            items = [fit_item(item, channels, item["case"], work_dir) for item in items]
        return items
    if path.is_file():
        if not _is_nifti(path):
            raise UserError(f"expected a datalist .json, a .nii/.nii.gz file or a folder (DICOM, converted or NIfTI), "
                            f"got {path}")
        items = [file_item(path, spec, case_name(path), work_dir)] if channels else [
            {"image": [str(path.resolve())], "case": case_name(path)}]
    else:
        sessions = _sessions(path)
        files = [] if sessions else sorted(p for p in path.rglob("*") if p.is_file() and _is_nifti(p))
        if series and files and not sessions:
            raise UserError(f"--series picks series of converted sessions or DICOM studies; {path} holds NIfTI files")
        if sessions:
            items = _session_items(sessions, spec, work_dir, series)
        elif files:
            names = case_ids([{"image": [str(f)]} for f in files])
            items = [file_item(f.resolve(), spec, name, work_dir) if channels else
                     {"image": [str(f.resolve())], "case": name} for f, name in zip(files, names)]
        elif work_dir is None or not any(p.is_file() for p in path.rglob("*")):
            raise UserError(f"folder {path} contains no .nii or .nii.gz files" + ("" if work_dir is None else
                                                                                   " and no DICOM files"))
        else:  # no NIfTI: a DICOM study or archive
            subtract = any(n.startswith("sub-") for n in spec.names)
            converted = convert_dicom(path, work_dir, deid_key, subtract=subtract, progress=progress,
                                      link_table=link_table, descriptors=descriptors)
            items = _session_items(_sessions(converted), spec, work_dir, series)
    for item in items:
        item.setdefault("label", None)
        item.setdefault("split", "")
    return items
