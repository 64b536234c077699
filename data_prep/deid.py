"""De-identification: keyed pseudonyms, the PHI scrubber, and sanitising untrusted strings for paths.

Modelled on DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile with the
*Clean Descriptors* option (docs/data_prep.md has the table of what is kept, removed and replaced):

* Subjects are named by a keyed hash of PatientID (HMAC-SHA256), stable for a given key, so the same
  patient gets the same pseudonym across runs and archives. The key comes from ``--deid-key-file``,
  ``$MEDIMB_DEID_KEY`` or ``$MEDIMB_DEID_KEY_FILE``; without one, a published default is used, which
  is fine for the synthetic archive but **not** for real data (anyone can hash candidate IDs), and
  the commands warn when it is used on anything else.
* Free text we write (series descriptions, protocol names, archive-relative paths in the report,
  log lines and library warnings) passes through :class:`PhiScrubber`: the values of the archive's
  identifying attributes (names, IDs, institution, physicians, ...) are replaced by ``[removed]``,
  anything shaped like a DICOM UID by ``[uid]`` and dates in common formats by ``[date]``. Coded
  values (PatientPosition, ImageType, ...) are never scrubbed: they are not free text, and a
  PatientName of ``HFS`` must not blank out a patient position.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import warnings
from pathlib import Path

DEFAULT_KEY = "medimb-public-default-key"  # documented; only for synthetic/demo data
KEY_ENV = "MEDIMB_DEID_KEY"
KEY_FILE_ENV = "MEDIMB_DEID_KEY_FILE"
PSEUDONYM_DIGITS = 10

log = logging.getLogger("data_prep.deid")


class KeyFileError(ValueError):
    """The de-identification key cannot be read (missing or empty key file)."""


def read_key_file(path: str | os.PathLike) -> str:
    """The key held in a file (first line, surrounding whitespace removed); never empty."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip().splitlines()
    except OSError as exc:
        raise KeyFileError(f"cannot read the de-identification key file {path}: {exc.strerror or exc}") from exc
    if not key or not key[0].strip():
        raise KeyFileError(f"the de-identification key file {path} is empty")
    return key[0].strip()


def resolve_key(key: str | None = None, key_file: str | os.PathLike | None = None) -> str:
    """The key to use: explicit ``key``, else ``key_file``, else ``$MEDIMB_DEID_KEY``, else the file
    named by ``$MEDIMB_DEID_KEY_FILE``, else the public :data:`DEFAULT_KEY`."""
    if key:
        return key
    if key_file:
        return read_key_file(key_file)
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if os.environ.get(KEY_FILE_ENV):
        return read_key_file(os.environ[KEY_FILE_ENV])
    return DEFAULT_KEY


def is_public_key(key: str | None) -> bool:
    return resolve_key(key) == DEFAULT_KEY


PUBLIC_KEY_WARNING = (
    "the public default de-identification key is in use on an archive that is not medimb's synthetic "
    f"one: anyone can recompute these pseudonyms from candidate PatientIDs. Set ${KEY_ENV} or "
    f"${KEY_FILE_ENV} (or --deid-key-file) to a secret key for real data.")


def add_key_arguments(parser) -> None:
    """``--deid-key-file`` (and the discouraged ``--deid-key``) on a subcommand's parser."""
    parser.add_argument("--deid-key-file", default=None, metavar="FILE",
                        help=f"file holding the secret key for subject pseudonyms (default: ${KEY_ENV}, "
                             f"else the file named by ${KEY_FILE_ENV}, else a public demo key)")
    parser.add_argument("--deid-key", default=None, metavar="KEY",
                        help="the key itself (discouraged: other users see command lines in `ps`)")


def key_from_arguments(args) -> str:
    """The key the parsed arguments ask for (see :func:`resolve_key`); warns about a key on argv."""
    if getattr(args, "deid_key", None):
        log.warning("--deid-key puts the key on the command line, where other users of this machine can "
                    "read it (ps); prefer $%s or --deid-key-file", KEY_ENV)
    try:
        return resolve_key(getattr(args, "deid_key", None), getattr(args, "deid_key_file", None))
    except KeyFileError as exc:
        from data_prep.cli import UserError

        raise UserError(str(exc)) from exc


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


