"""Shared fixtures only; the code behind them lives in the ``helpers`` package (tests/helpers/)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pytest's default (prepend) import mode already puts tests/ on sys.path for the test modules; this makes
# `import helpers` work the same whichever way a test module is imported
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers.dicom import write_dicom_series  # noqa: E402
from helpers.paths import SHARED  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$MEDIMB_SHARED_DATA``); skips the test when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture
def dicom_series():
    """The :func:`helpers.dicom.write_dicom_series` helper."""
    return write_dicom_series


@pytest.fixture(scope="session")
def orthanc():
    """A real Orthanc server on free loopback ports (:mod:`helpers.orthanc`), shared by the session and
    stopped at its end; skips only when Orthanc or its DICOMweb plugin cannot be found (says why)."""
    from helpers.orthanc import find_orthanc, start_orthanc

    binary, plugin, why = find_orthanc()
    if binary is None or plugin is None:
        pytest.skip(why)
    server = start_orthanc(binary, plugin)
    try:
        yield server
    finally:
        server.stop()
