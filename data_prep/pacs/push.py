"""Send DICOM files to a server: STOW-RS (DICOMweb) or C-STORE (DIMSE), through :mod:`data_prep.pacs.server`.

``push_files(server, paths)`` checks the server answers (C-ECHO, or a QIDO-RS query) before sending
anything, then stores the files 16 at a time as they are read (bounded memory: one STOW-RS request, or one
C-STORE association, per batch). Every failure is a one-line
:class:`data_prep.pacs.server.PacsError` (kinds ``unreachable``, ``refused``, ``auth``, ``failed``, ``usage``).

Pushing the same files twice does not duplicate them: a DICOM server identifies an instance by its SOP
Instance UID and keeps one copy (Orthanc and most PACS answer a second store of the same UID with success
and keep or replace the stored instance, by their configuration). medimb's result objects get UIDs derived
from their content (:mod:`medimb.export.objects`), so a re-run sends the same UIDs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .server import PacsError, ServerSpec, load_credentials, open_server, parse_server


BATCH = 16  # files read and sent together


@dataclass(frozen=True)
class PushSummary:
    server: str
    stored: int


def _datasets(paths: list[Path], bar) -> Iterator:
    import pydicom
    from pydicom.errors import InvalidDicomError

    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise PacsError(f"cannot push {path}: not a readable DICOM file ({exc})", "usage") from None
        yield ds
        if bar is not None:
            bar.update(1)


def push_files(server: str | ServerSpec, paths: Iterable[str | os.PathLike],
               credentials_file: str | os.PathLike | None = None, progress: bool = False) -> PushSummary:
    """Store the DICOM files ``paths`` on ``server`` (a server string or a parsed :class:`ServerSpec`).

    Credentials: ``credentials_file``, else the environment (:func:`data_prep.pacs.server.load_credentials`).
    Returns how many instances the server accepted.
    """
    spec = server if isinstance(server, ServerSpec) else parse_server(server, load_credentials(credentials_file))
    paths = [Path(p) for p in paths]
    if not paths:
        return PushSummary(spec.display(), 0)
    from tqdm import tqdm

    stored = 0
    with open_server(spec) as connection:
        connection.echo()  # fail before reading anything when the server is down, refuses us or our login
        with tqdm(total=len(paths), desc="push", unit="file", disable=not progress) as bar:
            # a batch at a time: a DIMSE store holds its batch in memory (one association per batch), and a
            # 256 x 256 x 64 float32 map is 17 MB
            for start in range(0, len(paths), BATCH):
                stored += connection.store(_datasets(paths[start:start + BATCH], bar))
    return PushSummary(spec.display(), stored)
