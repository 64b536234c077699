"""Header-only reading of one DICOM file into a small, picklable :class:`FileHeader`.

Each file is opened once with ``stop_before_pixels`` (pixel data is read only at conversion). pydicom
keeps elements raw until they are accessed, and its per-element conversion dominated the scan time,
so :class:`RawHeader` decodes just the ~50 values we use straight from the raw bytes (sequences, i.e.
enhanced multi-frame functional groups, still go through pydicom). Enhanced (multi-frame) MR is flattened into one :class:`Frame` per frame using the
shared and per-frame functional groups. Problems become a :class:`FileIssue` with a report reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError

from data_prep import diffusion, mosaic
from data_prep.fastheader import parse_with_head, vr_of

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}

#: person names (PN) whose components are scrubbed from free text (see :func:`data_prep.deid.identifying_values`)
NAME_TAGS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
             "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
             "PhysiciansOfRecord", "RequestingPhysician", "OperatorsName")
#: IDs, numbers and dates removed wherever they appear whole
ID_TAGS = ("PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "StudyID",
           "DeviceSerialNumber", "PatientAddress", "PatientTelephoneNumbers", "StudyDate", "SeriesDate",
           "AcquisitionDate", "ContentDate", "InstitutionAddress", "StationName", "MedicalRecordLocator",
           "IssuerOfPatientID")
#: institution names: the whole name and its distinctive words
INSTITUTION_TAGS = ("InstitutionName", "InstitutionalDepartmentName")
#: one file's decoded pixels may not exceed this (a damaged Rows/NumberOfFrames must not exhaust memory)
MAX_DECODED_BYTES = 4 << 30
#: PixelSpacing outside this range (mm) is not a real scan
SPACING_RANGE_MM = (1e-3, 1e3)
#: direction cosines must be unit vectors and orthogonal within this tolerance
ORIENTATION_TOL = 1e-2
_FLOAT32_MAX = 3.4e38

#: ImageType / FrameType values (3rd and later) that say what an image is, and the part name we use
#: (BIDS-like ``part`` entity); images of one series with different parts become separate volumes
PARTS = {
    "M": "mag", "MAGNITUDE": "mag", "P": "phase", "PHASE": "phase", "R": "real", "REAL": "real",
    "I": "imag", "IMAGINARY": "imag", "W": "water", "WATER": "water", "F": "fat", "FAT": "fat",
    "IP": "inphase", "IN_PHASE": "inphase", "OP": "outphase", "OUT_PHASE": "outphase",
    "OPP_PHASE": "outphase", "FIELD_MAP": "fieldmap", "B0_MAP": "fieldmap", "B0MAP": "fieldmap",
}
#: GE private image type (0043,102F) values
GE_IMAGE_TYPE = {0: "mag", 1: "phase", 2: "real", 3: "imag"}
#: GE 3D B0 maps store the magnitude and the field map (Hz) of each slice as two images with the same
#: position and time; (0043,1030) tells them apart: 2 magnitude, 0 field map (seen on every GE B0 map
#: of dcm_qa_fmap, which dcm2niix also splits into a magnitude and a ``fieldmaphz`` volume)
GE_VAS_COLLAPSE = {2: "mag", 0: "fieldmap"}
#: private elements read by name: name -> (tag, VR). Their VR is not in pydicom's dictionary, so
#: implicit-VR files need it from here.
PRIVATE_TAGS = {
    "GEImageType": (0x0043102F, "SS"),
    "GEVasCollapse": (0x00431030, "SS"),
    "SiemensCSAImageHeader": (0x00291010, "OB"),
    "PhilipsScaleSlope": (0x2005100E, "FL"),
}
PRIVATE_TAGS.update({f"Diffusion{tag:08X}": (tag, vr) for tag, (vr, _) in diffusion.DIFFUSION_PRIVATE_TAGS.items()})
#: attributes that say an image may be diffusion-weighted (only then is :func:`diffusion.diffusion_of`
#: run: on Siemens files it parses the CSA header, which costs about 1 ms)
_DIFFUSION_HINT_TAGS = ("DiffusionBValue", 0x0019100C, 0x00431039, 0x20011003, 0x00651009)  # ... UIH b-value

#: Philips enhanced MR: the private per-frame functional group that holds the frame's scale slope
PHILIPS_PER_FRAME_PRIVATE = 0x2005140F

#: ImplementationVersionName of the files `medimb-prep synth` writes (invented identities: the public
#: de-identification key is fine for them, and only for them)
SYNTH_MARK = "MEDIMB_SYNTH"

#: the only tags read during the scan (everything the plan, the sidecar and the scrubber need)
HEADER_TAGS = [
    "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType",
    "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs",
    "StudyInstanceUID", "SeriesInstanceUID", "StudyDate", "StudyTime",
    "SeriesNumber", "SeriesDescription", "ProtocolName",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
    "BitsStored", "PixelRepresentation", "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept",
    "EchoNumbers", "EchoTime", "RepetitionTime", "FlipAngle", "InversionTime",
    "TemporalPositionIdentifier", "NumberOfTemporalPositions", "TriggerTime", "AcquisitionTime",
    "AcquisitionNumber", "ContentTime", "AcquisitionDateTime",
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "PulseSequenceName",
    "BodyPartExamined", "PatientPosition", "ImagingFrequency", "PixelBandwidth",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "InstanceNumber",
    "DiffusionBValue", "DiffusionGradientOrientation", "DiffusionDirectionality", "InPlanePhaseEncodingDirection",
    "ImageComments",  # Canon classic DWI: the gradient as text (data_prep.diffusion; read for Canon only)
    # identifying attributes (PS3.15 Table E.1-1): read only to scrub them from every output
    *NAME_TAGS, *ID_TAGS, *INSTITUTION_TAGS,
]


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UC", "UR", "UT"}
_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FD": "d", "FL": "f"}
_TAGS = {kw: tag_for_keyword(kw) for kw in HEADER_TAGS + ["SpecificCharacterSet"]}
_TAGS.update({name: tag for name, (tag, _) in PRIVATE_TAGS.items()})
_PRIVATE_VR = {tag: vr for tag, vr in PRIVATE_TAGS.values()}
_WANTED = set(_TAGS.values())


def _tag(keyword: str | int) -> int | None:
    """A keyword (or a private name of :data:`PRIVATE_TAGS`) as its tag; an int is a tag already."""
    if type(keyword) is int:
        return keyword
    tag = _TAGS.get(keyword)
    return tag if tag is not None else tag_for_keyword(keyword)


def _vr(tag: int, vr) -> str:
    """The VR to decode with: the element's own, else ours for private tags, else the dictionary's."""
    if vr and vr != "UN" and vr != b"UN":
        return vr.decode("ascii", "replace") if isinstance(vr, bytes) else vr
    if tag in _PRIVATE_VR:
        return _PRIVATE_VR[tag]
    return vr_of(tag, None)


def decode_value(vr: str, raw: bytes, end: str = "<", encoding: str = "latin-1", default=None):
    """A raw element value as ``str`` / ``list[str]`` (text VRs), number or tuple (binary VRs), else bytes."""
    if not raw:
        return default
    if vr in _TEXT_VRS:
        text = raw.decode(encoding, "replace").rstrip("\x00 ").strip()
        if not text:
            return default
        return [t.strip() for t in text.split("\\")] if ("\\" in text and vr not in _SINGLE_TEXT) else text
    if vr in _BINARY:
        fmt = _BINARY[vr]
        n = len(raw) // struct.calcsize(fmt)
        vals = struct.unpack(f"{end}{n}{fmt}", raw[: n * struct.calcsize(fmt)])
        return vals[0] if n == 1 else vals
    return raw


def _encoding(charset) -> str:
    return "utf-8" if "192" in str(charset or "") else "latin-1"


class RawHeader:
    """``get(keyword)`` over a dataset read with pydicom, decoding raw element bytes directly.

    Text values become ``str`` (or ``list`` of ``str`` when multi-valued), binary numbers ``int``/
    ``float`` (or tuples), sequences pydicom ``Sequence`` objects; absent or empty values ``default``.
    """

    def __init__(self, ds, little_endian: bool = True):
        self._ds = ds
        self._end = "<" if little_endian else ">"
        cs = ds.get_item(0x00080005)
        self._encoding = _encoding(cs.value if cs is not None else "")

    def get(self, keyword: str | int, default=None):
        tag = _tag(keyword)
        el = self._ds.get_item(tag) if tag is not None else None
        if el is None:
            return default
        if not isinstance(el, RawDataElement):
            value = el.value
            if isinstance(value, bytes) and tag in _PRIVATE_VR:  # a private element pydicom read as UN
                return decode_value(_PRIVATE_VR[tag], value, self._end, self._encoding, default)
            return default if value is None or value == "" else value
        vr = _vr(tag, el.VR)
        if vr == "SQ":
            return self._ds[tag].value
        return decode_value(vr, el.value, self._end, self._encoding, default)


#: decoded values of :class:`FastHeader`, shared by the files a process reads: the files of one series
#: repeat most values byte for byte. Bounded (cleared when full; long values are never kept).
_DECODED: dict = {}
_DECODED_MAX = 8192
_DECODED_MAX_BYTES = 256
_UNSEEN = object()


class FastHeader:
    """The same ``get(keyword)`` over the raw elements found by :mod:`data_prep.fastheader`."""

    def __init__(self, elements: dict):
        self._elements = elements
        self._decoded: dict = {}  # each element is decoded once, however often it is asked for
        cs = elements.get(0x00080005)
        self._encoding = _encoding(cs[1] if cs else "")

    def get(self, keyword: str | int, default=None):
        # the scan's most frequent call (~50 a file): the common paths are written out inline
        try:
            value = self._decoded[keyword]
        except KeyError:
            tag = _TAGS.get(keyword) if type(keyword) is str else keyword
            if tag is None:
                tag = _tag(keyword)
            item = self._elements.get(tag)
            if item is None:
                value = None
            elif len(item[1]) > _DECODED_MAX_BYTES:
                value = decode_value(_vr(tag, item[0]), item[1], "<", self._encoding)
            else:
                key = (tag, item, self._encoding)
                value = _DECODED.get(key, _UNSEEN)
                if value is _UNSEEN:
                    value = decode_value(_vr(tag, item[0]), item[1], "<", self._encoding)
                    if len(_DECODED) >= _DECODED_MAX:
                        _DECODED.clear()
                    _DECODED[key] = value
            self._decoded[keyword] = value
        return default if value is None else value

    def raw_key(self, tags: tuple) -> tuple:
        """The raw values of ``tags`` (and the text encoding): equal keys decode to equal values."""
        get = self._elements.get
        return (self._encoding, *[get(t) for t in tags])


@dataclass(frozen=True)
class Frame:
    """One 2D image: a classic single-frame file (``frame=None``) or frame ``frame`` of a multi-frame file.

    ``position`` (3,) and ``orientation`` (6,) are LPS (see :mod:`data_prep.geometry`); ``time_key``
    orders acquisitions at the same position (temporal position, trigger time, acquisition time
    in s, acquisition number); ``time_s`` is the acquisition time of day in seconds (or None);
    ``echo`` the EchoNumbers (classic) or EffectiveEchoTime (enhanced); ``part`` what the image is
    (magnitude, phase, water, field map, ...: :func:`image_part`).
    """

    path: str
    frame: int | None
    position: tuple | None
    orientation: tuple | None
    spacing: tuple | None
    slope: float
    inter: float
    echo: float | None
    time_key: tuple
    time_s: float | None
    sop_uid: str
    pixel: tuple | None = None  # native pixel data layout (see :func:`native_layout`), else None
    part: str = ""  # image component (:data:`PARTS`), "" when the header does not say
    diffusion: tuple | None = None  # (b-value, x, y, z) of a diffusion-weighted image, else None
    tile: tuple | None = None  # Siemens mosaic: (tile index, tiles per side, tile rows, tile cols)
    instance: int | None = None  # InstanceNumber: orders volumes (never slices) where times are equal


@dataclass
class FileHeader:
    """What the scan keeps of one DICOM file (PHI fields are used only for pseudonyms/scrubbing)."""

    path: str
    patient_id: str
    phi: tuple
    study_uid: str
    study_datetime: str
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    image_type: tuple
    sop_class: str
    transfer_syntax: str
    rows: int
    cols: int
    slice_thickness: float | None
    spacing_between_slices: float | None
    frames: list[Frame] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    synthetic: bool = False  # written by `medimb-prep synth` (ImplementationVersionName SYNTH_MARK)
    samples: int = 1  # SamplesPerPixel: 3 for colour (RGB24), never stacked with grey images of its series


@dataclass(frozen=True)
class FileIssue:
    """A file that cannot take part in conversion, with a report ``reason`` code and a detail.

    ``phi`` holds the file's identifying values when its header could be read (so that they are
    scrubbed from every output even though the file itself is not converted)."""

    path: str
    reason: str
    detail: str
    phi: tuple = ()


class InvalidHeader(ValueError):
    """A header value that is present but cannot be right; ``reason`` is a report code
    (``invalid_value`` or ``invalid_geometry``). Details name the attribute, never its value."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def tm_seconds(value) -> float | None:
    """DICOM TM (``HHMMSS.ffffff``) or the time part of a DT, as seconds since midnight."""
    text = str(value or "").strip()
    if not text:
        return None
    if len(text) > 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS.ffffff
        text = text[8:]
    text = text.replace(":", "")
    try:
        hh = int(text[0:2])
        mm = int(text[2:4] or 0)
        ss = float(text[4:] or 0)
    except ValueError:
        return None
    t = hh * 3600 + mm * 60 + ss
    return t if math.isfinite(t) else None


