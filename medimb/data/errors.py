"""Surfacing :class:`medimb.errors.DataError` through MONAI's exception wrapping (one clear line for the user)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from medimb.errors import DataError, error_in_chain

__all__ = ["DataError", "data_error_in", "surface_data_errors"]


def data_error_in(exc: BaseException | None) -> DataError | None:
    """The DataError that caused ``exc`` (MONAI wraps transform errors in RuntimeError), if any."""
    return error_in_chain(exc, DataError)


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
