"""A minimal reader for the common case: a Part-10 file in (explicit or implicit) VR little endian.

pydicom builds a full Dataset even with ``stop_before_pixels``; on small MR files that is ~1 ms of
CPU per file and dominated the archive scan. This reader walks the top-level elements once,
skips values it does not need (sequences included, nested or of undefined length), and keeps the
raw bytes of the tags in :data:`data_prep.headers.HEADER_TAGS` until they are asked for.

It returns None for anything it does not handle cleanly (no ``DICM`` prefix, other transfer
syntaxes, enhanced multi-frame functional groups, a value running past the end of the file, ...);
the caller then uses pydicom, which also produces the specific error for broken files. Tests check
that both paths give identical headers.
"""

from __future__ import annotations

import struct

from pydicom.datadict import dictionary_VR

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
#: enhanced multi-frame functional groups: left to pydicom (sequence parsing)
_FUNCTIONAL_GROUPS = {0x52009229, 0x52009230}
#: no tag below this one ends the walk (the functional groups and the pixel data are above it)
_FIRST_STOP = min(_FUNCTIONAL_GROUPS)
_U16 = struct.Struct("<HH")
_U32 = struct.Struct("<I")
_U16L = struct.Struct("<H")
_EXPLICIT_HEAD = struct.Struct("<HH2sH")
_IMPLICIT_HEAD = struct.Struct("<HHI")
FIRST_READ = 65536


class _Short(Exception):
    """The buffer ended before the structure did."""