_MULTI = (list, tuple, pydicom.multival.MultiValue)


def _num(value, default=None):
    """One finite number, else ``default`` (absent, empty, non-numeric, multi-valued, NaN, inf)."""
    try:
        if value is None or value == "":
            return default
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


def _int_or_none(value) -> int | None:
    """One integer value (``'3'``, ``3``, ``'3.0'``), else None."""
    f = _num(value)
    return int(f) if f is not None and f == int(f) else None


def _one_int(ds, keyword: str, default: int | None = None, lo: int = 0, hi: int | None = None) -> int:
    """A required single integer in ``[lo, hi]``; absent gives ``default`` (or fails when None)."""
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise InvalidHeader("invalid_value", f"{keyword} is missing")
        return default
    if isinstance(value, _MULTI) and not isinstance(value, str):
        raise InvalidHeader("invalid_value", f"{keyword} has {len(value)} values where one is expected")
    n = _int_or_none(value)
    if n is None or n < lo or (hi is not None and n > hi):
        limits = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise InvalidHeader("invalid_value", f"{keyword} is not an integer in {limits}")
    return n


def _scaling(slope_value, inter_value) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)``: absent gives (1, 0); present must be finite, storable as
    float32 (NIfTI scl_slope/scl_inter) and the slope non-zero."""
    out = []
    for keyword, value, default in (("RescaleSlope", slope_value, 1.0), ("RescaleIntercept", inter_value, 0.0)):
        if value is None or value == "":
            out.append(default)
            continue
        f = _num(value[0] if isinstance(value, _MULTI) and not isinstance(value, str) and len(value) else value)
        if f is None or abs(f) > _FLOAT32_MAX or (keyword == "RescaleSlope" and f == 0):
            raise InvalidHeader("invalid_value", f"{keyword} is not a finite{' non-zero' if default else ''} number")
        out.append(f)
    return out[0], out[1]


def philips_precise_float(slope: float, inter: float, scale_slope) -> tuple[float, float] | None:
    """Philips "precise float" scaling, dcm2niix's default for Philips (its ``-p y``).

    Philips stores display values ``DV = raw * RS + RI`` (RescaleSlope/Intercept) and a private
    scale slope ``SS`` (2005,100E); the floating-point value is ``FP = DV / (RS * SS)``, i.e.
    ``raw / SS + RI / (RS * SS)``. Returns that ``(slope, intercept)``, or None when ``SS`` is absent,
    not finite or zero (display values are then kept, as dcm2niix does).
    """
    ss = _num(scale_slope[0] if isinstance(scale_slope, _MULTI) and len(scale_slope) else scale_slope)
    if ss is None or ss == 0:
        return None
    return 1.0 / ss, inter / (slope * ss)


def _private_item_value(item, tag: int):
    """A private element's value in a (pydicom) sequence item, decoded when pydicom left it raw."""
    if item is None:
        return None
    el = item.get(tag)
    if el is None:
        return None
    value = el.value
    if isinstance(value, bytes) and tag in _PRIVATE_VR:
        return decode_value(_PRIVATE_VR[tag], value)
    return value