# ------------------------------------------------------------------------------------------ scrubber
#: a DICOM UID: four or more dot-separated numbers, wherever it sits (``0001_1.2.840....dcm`` included)
_UID = re.compile(r"(?<![0-9])[0-9]+(?:\.[0-9]+){3,}(?![0-9])")
_DAY = r"(?:0?[1-9]|[12][0-9]|3[01])"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_MONTH_NAME = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*"
_YEAR4 = r"(?:19|20)[0-9]{2}"
#: dates in the formats people and scanners type: 20220407, 2022-04-07, 2022.04.07, 07.04.2022,
#: 04/07/2022, 7-4-22, 07.04.22, 7 Apr 2022, Apr 7, 2022
_DATE = re.compile(
    r"(?<![0-9])(?:"
    rf"{_YEAR4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])"  # YYYYMMDD
    rf"|{_YEAR4}[-./_]{_MONTH}[-./_]{_DAY}"  # YYYY-MM-DD
    rf"|{_DAY}[-./_]{_MONTH}[-./_](?:{_YEAR4}|[0-9]{{2}})"  # DD.MM.YYYY, DD.MM.YY
    rf"|{_MONTH}[-./_]{_DAY}[-./_](?:{_YEAR4}|[0-9]{{2}})"  # MM/DD/YYYY
    r")(?![0-9])"
    rf"|(?<![A-Za-z0-9]){_DAY}[ .-]?{_MONTH_NAME}[ .,-]*{_YEAR4}(?![0-9])"  # 7 Apr 2022
    rf"|(?<![A-Za-z]){_MONTH_NAME}[ .-]*{_DAY},?[ .-]*{_YEAR4}(?![0-9])",  # April 7, 2022
    re.IGNORECASE,
)
_LONG_NUMBER = re.compile(r"[0-9]{6,}")
#: words too generic to remove when they appear inside an institution's name
_GENERIC_WORDS = frozenset("""
    hospital hospitals clinic clinics klinik klinikum clinique university universitat universitaet
    universite college medical medicine center centre centro imaging radiology diagnostic diagnostics
    general regional national county city state saint health healthcare institute institut the and
    for of de la der die das und children childrens womens mens memorial foundation department
    trust group practice private public research breast cancer mri""".split())


def identifying_values(name_values=(), other_values=(), institution_values=()) -> set[str]:
    """Strings to scrub from free text, from one file's identifying attributes.

    ``name_values``: person names in DICOM PN form (``Family^Given^Middle^Prefix^Suffix``, with
    ``=`` between alphabetic/ideographic/phonetic groups): the whole name and its family, given and
    middle components (2 characters or more). ``other_values``: IDs, numbers, dates: kept whole.
    ``institution_values``: the whole name and its distinctive words (4+ characters, not generic
    words such as *Hospital*).
    """
    out: set[str] = set()
    for name in name_values:
        name = str(name).strip()
        if not name:
            continue
        out.add(name)
        for group in name.split("="):
            parts = group.split("^")
            out.add(" ".join(p for p in parts[:3] if p).strip())
            for part in parts[:3]:
                out.update(w for w in re.split(r"[\s,]+", part) if len(w.strip(".")) >= 2)
    for v in other_values:
        if str(v).strip():
            out.add(str(v).strip())
    for inst in institution_values:
        inst = str(inst).strip()
        if not inst:
            continue
        out.add(inst)
        out.update(w for w in re.findall(r"[A-Za-z0-9]+", inst) if len(w) >= 4 and w.lower() not in _GENERIC_WORDS)
    return {v for v in out if len(v.strip()) >= 2}


