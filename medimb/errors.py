"""The errors medimb raises for things the user can fix: each is printed as one line (exit status 2).

The lowest layer of the package: everything may import it, it imports nothing from medimb.

- :class:`UserError`: a mistake in the user's input (a path, an option, a file that does not fit).
- :class:`DataError`: input data that cannot be trained on as given (missing file, bad label, NaN).
- :class:`CheckpointError`: a checkpoint that is missing, truncated, corrupt (checksum) or does not fit.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: the command line prints it as one line and exits with status 2."""


class DataError(UserError, ValueError):
    """Input data that cannot be trained on as given (missing file, bad label, NaN, ...)."""


class CheckpointError(UserError, ValueError):
    """A file that is not a medimb checkpoint, is missing, truncated or corrupt (checksum mismatch), or whose
    weights or architecture do not fit what the caller needs."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The :class:`UserError` in ``exc``'s chain (``__cause__``/``__context__``), if any: MONAI and ignite
    wrap errors raised in transforms, handlers and config expressions in their own."""
    return error_in_chain(exc, UserError)


def error_in_chain(exc: BaseException | None, kind: type[Exception]):
    """The first exception of type ``kind`` in ``exc``'s chain (itself, ``__cause__``, ``__context__``), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