def _echo(value) -> float | None:
    """EchoNumbers / EffectiveEchoTime: absent gives None; present must be one finite number."""
    if value is None or value == "":
        return None
    if isinstance(value, _MULTI) and not isinstance(value, str):
        value = value[0] if len(value) else None
    f = _num(value)
    if f is None:
        raise InvalidHeader("invalid_value", "the echo number/time is not a finite number")
    return f


def _seq_item(groups, keyword):
    """First item of ``keyword`` sequence within a functional-groups item, or None."""
    if groups is None:
        return None
    seq = groups.get(keyword)
    if isinstance(keyword, int) and seq is not None:  # by tag, pydicom gives the element
        seq = seq.value
    return seq[0] if seq else None


def _fg(per_frame, shared, keyword):
    """A functional group macro item: per-frame first, then shared."""
    return _seq_item(per_frame, keyword) or _seq_item(shared, keyword)


def _vector(value, n: int, keyword: str) -> tuple | None:
    """``n`` finite numbers; absent gives None (a series-level ``missing_geometry``), anything else
    that is not ``n`` finite numbers is an ``invalid_geometry`` of this file."""
    if value is None or value == "":
        return None
    values = [value] if isinstance(value, str) or not isinstance(value, _MULTI) else list(value)
    nums = [_num(v) for v in values]
    if len(nums) != n or any(v is None for v in nums):
        raise InvalidHeader("invalid_geometry", f"{keyword} is not {n} finite numbers")
    return tuple(nums)


