"""Atomic file output: write beside the target under a temporary name, then rename.

A run killed mid-write never leaves a truncated checkpoint, JSON, PNG or NIfTI at the final path, and a
resumed run can trust every file it finds. The finished file gets the permissions a plain ``open`` would
give it (``0o666`` minus the umask), not the ``0o600`` of :func:`tempfile.mkstemp`, so results in a shared
project folder stay readable by the group.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".part") -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (created if needed); on a clean exit it replaces
    ``path``, on an exception it is deleted and ``path`` is left as it was.

    ``suffix`` ends the temporary name, for writers that pick the format from it (``".nii.gz"``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value):
    """numpy scalars/arrays and torch tensors as plain JSON values (imports neither unless needed)."""
    if hasattr(value, "tolist"):  # np.generic, np.ndarray, torch.Tensor
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON (numpy/torch values converted) to ``path`` atomically; returns ``path``."""
    import json

    return write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")
