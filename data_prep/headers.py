"""Header-only reading of one DICOM file into a small, picklable :class:`FileHeader`.

Each file is opened once with ``stop_before_pixels`` (pixel data is read only at conversion). pydicom
keeps elements raw until they are accessed, and its per-element conversion dominated the scan time,
so :class:`RawHeader` decodes just the ~50 values we use straight from the raw bytes (sequences, i.e.
enhanced multi-frame functional groups, still go through pydicom). Enhanced (multi-frame) MR is flattened into one :class:`Frame` per frame using the
shared and per-frame functional groups. Problems become a :class:`FileIssue` with a report reason.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass, field

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.errors import InvalidDicomError

from data_prep.fastheader import parse_file, vr_of

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}

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
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
]


_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UC", "UR", "UT"}
_SINGLE_TEXT = {"LT", "ST", "UT", "UR"}
_BINARY = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FD": "d", "FL": "f"}
_TAGS = {kw: tag_for_keyword(kw) for kw in HEADER_TAGS + ["SpecificCharacterSet"]}
_WANTED = set(_TAGS.values())


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

    def get(self, keyword: str, default=None):
        tag = _TAGS.get(keyword) or tag_for_keyword(keyword)
        el = self._ds.get_item(tag) if tag is not None else None
        if el is None:
            return default
        if not isinstance(el, RawDataElement):
            value = el.value
            return default if value is None or value == "" else value
        vr = el.VR if el.VR and el.VR != "UN" else dictionary_VR(tag)
        if vr == "SQ":
            return self._ds[tag].value
        return decode_value(vr, el.value, self._end, self._encoding, default)


class FastHeader:
    """The same ``get(keyword)`` over the raw elements found by :mod:`data_prep.fastheader`."""

    def __init__(self, elements: dict):
        self._elements = elements
        cs = elements.get(0x00080005)
        self._encoding = _encoding(cs[1] if cs else "")

    def get(self, keyword: str, default=None):
        item = self._elements.get(_TAGS.get(keyword) or tag_for_keyword(keyword))
        if item is None:
            return default
        return decode_value(vr_of(_TAGS.get(keyword) or tag_for_keyword(keyword), item[0]), item[1], "<",
                            self._encoding, default)


@dataclass(frozen=True)
class Frame:
    """One 2D image: a classic single-frame file (``frame=None``) or frame ``frame`` of a multi-frame file.

    ``position`` (3,) and ``orientation`` (6,) are LPS (see :mod:`data_prep.geometry`); ``time_key``
    orders acquisitions at the same position (temporal position, trigger time, acquisition time
    in s, acquisition number); ``time_s`` is the acquisition time of day in seconds (or None).
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


@dataclass(frozen=True)
class FileIssue:
    """A file that cannot take part in conversion, with a report ``reason`` code and a detail."""

    path: str
    reason: str
    detail: str


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
    return hh * 3600 + mm * 60 + ss


def _num(value, default=None):
    try:
        if value is None or value == "":
            return default
        return float(value)
    except (TypeError, ValueError):
        return default


def _seq_item(groups, keyword):
    """First item of ``keyword`` sequence within a functional-groups item, or None."""
    if groups is None:
        return None
    seq = groups.get(keyword)
    return seq[0] if seq else None


def _fg(per_frame, shared, keyword):
    """A functional group macro item: per-frame first, then shared."""
    return _seq_item(per_frame, keyword) or _seq_item(shared, keyword)


def _tuple(value, n):
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _phi_values(ds) -> tuple:
    """PHI strings of this file, only for scrubbing them from every output."""
    vals = []
    for kw in ("PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs"):
        v = ds.get(kw)
        if v:
            vals.extend(str(x) for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]))
    name = ds.get("PatientName")
    if name:
        vals.append(str(name))
        vals.extend(part for part in str(name).replace("=", "^").split("^") if part)
    return tuple(v.strip() for v in vals if v and v.strip())


def _params(ds) -> dict:
    """Acquisition parameters for the sidecar (no PHI)."""
    keep = (
        "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "ScanningSequence",
        "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "PulseSequenceName",
        "BodyPartExamined", "PatientPosition", "EchoTime", "RepetitionTime", "FlipAngle",
        "InversionTime", "ImagingFrequency", "PixelBandwidth", "ProtocolName",
        "NumberOfTemporalPositions", "BitsStored",
    )
    numeric = {"MagneticFieldStrength", "EchoTime", "RepetitionTime", "FlipAngle", "InversionTime",
               "ImagingFrequency", "PixelBandwidth", "NumberOfTemporalPositions", "BitsStored"}
    out = {}
    for kw in keep:
        v = ds.get(kw)
        if v is None or v == "":
            continue
        if kw in numeric:
            num = _num(v[0] if isinstance(v, (list, tuple)) else v)
            if num is not None:
                out[kw] = num
        elif isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
            out[kw] = [str(x) for x in v]
        else:
            out[kw] = str(v)
    return out