def check_geometry(position, orientation, spacing) -> None:
    """Raise :class:`InvalidHeader` (``invalid_geometry``) unless the direction cosines are unit,
    orthogonal vectors (within :data:`ORIENTATION_TOL`) and PixelSpacing lies in
    :data:`SPACING_RANGE_MM`. ``None`` (absent) values are not checked here."""
    if orientation is not None:
        r, c = orientation[:3], orientation[3:]
        norm_r, norm_c = math.sqrt(sum(v * v for v in r)), math.sqrt(sum(v * v for v in c))
        if abs(norm_r - 1) > ORIENTATION_TOL or abs(norm_c - 1) > ORIENTATION_TOL:
            raise InvalidHeader("invalid_geometry", "ImageOrientationPatient vectors are not unit vectors")
        if abs(sum(a * b for a, b in zip(r, c))) > ORIENTATION_TOL:
            raise InvalidHeader("invalid_geometry", "ImageOrientationPatient row and column are not orthogonal")
    if spacing is not None:
        lo, hi = SPACING_RANGE_MM
        if not all(lo <= v <= hi for v in spacing):
            raise InvalidHeader("invalid_geometry", f"PixelSpacing is outside {lo:g}-{hi:g} mm")


def _geometry(pos_value, ori_value, spacing_value) -> dict:
    geom = dict(position=_vector(pos_value, 3, "ImagePositionPatient"),
                orientation=_vector(ori_value, 6, "ImageOrientationPatient"),
                spacing=_vector(spacing_value, 2, "PixelSpacing"))
    check_geometry(**geom)
    return geom


def image_part(image_type, manufacturer: str = "", ge_image_type=None, ge_vas_collapse=None) -> str:
    """What an image is, from ImageType (or an enhanced frame's FrameType): ``mag``, ``phase``,
    ``real``, ``imag``, ``water``, ``fat``, ``inphase``, ``outphase``, ``fieldmap`` or ``""``.

    The first value from the third on that :data:`PARTS` knows wins (Siemens ``ORIGINAL\\PRIMARY\\P\\ND``
    is phase, Philips ``...\\FIELD_MAP`` a field map). GE writes neither: its private image type and,
    for 3D B0 maps, (0043,1030) decide (:data:`GE_IMAGE_TYPE`, :data:`GE_VAS_COLLAPSE`).
    """
    values = [image_type] if isinstance(image_type, str) else list(image_type or [])
    for v in values[2:]:
        part = PARTS.get(str(v).strip().upper())
        if part:
            return part
    if "GE" in manufacturer.upper():
        ge_type = _int_or_none(ge_image_type)
        if ge_type in (1, 2, 3):
            return GE_IMAGE_TYPE[ge_type]
        vas = _int_or_none(ge_vas_collapse)
        if ge_type == 0 and vas in GE_VAS_COLLAPSE:
            return GE_VAS_COLLAPSE[vas]
        if ge_type == 0:
            return "mag"
    return ""


def _phi_values(ds) -> tuple:
    """Identifying strings of this file (see :func:`data_prep.deid.identifying_values`), only to
    scrub them from every output. Never fails: a damaged value is skipped."""
    # the files of a study repeat these values: computed once per set
    return _by_raw_values(ds, _PHI_TAGS, _PHI_CACHE, _phi_values_of)


def _by_raw_values(ds, tags: tuple, cache: dict, compute):
    """``compute(ds)``, remembered in ``cache`` by the raw bytes of ``tags`` for fast-read headers (the files
    of a series repeat them; at most 4096 entries, so memory stays bounded); computed directly otherwise."""
    if not isinstance(ds, FastHeader):
        return compute(ds)
    key = ds.raw_key(tags)
    try:
        return cache[key]
    except KeyError:
        pass
    if len(cache) >= 4096:
        cache.clear()
    value = cache[key] = compute(ds)
    return value


def _phi_values_of(ds) -> tuple:
    def strings(keyword):
        try:
            v = ds.get(keyword)
        except Exception:  # a damaged element must not hide the others
            return []
        if v is None or v == "":
            return []
        return [str(x) for x in v] if isinstance(v, _MULTI) and not isinstance(v, str) else [str(v)]
    return _identifying(tuple(x for kw in NAME_TAGS for x in strings(kw)),
                        tuple(x for kw in ID_TAGS for x in strings(kw)),
                        tuple(x for kw in INSTITUTION_TAGS for x in strings(kw)))


_PHI_CACHE: dict = {}
_PHI_TAGS = tuple(tag_for_keyword(kw) for kw in (*NAME_TAGS, *ID_TAGS, *INSTITUTION_TAGS))


