"""Errors for bad input data: one clear line for the user (a :class:`medimb.cli.UserError`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from medimb.cli import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be trained on as given (missing file, bad label, NaN, ...)."""


def data_error_in(exc: BaseException | None) -> DataError | None:
    """The DataError that caused ``exc`` (MONAI wraps transform errors in RuntimeError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def surface_data_errors() -> Iterator[None]:
    """Re-raise a :class:`DataError` buried in a MONAI/ignite exception chain as itself (one clear line)."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        err = data_error_in(exc)
        if err is None:
            raise
        raise DataError(str(err)) from exc