def _value_pattern(value: str) -> str:
    """A value matched as a whole token: not inside a longer word or number (``Ann`` is removed
    from ``Ann_T1``, not from ``Annotation``; ``123456`` not from ``91234567``)."""
    v = re.escape(value)
    head = r"(?<![A-Za-z])" if value[:1].isalpha() else r"(?<![0-9])" if value[:1].isdigit() else ""
    tail = r"(?![A-Za-z])" if value[-1:].isalpha() else r"(?![0-9])" if value[-1:].isdigit() else ""
    return f"{head}{v}{tail}"


class PhiScrubber:
    """Removes the archive's identifying values, UIDs and dates from any free text we output.

    ``values``: strings to remove (see :func:`identifying_values`); matched case-insensitively as
    whole tokens, longest first. :meth:`scrub` is idempotent and never fails. ``descriptors=False``:
    :meth:`scrub_descriptor` returns "" (SeriesDescription and ProtocolName are then written nowhere:
    for archives whose descriptions may name people no header field names).
    """

    def __init__(self, values=(), key: str | None = None, descriptors: bool = True):
        self.descriptors = descriptors
        vals = sorted({str(v).strip() for v in values if v and len(str(v).strip()) >= 2}, key=len, reverse=True)
        self.values = tuple(vals)
        self.key = key
        # ASCII values lower-cased, for the prefilter of :meth:`_values_pattern`; None: never skipped
        self._lower = tuple(v.lower() if v.isascii() else None for v in vals)
        self._pattern = None  # every value (compiled when a text needs it)
        self._subsets: dict[tuple, re.Pattern] = {}
        self._memo: dict[str, str] = {}

    #: texts scrubbed are remembered (descriptions and details repeat); bounded, never pickled
    MEMO_MAX = 4096

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_memo={}, _subsets={}, _pattern=None)  # rebuilt on demand: workers get a small pickle
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _values_pattern(self, text: str):
        """A pattern equivalent, on ``text``, to the one of every value: one alternative per value
        that can occur in it (None when none can). One pattern of every value of a large archive
        costs about 1 ms a call (each alternative is tried at each position). For ASCII text, a value
        can match (case-insensitively, as a literal) only where its lower-case form is a substring of
        the text's; values with other characters, and non-ASCII texts, always use the full pattern's
        alternatives (Unicode case-insensitive matching is not plain lower-casing)."""
        if not self.values:
            return None
        if not text.isascii():
            if self._pattern is None:
                self._pattern = re.compile("|".join(_value_pattern(v) for v in self.values), re.IGNORECASE)
            return self._pattern
        low = text.lower()
        hits = tuple(i for i, v in enumerate(self._lower) if v is None or v in low)
        if not hits:
            return None
        pattern = self._subsets.get(hits)
        if pattern is None:
            pattern = re.compile("|".join(_value_pattern(self.values[i]) for i in hits), re.IGNORECASE)
            if len(self._subsets) >= 256:
                self._subsets.clear()
            self._subsets[hits] = pattern
        return pattern

    def scrub(self, text: object) -> str:
        text = str(text)
        memo = self._memo
        out = memo.get(text)
        if out is None:
            out = _UID.sub("[uid]", text)
            pattern = self._values_pattern(out)
            if pattern is not None:
                out = pattern.sub("[removed]", out)
            out = _DATE.sub("[date]", out)
            if len(memo) >= self.MEMO_MAX:
                memo.clear()
            memo[text] = out
        return out

    @staticmethod
    def scrub_coded(text: object) -> str:
        """UIDs and dates only, for coded values (PatientPosition, ImageType, ...): these come from
        the scanner's vocabulary, and a value that happens to equal a name part stays."""
        return _DATE.sub("[date]", _UID.sub("[uid]", str(text)))

    def scrub_descriptor(self, text: object) -> str:
        """:meth:`scrub` for descriptors (SeriesDescription, ProtocolName), which operators type:
        also any run of 6 or more digits (an ID or a number the archive does not reveal as one); ""
        when the scrubber keeps no descriptors."""
        return _LONG_NUMBER.sub("[id]", self.scrub(text)) if self.descriptors else ""

    def scrub_path(self, rel_path: object) -> str:
        """An archive-relative path with identifying parts replaced, component by component.

        A component in which nothing is found stays as it is. A file name with a UID, name or date in
        it keeps the rest (``0001_[uid].dcm``); a folder name with a name, ID or date in it (a patient
        folder such as ``SMITH JOHN 12.03.1947``, where the folder may hold words no header does) is
        replaced whole. Either way ``~`` and 8 hex digits of HMAC(key, original component) follow,
        so different files stay different in the report and whoever holds the key can match a
        candidate folder or file name."""
        parts = str(rel_path).replace(os.sep, "/").split("/")
        out = []
        for n, part in enumerate(parts):
            is_folder = n < len(parts) - 1
            cleaned = self.scrub(part)
            if is_folder and cleaned != _UID.sub("[uid]", part):
                cleaned = "[removed]"  # more than UIDs found in a folder name: drop all of it
            elif not _generic(cleaned):  # words we cannot vouch for (a name no header holds?)
                stem, dot, ext = cleaned.rpartition(".")
                cleaned = "[folder]" if is_folder else f"[file].{ext}" if dot and _generic(ext) else "[file]"
            if cleaned != part:
                cleaned = f"{cleaned}~{keyed_hash(part, self.key, 8)}"
            out.append(cleaned)
        return "/".join(out)