@functools.lru_cache(maxsize=4096)
def _identifying(names: tuple, others: tuple, institutions: tuple) -> tuple:
    """:func:`data_prep.deid.identifying_values`, once per distinct set of raw values (the files of
    one study repeat them)."""
    from data_prep.deid import identifying_values

    return tuple(sorted(identifying_values(names, others, institutions)))


_PARAMS_KEEP = (
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "PulseSequenceName",
    "BodyPartExamined", "PatientPosition", "EchoTime", "RepetitionTime", "FlipAngle",
    "InversionTime", "ImagingFrequency", "PixelBandwidth", "ProtocolName",
    "NumberOfTemporalPositions", "BitsStored",
)
_PARAMS_NUMERIC = {"MagneticFieldStrength", "EchoTime", "RepetitionTime", "FlipAngle", "InversionTime",
                   "ImagingFrequency", "PixelBandwidth", "NumberOfTemporalPositions", "BitsStored"}
#: every tag :func:`_params` reads (the fast reader never sees functional groups: pydicom reads those)
_PARAMS_TAGS = tuple(tag_for_keyword(kw) for kw in (*_PARAMS_KEEP, "RescaleSlope", "RescaleIntercept")) + \
    (PRIVATE_TAGS["PhilipsScaleSlope"][0],)
_PARAMS_CACHE: dict = {}


def _params(ds) -> dict:
    """Acquisition parameters for the sidecar (no PHI). Files with the same raw values share one
    dict (never modified afterwards)."""
    return _by_raw_values(ds, _PARAMS_TAGS, _PARAMS_CACHE, _params_of)


def _params_of(ds) -> dict:
    keep, numeric = _PARAMS_KEEP, _PARAMS_NUMERIC
    out = {}
    if "PHILIPS" in str(ds.get("Manufacturer") or "").upper():  # the scalings dcm2niix reports
        ss = _num(ds.get("PhilipsScaleSlope"))
        rs, ri = _num(ds.get("RescaleSlope")), _num(ds.get("RescaleIntercept"))
        out.update({k: v for k, v in (("PhilipsRescaleSlope", rs), ("PhilipsRescaleIntercept", ri),
                                      ("PhilipsScaleSlope", ss)) if v is not None})
        if ss or ds.get("PerFrameFunctionalGroupsSequence") is not None:
            out["UsePhilipsFloatNotDisplayScaling"] = 1
    for kw in keep:
        v = ds.get(kw)
        if v is None or v == "":
            continue
        if kw in numeric:
            num = _num(v[0] if isinstance(v, (list, tuple)) else v)
            if num is not None:
                out[kw] = num
        elif isinstance(v, _MULTI) and not isinstance(v, str):
            out[kw] = [str(x) for x in v]
        else:
            out[kw] = str(v)
    return out