def _frames(ds, rel: str) -> list[Frame]:
    sop = str(ds.get("SOPInstanceUID", ""))
    n_frames = int(_num(ds.get("NumberOfFrames"), 1) or 1)
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    acq_number = _num(ds.get("AcquisitionNumber"), -1.0)
    if per_frame_seq is None and shared is None:
        # classic image (possibly multi-frame without functional groups: same geometry for all frames)
        base = dict(
            position=_tuple(ds.get("ImagePositionPatient"), 3),
            orientation=_tuple(ds.get("ImageOrientationPatient"), 6),
            spacing=_tuple(ds.get("PixelSpacing"), 2),
            slope=_num(ds.get("RescaleSlope"), 1.0),
            inter=_num(ds.get("RescaleIntercept"), 0.0),
            echo=_num(ds.get("EchoNumbers")),
        )
        t = tm_seconds(ds.get("AcquisitionTime")) or tm_seconds(ds.get("AcquisitionDateTime"))
        key = (
            _num(ds.get("TemporalPositionIdentifier"), -1.0),
            _num(ds.get("TriggerTime"), -1.0),
            t if t is not None else -1.0,
            acq_number,
        )
        if n_frames == 1:
            return [Frame(rel, None, time_key=key, time_s=t, sop_uid=sop, **base)]
        return [Frame(rel, f, time_key=key, time_s=t, sop_uid=f"{sop}#{f}", **base) for f in range(n_frames)]
    frames = []
    for f in range(n_frames):
        pf = per_frame_seq[f] if per_frame_seq is not None and f < len(per_frame_seq) else None
        pos = _fg(pf, shared, "PlanePositionSequence")
        ori = _fg(pf, shared, "PlaneOrientationSequence")
        meas = _fg(pf, shared, "PixelMeasuresSequence")
        pvt = _fg(pf, shared, "PixelValueTransformationSequence")
        content = _fg(pf, shared, "FrameContentSequence")
        echo = _fg(pf, shared, "MREchoSequence")
        t = tm_seconds(content.get("FrameAcquisitionDateTime")) if content is not None else None
        temporal = _num(content.get("TemporalPositionIndex"), -1.0) if content is not None else -1.0
        frames.append(Frame(
            rel, f,
            position=_tuple(pos.get("ImagePositionPatient"), 3) if pos is not None else None,
            orientation=_tuple(ori.get("ImageOrientationPatient"), 6) if ori is not None else None,
            spacing=_tuple(meas.get("PixelSpacing"), 2) if meas is not None else None,
            slope=_num(pvt.get("RescaleSlope"), 1.0) if pvt is not None else 1.0,
            inter=_num(pvt.get("RescaleIntercept"), 0.0) if pvt is not None else 0.0,
            echo=_num(echo.get("EffectiveEchoTime")) if echo is not None else None,
            time_key=(temporal, -1.0, t if t is not None else -1.0, acq_number),
            time_s=t,
            sop_uid=f"{sop}#{f}",
        ))
    return frames


def native_layout(fh, offset: int, ts: str, ds, n_frames: int) -> tuple | None:
    """Where the pixels of an uncompressed file lie, so conversion can read them without parsing again.

    Returns ``(data_offset, dtype, bits_stored, rows, cols, n_frames)`` with ``dtype`` a numpy string such as ``'<u2'``, or
    None when pydicom must decode (compressed, 1-bit, signed with BitsStored < BitsAllocated, odd layout).
    """
    if ts not in NATIVE_SYNTAXES:
        return None
    bits = int(_num(ds.get("BitsAllocated"), 0))
    stored = int(_num(ds.get("BitsStored"), bits))
    signed = int(_num(ds.get("PixelRepresentation"), 0)) == 1
    if bits not in (8, 16, 32) or (signed and stored < bits):
        return None
    end = ">" if ts == "1.2.840.10008.1.2.2" else "<"
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
    need = int(ds.get("Rows")) * int(ds.get("Columns")) * n_frames * bits // 8
    if length == 0xFFFFFFFF or length < need:
        return None
    return (start, f"{end}{'i' if signed else 'u'}{bits // 8}", stored, int(ds.get("Rows")), int(ds.get("Columns")), n_frames)


