"""De-identification: keyed pseudonyms and sanitising untrusted DICOM strings for paths.

Subjects are named by a keyed hash of PatientID (HMAC-SHA256), stable for a given key, so the same
patient gets the same pseudonym across runs and archives. Without a key, a published default is
used: that is fine for synthetic data but **not** for real data (anyone can hash candidate IDs), so
real users set ``--deid-key`` or ``MEDIMB_DEID_KEY``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

DEFAULT_KEY = "medimb-public-default-key"  # documented; only for synthetic/demo data
KEY_ENV = "MEDIMB_DEID_KEY"
PSEUDONYM_DIGITS = 10


def resolve_key(key: str | None = None) -> str:
    """The key to use: explicit argument, else ``$MEDIMB_DEID_KEY``, else the public default."""
    return key or os.environ.get(KEY_ENV) or DEFAULT_KEY


def keyed_hash(value: str, key: str | None = None, digits: int = PSEUDONYM_DIGITS) -> str:
    """Hex digest prefix of HMAC-SHA256(key, value): stable, not reversible without the key."""
    mac = hmac.new(resolve_key(key).encode(), str(value).strip().encode(), hashlib.sha256)
    return mac.hexdigest()[:digits]


def pseudonymize(patient_id: str, key: str | None = None) -> str:
    """BIDS-style subject label for a PatientID, e.g. ``'sub-3fa9c01b2e'``."""
    return f"sub-{keyed_hash(patient_id, key)}"


_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


def sanitize_label(value: object, max_len: int = 40, fallback: str = "unnamed") -> str:
    """Make an untrusted DICOM string safe as a path component.

    Only ASCII letters and digits survive; runs of anything else (``/``, ``..``, spaces, NUL, unicode)
    become one ``-``. Never empty, never ``.``/``..``, at most ``max_len`` characters.
    """
    text = _UNSAFE.sub("-", str(value or "")).strip("-")[:max_len].strip("-")
    return text or fallback


_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){3,}(?![\w])")


class PhiScrubber:
    """Removes the archive's PHI values and DICOM UIDs from any text we output.

    Built from the PatientName (whole and each component of >= 3 characters), PatientID,
    BirthDate, AccessionNumber and OtherPatientIDs values seen in the archive. Free text (series
    descriptions, archive-relative file paths in the report, log lines) passes through
    :meth:`scrub` before it is written anywhere.
    """

    def __init__(self, values=()):
        vals = sorted({v.strip() for v in values if v and len(v.strip()) >= 3}, key=len, reverse=True)
        self.values = tuple(vals)
        self._pattern = re.compile("|".join(re.escape(v) for v in vals), re.IGNORECASE) if vals else None

    def scrub(self, text: object) -> str:
        out = _UID.sub("[uid]", str(text))
        if self._pattern is not None:
            out = self._pattern.sub("[removed]", out)
        return out