def _frames(ds, rel: str, n_frames: int, pixel: tuple | None = None) -> list[Frame]:
    """One :class:`Frame` per frame, each with validated geometry, scaling and echo; ``pixel`` the
    file's :func:`native_layout`."""
    sop = str(ds.get("SOPInstanceUID", ""))
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    acq_number = _num(ds.get("AcquisitionNumber"), -1.0)
    instance = _int_or_none(ds.get("InstanceNumber"))
    manufacturer = str(ds.get("Manufacturer") or "")
    philips = "PHILIPS" in manufacturer.upper()
    if per_frame_seq is None and shared is None:
        # classic image (possibly multi-frame without functional groups: same geometry for all frames)
        slope, inter = _scaling(ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
        if philips:
            slope, inter = philips_precise_float(slope, inter, ds.get("PhilipsScaleSlope")) or (slope, inter)
        weighting = _diffusion(ds, manufacturer)
        base = dict(
            diffusion=weighting,
            **_geometry(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing")),
            slope=slope, inter=inter, echo=_echo(ds.get("EchoNumbers")), instance=instance, pixel=pixel,
            part="trace" if weighting is not None and weighting.is_trace else
            image_part(ds.get("ImageType"), manufacturer, ds.get("GEImageType"), ds.get("GEVasCollapse")),
        )
        t = tm_seconds(ds.get("AcquisitionTime")) or tm_seconds(ds.get("AcquisitionDateTime"))
        key = (
            _num(ds.get("TemporalPositionIdentifier"), -1.0),
            _num(ds.get("TriggerTime"), -1.0),
            t if t is not None else -1.0,
            acq_number,
        )
        if n_frames == 1 and mosaic.is_mosaic_type(ds.get("ImageType")):
            return _mosaic_frames(ds, rel, base, key, t, sop)
        if n_frames == 1:
            return [Frame(rel, None, time_key=key, time_s=t, sop_uid=sop, **base)]
        return [Frame(rel, f, time_key=key, time_s=t, sop_uid=f"{sop}#{f}", **base) for f in range(n_frames)]
    if per_frame_seq is not None and len(per_frame_seq) not in (0, n_frames):
        raise InvalidHeader("invalid_value", f"{len(per_frame_seq)} per-frame functional groups for "
                                             f"NumberOfFrames {n_frames}")
    frames = []
    dwi_file = _diffusion(ds, manufacturer) is not None or _has_mr_diffusion(shared, per_frame_seq)
    for f in range(n_frames):
        pf = per_frame_seq[f] if per_frame_seq else None
        pos = _fg(pf, shared, "PlanePositionSequence")
        ori = _fg(pf, shared, "PlaneOrientationSequence")
        meas = _fg(pf, shared, "PixelMeasuresSequence")
        pvt = _fg(pf, shared, "PixelValueTransformationSequence")
        content = _fg(pf, shared, "FrameContentSequence")
        echo = _fg(pf, shared, "MREchoSequence")
        frame_type = _fg(pf, shared, "MRImageFrameTypeSequence")
        t = tm_seconds(content.get("FrameAcquisitionDateTime")) if content is not None else None
        temporal = _num(content.get("TemporalPositionIndex"), -1.0) if content is not None else -1.0
        slope, inter = _scaling(pvt.get("RescaleSlope"), pvt.get("RescaleIntercept")) if pvt is not None else (1.0, 0.0)
        if philips:
            private = _fg(pf, shared, PHILIPS_PER_FRAME_PRIVATE)
            ss = _private_item_value(private, 0x2005100E)
            slope, inter = philips_precise_float(slope, inter, ss) or (slope, inter)
        weighting = diffusion.diffusion_of(ds, manufacturer, frame_item=pf) if dwi_file else None
        frames.append(Frame(
            rel, f, diffusion=weighting,
            **_geometry(pos.get("ImagePositionPatient") if pos is not None else None,
                        ori.get("ImageOrientationPatient") if ori is not None else None,
                        meas.get("PixelSpacing") if meas is not None else None),
            slope=slope, inter=inter,
            echo=_echo(echo.get("EffectiveEchoTime")) if echo is not None else None,
            part="trace" if weighting is not None and weighting.is_trace else
            image_part(frame_type.get("FrameType") if frame_type is not None else ds.get("ImageType")),
            instance=instance, pixel=pixel,
            time_key=(temporal, -1.0, t if t is not None else -1.0, acq_number),
            time_s=t,
            sop_uid=f"{sop}#{f}",
        ))
    return _canon_file_gradient_tag(frames)


def _canon_file_gradient_tag(frames: list[Frame]) -> list[Frame]:
    """dcm2niix reads one enhanced file as one image: a Canon file "carries DiffusionGradientOrientation"
    (:func:`data_prep.diffusion.canon_series`: every gradient LPS) when any of its frames does, its
    first frame (a b=0 frame without one) included. Measured with dcm2niix v1.0.20260724
    (tests/test_prep_enhanced.py)."""
    if not any(f.diffusion is not None and f.diffusion.gradient_tag for f in frames):
        return frames
    return [f if f.diffusion is None or f.diffusion.scanner is None or f.diffusion.gradient_tag
            else dataclasses.replace(f, diffusion=dataclasses.replace(f.diffusion, gradient_tag=True))
            for f in frames]


def _diffusion(ds, manufacturer: str):
    """The image's diffusion weighting (:mod:`data_prep.diffusion`), or None when nothing hints at
    one: a diffusion tag, a Siemens DWI sequence name (``*ep_b...``) or ImageType DIFFUSION."""
    image_type = ds.get("ImageType") or ()
    hinted = (any(ds.get(t) is not None for t in _DIFFUSION_HINT_TAGS)
              or "ep_b" in str(ds.get("SequenceName") or "").lower()
              or "DIFFUSION" in (image_type.upper() if isinstance(image_type, str) else
                                 [str(v).upper() for v in image_type]))
    return diffusion.diffusion_of(ds, manufacturer) if hinted else None


def _has_mr_diffusion(shared, per_frame_seq) -> bool:
    first = per_frame_seq[0] if per_frame_seq else None
    return _seq_item(first, "MRDiffusionSequence") is not None or _seq_item(shared, "MRDiffusionSequence") is not None


def _mosaic_frames(ds, rel: str, base: dict, key: tuple, t, sop: str) -> list[Frame]:
    """The tiles of a Siemens mosaic as frames, each with its own position (:mod:`data_prep.mosaic`)."""
    rows, cols = int(_num(ds.get("Rows"))), int(_num(ds.get("Columns")))
    try:
        layout = mosaic.mosaic_layout(ds.get("ImageType"), ds.get("SiemensCSAImageHeader"), rows, cols)
        if base["position"] is None or base["orientation"] is None or base["spacing"] is None:
            return [Frame(rel, None, time_key=key, time_s=t, sop_uid=sop, **base)]  # missing_geometry
        step = mosaic.spacing_between_tiles(_num(ds.get("SpacingBetweenSlices")), _num(ds.get("SliceThickness")))
        positions = mosaic.tile_positions(layout, base["position"], base["orientation"], base["spacing"], step)
    except mosaic.MosaicError as exc:
        raise InvalidHeader(exc.reason, exc.detail) from None
    tile = (layout.tiles_per_side, layout.tile_rows, layout.tile_cols)
    return [Frame(rel, None, time_key=key, time_s=t, sop_uid=f"{sop}#tile{i}",
                  **dict(base, position=tuple(float(v) for v in positions[i])), tile=(i, *tile))
            for i in range(layout.n_images)]


def native_layout(fh, offset: int, ts: str, ds, n_frames: int, head: bytes | None = None) -> tuple | None:
    """Where the pixels of an uncompressed file lie, so conversion can read them without parsing again.

    Returns ``(data_offset, dtype, bits_stored, rows, cols, n_frames)`` with ``dtype`` a numpy string such as ``'<u2'``, or
    None when pydicom must decode (compressed, 1-bit, signed with BitsStored < BitsAllocated, odd layout).
    Called only after :func:`_pixel_description` validated the values it reads. ``head``: the first
    12 bytes at ``offset`` when the caller has them already (else they are read from ``fh``).
    """
    if ts not in NATIVE_SYNTAXES or int(_num(ds.get("SamplesPerPixel"), 1)) != 1:
        return None
    bits = int(_num(ds.get("BitsAllocated"), 0))
    stored = int(_num(ds.get("BitsStored"), bits))
    signed = int(_num(ds.get("PixelRepresentation"), 0)) == 1
    if bits not in (8, 16, 32) or (signed and stored < bits):
        return None
    end = ">" if ts == "1.2.840.10008.1.2.2" else "<"
    if head is None or len(head) < 12:
        fh.seek(offset)
        head = fh.read(12)
    if len(head) < 12 or struct.unpack(end + "HH", head[:4]) != (0x7FE0, 0x0010):
        return None
    if ts == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        length, start = struct.unpack("<I", head[4:8])[0], offset + 8
    else:
        if head[4:6] not in (b"OW", b"OB"):
            return None
        length, start = struct.unpack(end + "I", head[8:12])[0], offset + 12
    rows, cols = int(_num(ds.get("Rows"))), int(_num(ds.get("Columns")))
    need = rows * cols * n_frames * bits // 8
    if length == 0xFFFFFFFF or length < need:
        return None
    return (start, f"{end}{'i' if signed else 'u'}{bits // 8}", stored, rows, cols, n_frames)


def _pixel_description(ds, ts: str, available: int) -> tuple[int, int, int]:
    """Validated ``(rows, cols, n_frames)`` of an image, checked against the ``available`` bytes
    after the pixel data element's start before anything is allocated. Raises :class:`InvalidHeader`
    (or returns a reason through it: ``truncated``, ``unsupported_pixels``)."""
    rows = _one_int(ds, "Rows", lo=1, hi=65535)
    cols = _one_int(ds, "Columns", lo=1, hi=65535)
    samples = _one_int(ds, "SamplesPerPixel", default=1, lo=1, hi=4)
    bits = _one_int(ds, "BitsAllocated", default=16, lo=1, hi=64)
    if samples != 1:  # colour: 8-bit RGB (or YBR, which pydicom decodes to RGB), written as NIfTI RGB24
        photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
        if samples != 3 or bits != 8 or not (photometric == "RGB" or photometric.startswith("YBR")):
            raise InvalidHeader("unsupported_pixels", f"{samples}-sample {bits}-bit {photometric or 'colour'} "
                                                      "images are not converted (only 8-bit RGB/YBR colour)")
    if bits not in (1, 8, 16, 32, 64):
        raise InvalidHeader("invalid_value", "BitsAllocated is not 1, 8, 16, 32 or 64")
    _one_int(ds, "BitsStored", default=bits, lo=1, hi=bits)
    _one_int(ds, "PixelRepresentation", default=0, lo=0, hi=1)
    n_frames = _one_int(ds, "NumberOfFrames", default=1, lo=1)
    decoded = rows * cols * n_frames * samples * bits // 8
    if decoded > MAX_DECODED_BYTES:
        raise InvalidHeader("invalid_value", f"Rows x Columns x NumberOfFrames would decode to "
                                             f"{decoded / 2**30:.3g} GiB (limit {MAX_DECODED_BYTES / 2**30:g} GiB)")
    if ts in NATIVE_SYNTAXES or not ts:
        if available < decoded:
            raise InvalidHeader("truncated", f"{available} bytes left for pixel data that needs {decoded}")
    elif n_frames * 8 > available:  # encapsulated: every frame needs at least one 8-byte item header
        raise InvalidHeader("invalid_value", f"NumberOfFrames {n_frames} is more than the "
                                             f"{available}-byte encapsulated pixel data can hold")
    return rows, cols, n_frames


def _relative(path: str, root: str) -> str:
    """``os.path.relpath(path, root)``, without its cost for the plain case (a file the walk found)."""
    prefix = root.rstrip(os.sep) + os.sep
    if path.startswith(prefix):
        tail = path[len(prefix):]
        if tail and not tail.startswith(".") and "//" not in tail and "/." not in tail:
            return tail
    return os.path.relpath(path, root)


@functools.lru_cache(maxsize=256)
def _is_image_class(sop_class: str) -> bool:
    return "Image Storage" in getattr(pydicom.uid.UID(sop_class), "name", "")


def read_header(path: str, root: str, use_fast: bool = True) -> FileHeader | FileIssue:
    """Read one file's header (never its pixels). ``path`` absolute, ``root`` the archive root.

    ``use_fast=False`` forces pydicom for every file (the fast reader falls back to it by itself).
    Never raises: whatever goes wrong becomes a :class:`FileIssue`.
    """
    rel = _relative(path, root)
    phi: tuple = ()
    try:
        size = os.path.getsize(path)
        if size == 0:
            return FileIssue(rel, "empty_file", "zero-byte file")
        with open(path, "rb") as fh:
            fast = parse_with_head(fh, size, _WANTED) if use_fast else None
            if fast is not None:
                raw_meta, ts, elements, pixel_offset, head = fast
                sop = raw_meta.get(0x00020002, b"").decode("ascii", "replace").rstrip("\x00 ")
                version = raw_meta.get(0x00020013, b"").decode("ascii", "replace").rstrip("\x00 ")
                meta = {"TransferSyntaxUID": ts, "MediaStorageSOPClassUID": sop, "ImplementationVersionName": version}
                ds = FastHeader(elements)
                at_eof = pixel_offset >= size  # no pixel data element before the end of the file
                template_key = None if at_eof else _template_key(ts, sop, version, size - pixel_offset, head, elements)
                template = _TEMPLATES.get(template_key) if template_key is not None else None
                if template is not None:
                    phi = template[0]["phi"]
                    return _from_template(template, rel, ds, pixel_offset)
            else:
                template_key = None
                fh.seek(0)
                full_ds = pydicom.dcmread(fh, stop_before_pixels=True)
                pixel_offset = fh.tell()  # stop_before_pixels leaves the file at the pixel data element
                at_eof = pixel_offset >= size  # no pixel data element before the end of the file
                meta = getattr(full_ds, "file_meta", None)
                ts = str(meta.get("TransferSyntaxUID", "")) if meta else ""
                ds = RawHeader(full_ds, little_endian=ts != "1.2.840.10008.1.2.2")
                head = None
            phi = _phi_values(ds)
            sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
            if sop_class == DICOMDIR_SOP_CLASS:
                return FileIssue(rel, "dicomdir", "DICOMDIR index file (the images are read directly)", phi)
            is_image_class = _is_image_class(sop_class)
            if at_eof and (ds.get("Rows") or is_image_class):
                return FileIssue(rel, "truncated", "the file ends before its pixel data", phi)
            if not ds.get("Rows") or not ds.get("Columns"):
                return FileIssue(rel, "not_an_image", f"no image pixels (modality {ds.get('Modality', '?')})", phi)
            rows, cols, n_frames = _pixel_description(ds, ts, size - pixel_offset)
            layout = native_layout(fh, pixel_offset, ts, ds, n_frames, head)
            frames = _frames(ds, rel, n_frames, layout)
    except PermissionError as exc:
        return FileIssue(rel, "unreadable", f"permission denied ({exc.strerror})", phi)
    except InvalidDicomError:
        return FileIssue(rel, "not_dicom", "no DICOM preamble/prefix", phi)
    except InvalidHeader as exc:
        return FileIssue(rel, exc.reason, exc.detail, phi)
    except OSError as exc:
        return FileIssue(rel, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}", phi)
    except Exception as exc:  # pydicom raises many types on a damaged header
        return FileIssue(rel, "corrupt_header", f"header cannot be parsed ({type(exc).__name__})", phi)
    study_dt = f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}"
    image_type = ds.get("ImageType") or []
    image_type = tuple(str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type))
    header = FileHeader(
        path=rel,
        patient_id=str(ds.get("PatientID", "") or ""),
        phi=phi,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        study_datetime=study_dt,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        image_type=image_type,
        sop_class=sop_class,
        transfer_syntax=ts,
        rows=frames[0].tile[2] if frames and frames[0].tile else rows,  # a mosaic's slices are its tiles
        cols=frames[0].tile[3] if frames and frames[0].tile else cols,
        slice_thickness=_positive(ds.get("SliceThickness")),
        spacing_between_slices=_positive(ds.get("SpacingBetweenSlices")),
        frames=frames,
        params=_params(ds),
        synthetic=str(meta.get("ImplementationVersionName", "") if meta else "").strip() == SYNTH_MARK,
        samples=int(_num(ds.get("SamplesPerPixel"), 1)),
    )
    if template_key is not None and len(frames) == 1 and frames[0].frame is None and frames[0].tile is None:
        _store_template(template_key, header, pixel_offset)
    return header


