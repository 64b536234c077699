"""Errors for bad input data: one clear line for the user (a :class:`medimb.cli.UserError`)."""

from __future__ import annotations

from medimb.cli import UserError


class DataError(UserError, ValueError):
    """Input data that cannot be trained on as given (missing file, bad label, NaN, ...)."""