def read_header(path: str, root: str, use_fast: bool = True) -> FileHeader | FileIssue:
    """Read one file's header (never its pixels). ``path`` absolute, ``root`` the archive root.

    ``use_fast=False`` forces pydicom for every file (the fast reader falls back to it by itself).
    """
    rel = os.path.relpath(path, root)
    try:
        size = os.path.getsize(path)
        if size == 0:
            return FileIssue(rel, "empty_file", "zero-byte file")
        with open(path, "rb") as fh:
            fast = parse_file(fh, size, _WANTED) if use_fast else None
            if fast is not None:
                raw_meta, ts, elements, pixel_offset = fast
                sop = raw_meta.get(0x00020002, b"").decode("ascii", "replace").rstrip("\x00 ")
                meta = {"TransferSyntaxUID": ts, "MediaStorageSOPClassUID": sop}
                ds = FastHeader(elements)
                at_eof = False
            else:
                fh.seek(0)
                full_ds = pydicom.dcmread(fh, stop_before_pixels=True)
                pixel_offset = fh.tell()  # stop_before_pixels leaves the file at the pixel data element
                at_eof = pixel_offset >= size  # no pixel data element before the end of the file
                meta = getattr(full_ds, "file_meta", None)
                ts = str(meta.get("TransferSyntaxUID", "")) if meta else ""
                ds = RawHeader(full_ds, little_endian=ts != "1.2.840.10008.1.2.2")
            n_frames = int(_num(ds.get("NumberOfFrames"), 1) or 1)
            layout = None if at_eof or not ds.get("Rows") else native_layout(fh, pixel_offset, ts, ds, n_frames)
    except PermissionError as exc:
        return FileIssue(rel, "unreadable", f"permission denied ({exc.strerror})")
    except InvalidDicomError:
        return FileIssue(rel, "not_dicom", "no DICOM preamble/prefix")
    except OSError as exc:
        return FileIssue(rel, "unreadable", f"{type(exc).__name__}: {exc.strerror or exc}")
    except Exception as exc:  # pydicom raises many types on a cut-off header
        return FileIssue(rel, "corrupt_header", f"header cannot be parsed ({type(exc).__name__})")
    sop_class = str(ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else "") or "")
    if sop_class == DICOMDIR_SOP_CLASS:
        return FileIssue(rel, "dicomdir", "DICOMDIR index file (the images are read directly)")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    is_image_class = "Image Storage" in getattr(pydicom.uid.UID(sop_class), "name", "")
    if at_eof and (rows or is_image_class):
        return FileIssue(rel, "truncated", "the file ends before its pixel data")
    if not rows or not cols:
        return FileIssue(rel, "not_an_image", f"no image pixels (modality {ds.get('Modality', '?')})")
    if int(_num(ds.get("SamplesPerPixel"), 1)) != 1:
        return FileIssue(rel, "unsupported_pixels", "colour/multi-sample images are not converted")
    if ts in NATIVE_SYNTAXES or not ts:
        expected = int(rows) * int(cols) * n_frames * int(_num(ds.get("BitsAllocated"), 16)) // 8
        if size - pixel_offset < expected:
            return FileIssue(rel, "truncated", f"{size - pixel_offset} bytes left for pixel data that needs {expected}")
    frames = _frames(ds, rel)
    if layout is not None:
        frames = [dataclasses.replace(f, pixel=layout) for f in frames]
    study_dt = f"{ds.get('StudyDate', '')}{ds.get('StudyTime', '')}"
    image_type = ds.get("ImageType") or []
    image_type = tuple(str(v).upper() for v in ([image_type] if isinstance(image_type, str) else image_type))
    sn = ds.get("SeriesNumber")
    return FileHeader(
        path=rel,
        patient_id=str(ds.get("PatientID", "") or ""),
        phi=_phi_values(ds),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        study_datetime=study_dt,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        series_number=int(sn) if sn not in (None, "") else None,
        description=str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or ""),
        modality=str(ds.get("Modality", "") or ""),
        image_type=image_type,
        sop_class=sop_class,
        transfer_syntax=ts,
        rows=int(rows),
        cols=int(cols),
        slice_thickness=_num(ds.get("SliceThickness")),
        spacing_between_slices=_num(ds.get("SpacingBetweenSlices")),
        frames=frames,
        params=_params(ds),
    )