#: words a DICOM export's folder and file names are made of; report paths keep a name only when each
#: of its words of 3+ letters is one of these or looks hexadecimal (``ST078E4E``), so a patient's name
#: that no header holds still never reaches a report
EXPORT_WORDS = frozenset("""
    dicom dcm dicomdir ima img image images series ser study studies export exports data scan scans
    archive exam exams mri mrs dyn dce dwi dti adc flair sag cor tra axial coronal sagittal loc localizer
    survey scout pre post sub ses anat func fmap perf phase echo mag map maps part raw src
    txt json xml csv zip pdf jpg jpeg png bmp nii log
    """.split())
_WORD = re.compile(r"[A-Za-z]{3,}")


def _generic(name: str) -> bool:
    """Whether a (scrubbed) path component is made only of digits, short codes and export words."""
    name = name.replace("[uid]", "").replace("[date]", "").replace("[id]", "")
    return all(w.lower() in EXPORT_WORDS or re.fullmatch(r"[A-Fa-f]+", w) for w in _WORD.findall(name))


# -------------------------------------------------------------------------------- logs and warnings
class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs every record it passes (message, arguments and exception text).

    ``scrubber`` can be replaced once the archive's identifying values are known; ``root`` (the
    archive's absolute path) is replaced by ``ARCHIVE`` so absolute paths become archive-relative.
    """

    def __init__(self, scrubber: PhiScrubber | None = None, root: str | None = None):
        super().__init__()
        self.scrubber = scrubber or PhiScrubber()
        self.root = root

    def scrub(self, text: str) -> str:
        if self.root:
            text = text.replace(self.root, "ARCHIVE")
        return self.scrubber.scrub(text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.scrub(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


#: the filter installed by :func:`install_log_scrubbing` (one per process; forked workers inherit it)
_FILTER: ScrubbingFilter | None = None


def install_log_scrubbing() -> ScrubbingFilter:
    """Route Python warnings (pydicom's, nibabel's, numpy's) into logging and scrub every handler's
    output; returns the filter so callers can give it the archive's scrubber later."""
    global _FILTER
    logging.captureWarnings(True)
    # library warnings quote DICOM values and source paths: shown only with --verbose, and scrubbed
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if logging.getLogger().level <= logging.DEBUG
                                              else logging.ERROR)
    warnings.simplefilter("default")
    if _FILTER is None:
        _FILTER = ScrubbingFilter()
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    return _FILTER


def set_log_scrubber(scrubber: PhiScrubber, root: str | None = None) -> None:
    """Give the installed log filter (if any) the archive's scrubber and root folder."""
    if _FILTER is not None:
        _FILTER.scrubber = scrubber
        if root is not None:
            _FILTER.root = root