# ------------------------------------------------------------------------------------ templates
#: attributes that differ from file to file within a series; what :func:`read_header` derives from
#: all the others (its whole FileHeader but the path and the frame's per-file values) is the same for
#: every file with the same raw values of those others, so it is computed once (a "template")
PER_FILE_TAGS = frozenset(tag_for_keyword(kw) for kw in (
    "SOPInstanceUID", "InstanceNumber", "ImagePositionPatient", "AcquisitionTime", "AcquisitionDateTime",
    "TriggerTime", "TemporalPositionIdentifier", "AcquisitionNumber", "ContentTime"))
_STATIC_TAGS = tuple(sorted(_WANTED - PER_FILE_TAGS))
_CSA_TAG = PRIVATE_TAGS["SiemensCSAImageHeader"][0]
_TEMPLATES: dict = {}
_FRAME_STATIC = ("orientation", "spacing", "slope", "inter", "echo", "part", "diffusion")


def _template_key(ts: str, sop_class: str, version: str, available: int, head: bytes, elements: dict):
    """The key of a file's template: every raw value but :data:`PER_FILE_TAGS`, the transfer syntax,
    the meta SOP class and version, the bytes left for pixels and the pixel element's header. None
    for files with a Siemens CSA header (mosaics, diffusion: per-file values inside it)."""
    if _CSA_TAG in elements:
        return None
    return (ts, sop_class, version, available, head, *map(elements.get, _STATIC_TAGS))