def _element(buf: bytes, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """``(tag, vr, length, value_pos)`` of the element at ``pos`` (vr None for implicit VR)."""
    if pos + 8 > len(buf):
        raise _Short
    group, elem = _U16.unpack_from(buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item / delimiters never carry a VR
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    if not explicit:
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    vr = buf[pos + 4:pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise _Short
        return tag, vr, _U32.unpack_from(buf, pos + 8)[0], pos + 12
    return tag, vr, _U16L.unpack_from(buf, pos + 6)[0], pos + 8


def _skip_undefined(buf: bytes, pos: int, explicit: bool) -> int:
    """Position after an undefined-length sequence whose items start at ``pos``.

    Iterative (a stack of open sequences and undefined-length items), element headers read inline:
    Philips headers nest hundreds of elements in such sequences."""
    n = len(buf)
    u32 = _U32.unpack_from
    head = _U16.unpack_from
    short = _U16L.unpack_from
    long_vrs = _LONG_VRS
    stack = [_IN_SEQUENCE]
    while stack:
        if pos + 8 > n:
            raise _Short
        group, elem = head(buf, pos)
        if group == 0xFFFE or not explicit:  # items and delimiters never carry a VR
            length, vpos = u32(buf, pos + 4)[0], pos + 8
        elif buf[pos + 4:pos + 6] in long_vrs:
            if pos + 12 > n:
                raise _Short
            length, vpos = u32(buf, pos + 8)[0], pos + 12
        else:
            length, vpos = short(buf, pos + 6)[0], pos + 8
        tag = group << 16 | elem
        if stack[-1] is _IN_SEQUENCE:
            if tag == _SEQ_END:
                stack.pop()
                pos = vpos
            elif tag != _ITEM:
                raise ValueError("malformed sequence")
            elif length != 0xFFFFFFFF:
                pos = vpos + length
            else:  # undefined-length item: nested elements until the item delimiter
                stack.append(_IN_ITEM)
                pos = vpos
        elif tag == _ITEM_END:
            stack.pop()
            pos = vpos
        elif length == 0xFFFFFFFF:  # a nested undefined-length sequence
            stack.append(_IN_SEQUENCE)
            pos = vpos
        else:
            pos = vpos + length
    return pos


_IN_SEQUENCE, _IN_ITEM = object(), object()


def _parse(buf: bytes, wanted: set[int], whole: bool = False):
    """``(meta, elements, pixel_offset)`` or None; ``elements`` maps tag -> (vr, raw bytes).

    ``whole``: ``buf`` is the whole file; a dataset whose last element ends exactly at its end has no
    pixel data (a DICOMDIR, a presentation state, ...): ``pixel_offset`` is then the file size, as
    pydicom's ``stop_before_pixels`` leaves it."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    pos = 132
    meta: dict[int, bytes] = {}
    while pos + 8 <= len(buf) and _U16.unpack_from(buf, pos)[0] == 0x0002:
        tag, vr, length, vpos = _element(buf, pos, True)
        meta[tag] = buf[vpos:vpos + length]
        pos = vpos + length
    ts = meta.get(0x00020010, b"").decode("ascii", "replace").rstrip("\x00 ")
    if ts not in (EXPLICIT_LE, IMPLICIT_LE):
        return None
    explicit = ts == EXPLICIT_LE
    elements: dict[int, tuple] = {}
    # the element loop is the scan's hottest code (every element of every file): _element inlined,
    # one loop per VR encoding, names local
    n = len(buf)
    u32 = _U32.unpack_from
    pixel_data, functional_groups, first_stop = _PIXEL_DATA, _FUNCTIONAL_GROUPS, _FIRST_STOP
    skip = _skip_undefined
    if explicit:
        head = _EXPLICIT_HEAD.unpack_from
        long_vrs = _LONG_VRS
        while True:
            if pos + 8 > n:
                if whole and pos == n:
                    return meta, ts, elements, pos
                raise _Short
            group, elem, vr, length = head(buf, pos)
            if group == 0xFFFE:  # an item or delimiter at the top level: never a VR
                vr, length = None, u32(buf, pos + 4)[0]
                vpos = pos + 8
            elif vr in long_vrs:
                if pos + 12 > n:
                    raise _Short
                length = u32(buf, pos + 8)[0]
                vpos = pos + 12
            else:
                vpos = pos + 8
            tag = group << 16 | elem
            if tag >= first_stop:
                if tag == pixel_data:
                    return meta, ts, elements, pos
                if tag in functional_groups:
                    return None
            if length == 0xFFFFFFFF:
                pos = skip(buf, vpos, True)
                continue
            pos = vpos + length
            if pos > n:
                raise _Short
            if tag in wanted:
                elements[tag] = (vr, buf[vpos:pos])
    head = _IMPLICIT_HEAD.unpack_from
    while True:
        if pos + 8 > n:
            if whole and pos == n:
                return meta, ts, elements, pos
            raise _Short
        group, elem, length = head(buf, pos)
        vpos = pos + 8
        tag = group << 16 | elem
        if tag >= first_stop:
            if tag == pixel_data:
                return meta, ts, elements, pos
            if tag in functional_groups:
                return None
        if length == 0xFFFFFFFF:
            pos = skip(buf, vpos, False)
            continue
        pos = vpos + length
        if pos > n:
            raise _Short
        if tag in wanted:
            elements[tag] = (None, buf[vpos:pos])


def parse_file(fh, size: int, wanted: set[int]):
    """Parse the open file ``fh``; returns ``(meta, ts, elements, pixel_offset)`` or None (use pydicom)."""
    parsed = parse_with_head(fh, size, wanted)
    return None if parsed is None else parsed[:4]


def parse_with_head(fh, size: int, wanted: set[int]):
    """:func:`parse_file` plus the (up to) 12 bytes at ``pixel_offset`` that were read already."""
    buf = fh.read(FIRST_READ)
    try:
        try:
            parsed = _parse(buf, wanted, whole=len(buf) >= size)
        except _Short:
            if len(buf) >= size:
                return None
            buf += fh.read()
            parsed = _parse(buf, wanted, whole=len(buf) >= size)
    except (_Short, ValueError, struct.error, UnicodeDecodeError):
        return None
    if parsed is None:
        return None
    offset = parsed[3]
    return (*parsed, buf[offset:offset + 12])


def vr_of(tag: int, vr: bytes | None) -> str:
    """The element's VR as text; implicit VR and UN fall back to the data dictionary."""
    if vr is None or vr == b"UN":
        try:
            return dictionary_VR(tag)
        except KeyError:
            return "UN"
    return vr.decode("ascii", "replace")
