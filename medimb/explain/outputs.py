"""An output folder that appears complete or not at all.

Everything is written into a hidden staging folder beside the destination; on success the staging
folder is renamed onto the destination (an existing destination is replaced only with
``overwrite=True``), on error it is deleted, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from medimb.errors import UserError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Give files and folders under ``root`` the usual permissions (temp files start as 0600/0700)."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Raise :class:`UserError` when ``out_dir`` is a file, or a non-empty folder without ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir} is not empty; choose another folder or pass --overwrite")


@contextlib.contextmanager
def staged_folder(out_dir: str | Path, overwrite: bool = False, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out_dir`` atomically (a rename). ``keep``: names of
    entries of an existing ``out_dir`` moved into the new folder just before (inputs the results point at)."""
    out_dir = Path(out_dir)
    check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
        make_readable(staging)
        for name in keep:
            if (out_dir / name).exists() and not (staging / name).exists():
                (out_dir / name).rename(staging / name)
        backup = None
        if out_dir.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            backup.rmdir()
            out_dir.rename(backup)
        staging.rename(out_dir)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
