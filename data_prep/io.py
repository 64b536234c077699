"""Atomic file output: write to a temporary file in the destination folder, then rename.

A killed process therefore never leaves a partial file under the final name, and a re-run can
trust that any file that exists is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path`` (atomic on POSIX).

    The temporary name keeps the full suffix (e.g. ``.nii.gz``) so writers that infer the format
    from the extension still work. On error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def remove_partial_files(folder: str | os.PathLike) -> int:
    """Delete temporary files left by a killed run under ``folder``; returns how many."""
    count = 0
    for p in Path(folder).rglob(".*.part*"):
        if p.is_file():
            p.unlink()
            count += 1
    return count