def _store_template(key: tuple, header: FileHeader, pixel_offset: int) -> None:
    """Keep what a successfully read one-image file's header shares with its series' other files."""
    frame = header.frames[0]
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(FileHeader) if f.name not in ("path", "frames")}
    static = {name: getattr(frame, name) for name in _FRAME_STATIC}
    layout = None if frame.pixel is None else (frame.pixel[0] - pixel_offset, *frame.pixel[1:])
    if len(_TEMPLATES) >= 1024:
        _TEMPLATES.clear()
    _TEMPLATES[key] = (fields, static, layout)


def _from_template(template: tuple, rel: str, ds, pixel_offset: int) -> FileHeader:
    """A file's header from its template and its own per-file values, computed (and validated) as
    :func:`_frames` does for a one-image file (an invalid position raises the same error)."""
    fields, static, layout = template
    sop = str(ds.get("SOPInstanceUID", ""))
    acq_number = _num(ds.get("AcquisitionNumber"), -1.0)
    instance = _int_or_none(ds.get("InstanceNumber"))
    position = _vector(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
    t = tm_seconds(ds.get("AcquisitionTime")) or tm_seconds(ds.get("AcquisitionDateTime"))
    key = (_num(ds.get("TemporalPositionIdentifier"), -1.0), _num(ds.get("TriggerTime"), -1.0),
           t if t is not None else -1.0, acq_number)
    pixel = None if layout is None else (pixel_offset + layout[0], *layout[1:])
    frame = Frame(rel, None, position=position, time_key=key, time_s=t, sop_uid=sop, pixel=pixel,
                  instance=instance, **static)
    return FileHeader(path=rel, frames=[frame], **fields)


def _positive(value) -> float | None:
    """A finite positive number, else None (a bad SliceThickness is ignored, not fatal)."""
    f = _num(value)
    return f if f is not None and f > 0 else None
