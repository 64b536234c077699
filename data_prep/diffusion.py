"""Diffusion-weighted MRI: b-values, gradient directions, volume order and FSL ``.bval``/``.bvec``.

What dcm2niix (v1.0.20260724, the PyPI ``dcm2niix`` package) does, and what this module reproduces
(every rule below was checked by running that dcm2niix on real or synthetic series):

* **Where the values come from.** The standard attributes DiffusionBValue (0018,9087) and
  DiffusionGradientOrientation (0018,9089) (in enhanced multi-frame files inside each frame's
  MRDiffusionSequence), else the vendor's private tags: Siemens CSA image header (0029,1010)
  ``B_value``/``DiffusionGradientDirection`` or (0019,100C)/(0019,100E); GE (0043,1039) (first value,
  ``mod 10^9``: GE adds 10^9 to flag some b-values) and (0019,10BB/BC/BD); Philips (2001,1003) and
  (2005,10B0/B1/B2); UIH (0065,1009) and (0065,1037) (its gradient along the image's row, column
  and normal); Canon classic files without DiffusionGradientOrientation: the ImageComments
  (0020,4000) text ``b=1500(0.445,0.000,0.895)`` (its vector only: without DiffusionBValue dcm2niix
  writes no ``.bval``). See :data:`DIFFUSION_KEYWORDS` and :data:`DIFFUSION_PRIVATE_TAGS`.
* **Frames.** Siemens, Philips, Toshiba and the other vendors give the gradient in DICOM patient
  coordinates (**LPS**). GE gives it in its own image frame; :func:`diffusion_of` turns it into LPS
  with dcm2niix's GE rules (signs by slice plane, then an axis swap for ROW phase encoding), so that
  one function, :func:`fsl_bvecs`, writes every vendor. A GE gradient of length 0.03-0.97 scales
  the b-value by its square (rounded to a multiple of 5).
* **Canon** (Manufacturer ``CA...``: ``CANON_MEC``, ``Canon Medical Systems``): dcm2niix reads a whole
  series one way, chosen by its first image (smallest InstanceNumber): when that image carries
  DiffusionGradientOrientation, every gradient is LPS (as Toshiba's); otherwise (the first image is
  an untagged or b-value-only b=0 image, or the gradients are in ImageComments) every gradient is in
  the image frame, GE's rules and b-value scaling included. The ImageComments vector is read with
  its first two components swapped, in either case. :func:`diffusion_of` keeps both readings of a
  Canon image, :func:`canon_series` picks the series' one.
* **Derived isotropic (trace/ADC) images** are left out of the 4D series (dcm2niix writes them to
  ``*_ADC.nii``): for Philips and unknown manufacturers, an image with b > 0 and no gradient, which
  is what Philips' isotropic images, flagged (2001,1004) = ``I`` or DiffusionDirectionality
  ``ISOTROPIC``, carry (dcm2niix tests the gradient, not the flag; a flagged image that stores a
  gradient anyway, which we have never seen, counts as isotropic here and stays in with dcm2niix);
  for GE, one with b > 0, no gradient and (0021,105A) > 0. Without (0021,105A) such a GE image is a
  b=0 image stored with the nominal b-value, and its b-value becomes 0. Siemens ones stay in.
* **Tiny b-values** (Philips stores b = 0.001-0.004 s/mm^2 for repeated "b=0" volumes) are kept as
  they are: they are volumes of their own, written with ``%g`` (``0.001``), and their gradient is
  rotated like any other. Only b <= FLT_EPSILON (1.19e-7) counts as b=0: its stored gradient (if
  any) is written *unrotated*, as dcm2niix does (meaningless for b=0, but byte-identical files).
* **Volume order** is acquisition order: the smallest InstanceNumber (for enhanced files, frame
  number) of each volume, whatever the order of slices and volumes in the numbering; see
  :func:`dwi_volumes`.

Where we differ from that dcm2niix, on purpose:

* a Siemens classic series numbered slice by slice (all volumes of slice 1, then slice 2, ...):
  dcm2niix stacks images of different volumes into one volume; we group by encoding, so every
  volume holds one b-value and gradient;
* Philips slice-by-slice numbering whose gradient numbers (2005,1413) are unique per volume but
  disagree with InstanceNumber: dcm2niix orders by gradient number, we by InstanceNumber
  (acquisition order). In dcm_qa_philips_dwi the gradient numbers repeat (b=0 and the tiny b share
  number 1) and dcm2niix falls back to InstanceNumber, which we match;
* an image flagged isotropic that stores a gradient anyway is left out (see above);
* a UIH image with DiffusionGradientOrientation but not (0065,1037): dcm2niix writes a zero gradient
  (it reads UIH gradients from (0065,1037) only), we the standard one (LPS);
* gradients are written as unit vectors: dcm2niix writes a scaled GE/Canon gradient divided by
  ``sqrt(b_written / b)`` and a Canon ImageComments vector (3 decimals) as it is, both a little off
  unit length (same directions).

Conventions of :mod:`data_prep.geometry` apply: vectors are LPS, affines map voxel ``(i, j, k)``
to RAS mm. Note that our grid (rows top-down, positive determinant) is not dcm2niix's (rows
bottom-up), so for the same gradients our ``.bvec`` differs from dcm2niix's file: see
:func:`fsl_bvecs`.
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement


def _csareader():
    """nibabel's CSA reader, imported on first use (only Siemens CSA headers need it: the main
    process of a conversion never imports nibabel)."""
    with warnings.catch_warnings():  # nibabel.nicom warns on import that its DICOM *readers* are experimental
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


#: standard attributes :func:`diffusion_of` reads with ``ds.get(keyword)`` (the first two are also
#: read from each enhanced frame's MRDiffusionSequence item)
DIFFUSION_KEYWORDS = (
    "Manufacturer", "DiffusionBValue", "DiffusionGradientOrientation", "DiffusionDirectionality",
    "MRDiffusionSequence", "ImageOrientationPatient", "InPlanePhaseEncodingDirection",
    "SharedFunctionalGroupsSequence", "ImageComments",  # Canon classic files: the gradient as text
    "InstanceNumber",  # not read here: the acquisition order key for dwi_volumes
)
#: private tags :func:`diffusion_of` reads with ``ds.get(tag)`` (``tag`` = ``group << 16 | element``):
#: ``tag: (VR, meaning)``. The VR is used to decode a value that arrives as raw bytes (implicit VR,
#: little endian). Element numbers are the usual ones of each vendor's private block, as dcm2niix uses.
DIFFUSION_PRIVATE_TAGS = {
    0x00291010: ("OB", "Siemens CSA image header: B_value, DiffusionGradientDirection"),
    0x0019100C: ("IS", "Siemens B_value"),
    0x0019100E: ("FD", "Siemens DiffusionGradientDirection (3, LPS)"),
    0x00431039: ("IS", "GE b-value: first of 4 values, plus n * 10^9"),
    0x001910BB: ("DS", "GE gradient, first axis (GE image frame)"),
    0x001910BC: ("DS", "GE gradient, second axis"),
    0x001910BD: ("DS", "GE gradient, third axis"),
    0x0021105A: ("SL", "GE number of diffusion directions (> 0: a zero-gradient b > 0 image is a trace)"),
    0x20011003: ("FL", "Philips diffusion b-factor"),
    0x20011004: ("CS", "Philips diffusion direction code (I = isotropic)"),
    0x200510B0: ("FL", "Philips diffusion direction RL (LPS x)"),
    0x200510B1: ("FL", "Philips diffusion direction AP (LPS y)"),
    0x200510B2: ("FL", "Philips diffusion direction FH (LPS z)"),
    0x00651009: ("FD", "UIH b-value"),
    0x00651037: ("FD", "UIH gradient (3, image frame: row, column, normal)"),
}
#: b-values at or below this are b=0 (dcm2niix compares float32 b-values with FLT_EPSILON)
B0_MAX = float(np.finfo(np.float32).eps)
#: GE flags some b-values by adding multiples of this to (0043,1039)
_GE_B_OFFSET = 1_000_000_000
#: known manufacturers that dcm2niix does not treat as Philips (an unknown one it does)
_KNOWN_OTHER = ("TOSHIBA", "HITACHI", "FUJIFILM", "UNITED IMAGING", "BRUKER", "MEDISO")


class DiffusionError(ValueError):
    """The images of a DWI series do not form complete volumes; ``reason`` is a report code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Diffusion:
    """Diffusion encoding of one image or frame.

    ``bvalue`` in s/mm^2; ``direction`` the gradient as a unit LPS vector ``(x, y, z)``, or None
    when the header gives none (or a zero vector). A b=0 image may carry one (Philips writes its
    b=0 gradient table entry); it is kept only so the ``.bvec`` matches dcm2niix's. ``is_trace``:
    a derived isotropic (trace/ADC) image that dcm2niix leaves out of the 4D series.

    Canon only (see :func:`canon_series`): ``direction`` is the image-frame reading (GE's rules) that
    dcm2niix uses when a series' first image carries no DiffusionGradientOrientation; ``scanner`` the
    same image read as dcm2niix reads it otherwise (the stored vector as LPS, b-value as stored, a b=0
    gradient kept); ``gradient_tag`` whether the image carries DiffusionGradientOrientation.
    """

    bvalue: float
    direction: tuple[float, float, float] | None
    is_trace: bool = False
    scanner: Diffusion | None = None
    gradient_tag: bool = False


def vendor_of(manufacturer) -> str:
    """``siemens``, ``ge``, ``philips``, ``canon`` (gradients in GE's image frame), ``uih`` (United
    Imaging, Manufacturer ``UI...`` as dcm2niix tells it), ``other`` (known, gradients in LPS: Toshiba,
    ...) or ``unknown`` (dcm2niix then assumes Philips) from the Manufacturer (0008,0070) text."""
    text = str(manufacturer or "").upper()
    if "SIEMENS" in text:
        return "siemens"
    if text.startswith("GE ") or text == "GE" or "GE MEDICAL" in text or "GE HEALTHCARE" in text:
        return "ge"
    if "PHILIPS" in text:
        return "philips"
    if "CANON" in text:
        return "canon"
    if text.startswith("UI"):
        return "uih"
    return "other" if any(name in text for name in _KNOWN_OTHER) else "unknown"


def untagged_images_are_b0(manufacturer) -> bool:
    """Whether the images without diffusion tags in a diffusion series are its b=0 volumes: Toshiba and
    Canon tag only the diffusion-weighted images (dcm2niix's Toshiba notes), and dcm2niix reads the
    rest as b=0. Measured with dcm2niix for the other vendors' tags (tests/test_prep_diffusion.py): it
    then writes a 4D file without .bval/.bvec (Siemens, GE, Philips) or splits the series (unknown
    vendors); those series are refused as ``inconsistent_diffusion`` here rather than guessed."""
    text = str(manufacturer or "").upper()
    return "TOSHIBA" in text or "CANON" in text


def diffusion_of(ds, manufacturer=None, frame_item=None) -> Diffusion | None:
    """b-value and gradient of one image (``frame_item=None``) or one enhanced frame.

    ``ds`` is the file's header with ``ds.get(key)``: ``key`` a keyword of :data:`DIFFUSION_KEYWORDS`
    or an int tag of :data:`DIFFUSION_PRIVATE_TAGS`, returning a str, list, number, tuple, bytes,
    pydicom DataElement or None (a pydicom Dataset, :class:`data_prep.headers.RawHeader` and
    ``FastHeader`` all qualify). ``frame_item`` is the frame's PerFrameFunctionalGroupsSequence item;
    its MRDiffusionSequence (else the shared one) is used first. ``manufacturer`` defaults to
    ``ds.get("Manufacturer")``. Returns None when nothing gives a b-value (not a diffusion image).
    Unusable values (NaN, negative b, damaged CSA header) count as absent.
    """
    vendor = vendor_of(manufacturer if manufacturer is not None else _get(ds, "Manufacturer"))
    b, direction, isotropic, tagged = _standard(ds, frame_item)
    if vendor == "canon":
        return _canon(ds, frame_item, b, direction, tagged)
    if vendor == "siemens":
        csa = _csa(_get(ds, 0x00291010))
        b = b if b is not None else _bvalue(csa.get("B_value")) if csa else None
        b = b if b is not None else _bvalue(_numbers(_get(ds, 0x0019100C), "IS"))
        direction = direction or _unit(csa.get("DiffusionGradientDirection") if csa else None)
        direction = direction or _unit(_numbers(_get(ds, 0x0019100E), "FD"))
    elif vendor == "uih":
        b = b if b is not None else _bvalue(_numbers(_get(ds, 0x00651009), "FD"))
        private = _unit(_numbers(_get(ds, 0x00651037), "FD"), normalize=False)
        direction = _image_to_lps(private, ds, frame_item) if private is not None else direction
    elif vendor == "ge":
        if b is None:
            b = _bvalue(_numbers(_get(ds, 0x00431039), "IS"))
            b = b % _GE_B_OFFSET if b is not None and b >= _GE_B_OFFSET else b
        if direction is None:
            direction = _vector(ds, (0x001910BB, 0x001910BC, 0x001910BD), "DS")
        b = _ge_scaled_bvalue(b, direction)
        direction = _ge_to_lps(direction, ds, frame_item)
    else:
        b = b if b is not None else _bvalue(_numbers(_get(ds, 0x20011003), "FL"))
        direction = direction or _vector(ds, (0x200510B0, 0x200510B1, 0x200510B2), "FL")
        isotropic = isotropic or _text(_get(ds, 0x20011004)).upper() == "I"
    if b is None:
        return None
    direction = _unit(direction)
    if isotropic and vendor in ("philips", "unknown"):
        direction = None  # a derived isotropic image: whatever gradient it stores is meaningless
    is_trace = False
    if b > B0_MAX and direction is None:
        if vendor in ("philips", "unknown"):
            is_trace = True
        elif vendor == "ge":
            n_dirs = _first(_numbers(_get(ds, 0x0021105A), "SL"))
            is_trace = n_dirs is not None and n_dirs > 0
            b = b if is_trace else 0.0  # GE b=0 image stored with the nominal b-value
    if vendor == "ge" and b <= B0_MAX:
        direction = None  # dcm2niix zeroes GE b=0 gradients
    return Diffusion(float(b), direction, is_trace)


def _canon(ds, frame_item, b, stored, tagged) -> Diffusion | None:
    """A Canon image: b-value from DiffusionBValue only; the gradient from DiffusionGradientOrientation,
    else (classic files) from ImageComments. Both readings of :class:`Diffusion` (image frame by GE's
    rules, with GE's b-value scaling and b=0 gradients zeroed; and ``scanner``, LPS as stored). A b > 0
    image without a gradient stays in the series (dcm2niix's ADC rules do not apply to Canon)."""
    if b is None:
        return None
    if stored is None and frame_item is None:
        stored = _canon_comment_gradient(_get(ds, "ImageComments"))
    scanner = Diffusion(float(b), _unit(stored))
    if b <= B0_MAX:
        return Diffusion(float(b), None, scanner=scanner, gradient_tag=tagged)
    direction = _unit(_ge_to_lps(stored, ds, frame_item))
    return Diffusion(float(_ge_scaled_bvalue(b, stored)), direction, scanner=scanner, gradient_tag=tagged)


def canon_series(diffusions, order_keys) -> list:
    """The encodings dcm2niix writes for the images of one series (``diffusions`` as from
    :func:`diffusion_of`, None for untagged images; ``order_keys`` as for :func:`dwi_volumes`).

    dcm2niix reads a Canon series' gradients one way for the whole series, by its first image (the
    smallest key): if that image carries DiffusionGradientOrientation (even 0\\0\\0), every gradient is
    LPS (each image's ``scanner`` reading, as for Toshiba); otherwise every gradient is in the image
    frame (``direction``, GE's rules). Measured with dcm2niix v1.0.20260724 on series whose first image
    is an untagged, a b=0-only, a b=0 + zero-gradient or a diffusion-weighted image
    (tests/test_prep_diffusion_vendors.py). Other vendors' encodings are returned as they are."""
    diffusions = list(diffusions)
    if not any(d is not None and d.scanner is not None for d in diffusions):
        return diffusions
    keys = [(k is None, 0 if k is None else k) for k in order_keys]
    first = diffusions[min(range(len(diffusions)), key=lambda i: (keys[i], i))]
    if first is None or not first.gradient_tag:
        return diffusions
    return [d.scanner if d is not None and d.scanner is not None else d for d in diffusions]


# --- header values ---------------------------------------------------------------------------------

def _get(ds, key):
    if ds is None:
        return None
    try:
        value = ds.get(key)
    except Exception:  # a damaged element counts as absent
        return None
    return value.value if isinstance(value, DataElement) else value  # pydicom Dataset.get(int)


def _numbers(value, vr: str) -> list[float] | None:
    """Finite numbers of a value given as number, text (``a\\b``), sequence or raw bytes of ``vr``."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        if vr in ("FL", "FD", "SL"):
            fmt = {"FL": "f", "FD": "d", "SL": "i"}[vr]
            size = struct.calcsize(fmt)
            value = struct.unpack(f"<{len(value) // size}{fmt}", bytes(value)[: len(value) // size * size])
        else:
            value = bytes(value).decode("latin-1", "replace").strip("\x00 ")
    if isinstance(value, str):
        value = value.split("\\")
    elif not isinstance(value, (list, tuple)) and not hasattr(value, "__iter__"):
        value = [value]
    out = []
    for v in value:
        try:
            f = float(v.strip()) if isinstance(v, str) else float(v)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out or None


def _first(values, minimum: float = -math.inf) -> float | None:
    """The first of ``values`` if it is a finite number >= ``minimum``, else None."""
    if not values:
        return None
    try:
        f = float(values[0])
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f >= minimum else None


def _bvalue(values) -> float | None:
    return _first(values, minimum=0.0)


def _vector(ds, tags, vr: str) -> tuple[float, float, float] | None:
    """A vector (as stored, see :func:`_unit`) from three single-valued tags (GE, Philips private
    gradients)."""
    return _unit([_first(_numbers(_get(ds, tag), vr)) for tag in tags], normalize=False)


def _text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1", "replace")
    return str(value or "").strip("\x00 ")


def _unit(values, normalize: bool = True) -> tuple[float, float, float] | None:
    """A unit vector from 3 numbers (``normalize=False``: the numbers as they are, GE and Canon
    scale the b-value by their length); None for missing, non-finite or zero-length vectors."""
    if values is None:
        return None
    try:
        v = np.array([float(x) for x in values], dtype=float)
    except (TypeError, ValueError):
        return None
    norm = float(np.linalg.norm(v)) if v.shape == (3,) else 0.0
    if not math.isfinite(norm) or norm <= B0_MAX:
        return None
    return tuple(float(x) for x in (v / norm if normalize else v))


def _standard(ds, frame_item):
    """``(b, direction as stored, isotropic, DiffusionGradientOrientation present)`` from the frame's
    (else shared) MRDiffusionSequence, else the image's own DiffusionBValue /
    DiffusionGradientOrientation / DiffusionDirectionality."""
    sources = []
    for group in (frame_item, _shared(ds)):
        seq = _get(group, "MRDiffusionSequence")
        if seq:
            sources.append(seq[0])
    sources.append(ds)
    for src in sources:
        b = _bvalue(_numbers(_get(src, "DiffusionBValue"), "FD"))
        if b is None:
            continue
        direction = _unit(_numbers(_get(src, "DiffusionGradientOrientation"), "FD"), normalize=False)
        grad_seq = _get(src, "DiffusionGradientDirectionSequence")
        if direction is None and grad_seq:
            stored = _numbers(_get(grad_seq[0], "DiffusionGradientOrientation"), "FD")
            direction = _unit(stored, normalize=False)
        tagged = _get(src, "DiffusionGradientOrientation") is not None or bool(grad_seq)
        return b, direction, _text(_get(src, "DiffusionDirectionality")).upper() == "ISOTROPIC", tagged
    return None, None, False, False


def _shared(ds):
    seq = _get(ds, "SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _csa(raw) -> dict | None:
    """``{name: [values]}`` of a Siemens CSA header (raw bytes); None when absent or damaged."""
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tags = _csareader().read(bytes(raw))["tags"]
    except Exception:  # struct.error, CSAReadError, ...
        return None
    return {name: list(tag.get("items") or []) for name, tag in tags.items() if isinstance(tag, dict)}


def _orientation(ds, frame_item):
    for group in (frame_item, _shared(ds)):
        seq = _get(group, "PlaneOrientationSequence")
        if seq:
            return _numbers(_get(seq[0], "ImageOrientationPatient"), "DS")
    return _numbers(_get(ds, "ImageOrientationPatient"), "DS")


def _canon_comment_gradient(comment) -> tuple[float, float, float] | None:
    """The gradient of a Canon classic image's ImageComments, ``b=1500(0.445,0.000,0.895)``, in the
    order dcm2niix reads it (image frame, as GE's): the first two components swapped. None when the
    text holds no such vector (or a zero one)."""
    text = _text(comment)
    start = text.find("(", text.find("b="))
    end = text.find(")", start)
    if "b=" not in text or start < 0 or end < 0:
        return None
    v = _numbers(text[start + 1:end].split(","), "DS")
    return _unit((v[1], v[0], v[2]), normalize=False) if v is not None and len(v) == 3 else None


def _image_to_lps(g, ds, frame_item):
    """A gradient given along the image's row, column and normal directions as an LPS vector (UIH's
    (0065,1037): dcm2niix writes it as it is, but for the sign of its second axis)."""
    orientation = _orientation(ds, frame_item)
    if orientation is None or len(orientation) != 6:
        return g  # no geometry: the series cannot be converted anyway
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    return tuple(np.column_stack([r, c, np.cross(r, c)]) @ np.asarray(g, dtype=float))


def _ge_scaled_bvalue(b, g):
    """dcm2niix's GE (and Canon image-frame) b-value of a gradient stored with length 0.03-0.97:
    ``b |g|^2`` rounded to a multiple of 5 (rordenlab/dcm2niix#163: the scanner scales the gradient,
    not the b-value, for extra b-values; measured: 223.065 -> 225, 502.4 -> 500, 2.6 -> 5)."""
    if b is None or g is None or b <= B0_MAX:
        return b
    length = float(np.linalg.norm(np.asarray(g, dtype=np.float32)))
    return 5.0 * math.floor(b * length * length / 5.0 + 0.5) if 0.03 < length < 0.97 else b


def _ge_to_lps(g, ds, frame_item) -> tuple[float, float, float] | None:
    """GE (and Canon) gradient, in the image frame, as the LPS vector for which :func:`fsl_bvecs`
    writes what dcm2niix writes (``geCorrectBvecs``): signs by slice plane (the world axis nearest
    the slice normal; ties go to the later axis): sagittal ``(+, -, -)``, coronal ``(-, -, +)``, axial
    ``(-, +, +)``; then, for ROW phase encoding, ``(x, y, z) -> (-y, x, z)``. dcm2niix applies that
    swap after the signs since its fix of coronal ROW series (rordenlab/dcm2niix#970, PR #971; before,
    the swap came first, which differs for coronal planes only). The result is dcm2niix's bvec in its
    voxel frame ``(r, -c, r x c)``, taken back to LPS."""
    orientation = _orientation(ds, frame_item)
    if g is None or orientation is None or len(orientation) != 6:
        return g  # no geometry: the series cannot be converted anyway
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    phase = _text(_get(ds, "InPlanePhaseEncodingDirection")).upper()
    if not phase.startswith(("ROW", "COL")):  # dcm2niix leaves the vector as stored
        return _unit(np.column_stack([r, -c, n]) @ np.asarray(g))
    a = np.abs(n)
    plane = 2 if (a[2] >= a[0] and a[2] >= a[1]) else 1 if (a[1] >= a[0] and a[1] >= a[2]) else 0
    signs = {0: (1, -1, -1), 1: (-1, -1, 1), 2: (-1, 1, 1)}[plane]
    bvec = np.asarray(signs, float) * np.asarray(g, float)
    if phase.startswith("ROW"):
        bvec = np.array([-bvec[1], bvec[0], bvec[2]])
    return _unit(np.column_stack([r, -c, n]) @ bvec)


# --- volumes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DwiVolumes:
    """Images of a DWI series grouped into volumes, in dcm2niix's volume order.

    ``volumes[v]`` holds the input indices of volume ``v``'s images, in ascending slice position;
    ``diffusion[v]`` its encoding (that of its first acquired image). ``excluded`` holds the
    derived trace/ADC volumes left out (same layout), ``excluded_diffusion`` their encodings.
    ``write_gradients`` is whether dcm2niix writes ``.bval``/``.bvec`` for the kept volumes (b-values
    or gradients vary).
    """

    volumes: tuple[tuple[int, ...], ...]
    diffusion: tuple[Diffusion, ...]
    excluded: tuple[tuple[int, ...], ...]
    excluded_diffusion: tuple[Diffusion, ...]
    write_gradients: bool

    @property
    def bvalues(self) -> np.ndarray:
        """(V,) b-values in s/mm^2 of the kept volumes."""
        return np.array([d.bvalue for d in self.diffusion], dtype=float)

    @property
    def directions(self) -> np.ndarray:
        """(V, 3) LPS unit gradients of the kept volumes (zeros where there is none)."""
        return np.array([d.direction or (0.0, 0.0, 0.0) for d in self.diffusion], dtype=float).reshape(-1, 3)


def _bkey(d: Diffusion) -> tuple:
    direction = None if d.direction is None else tuple(round(x, 4) + 0.0 for x in d.direction)
    return round(d.bvalue, 6), direction, d.is_trace


def dwi_volumes(slice_positions, diffusions, order_keys, position_tol: float = 0.01) -> DwiVolumes:
    """Group the images of one DWI series into volumes and order them as dcm2niix does.

    ``slice_positions`` (N,) is each image's position along the slice normal in mm
    (``dot(ImagePositionPatient, r x c)``); ``diffusions`` (N,) their :class:`Diffusion`;
    ``order_keys`` (N,) sortable acquisition-order keys (InstanceNumber for classic files,
    ``(InstanceNumber, frame)`` for enhanced ones; ties keep input order).

    Images at one position (within ``position_tol`` mm) with the same b-value, gradient and trace
    flag are the repeats of one encoding; the ``m``-th of them in ``order_keys`` order belongs to
    that encoding's ``m``-th volume. This holds whether the numbering runs slice by slice (Philips)
    or volume by volume, and keeps repeated b=0 and tiny-b volumes apart. Volumes are ordered by their
    smallest key, which is dcm2niix's order: it sorts by InstanceNumber, not AcquisitionTime, and
    keeps b = 0.001-0.004 volumes where they were acquired.

    Trace/ADC volumes are excluded as dcm2niix does, except when that would leave fewer than two
    volumes (kept then, and a b=0 + trace pair keeps its ``.bval``). Raises :class:`DiffusionError`
    (``inconsistent_diffusion``) when an encoding's volumes do not each have one image per position.
    """
    pos = np.asarray(slice_positions, dtype=float).reshape(-1)
    n = len(pos)
    if len(diffusions) != n or len(order_keys) != n:
        raise ValueError("slice_positions, diffusions and order_keys must have the same length")
    if any(d is None for d in diffusions):
        raise DiffusionError("inconsistent_diffusion", "some images of the series have no b-value")
    # slice index of every image: positions within position_tol are one slice
    by_pos = np.argsort(pos, kind="stable")
    slice_of = np.zeros(n, dtype=int)
    for a, b in zip(by_pos[:-1], by_pos[1:]):
        slice_of[b] = slice_of[a] + (pos[b] - pos[a] > position_tol)
    n_slices = int(slice_of.max()) + 1 if n else 0
    keys = [(k is None, 0 if k is None else k) for k in order_keys]  # missing keys go last
    acquired = sorted(range(n), key=lambda i: (keys[i], i))
    rank = {i: r for r, i in enumerate(acquired)}
    repeat: dict[tuple, int] = {}
    groups: dict[tuple, list[int]] = {}
    for i in acquired:
        key = (_bkey(diffusions[i]), slice_of[i])
        m = repeat.get(key, 0)
        repeat[key] = m + 1
        groups.setdefault((_bkey(diffusions[i]), m), []).append(i)
    vols = []
    for members in groups.values():
        if len(members) != n_slices:
            raise DiffusionError("inconsistent_diffusion", f"a volume has {len(members)} images for "
                                                           f"{n_slices} slice positions")
        first = members[0]  # members were appended in acquisition order
        vols.append((rank[first], tuple(sorted(members, key=lambda i: pos[i])), diffusions[first]))
    vols.sort()
    everything = [v[2] for v in vols]
    write = _writes_gradients(everything)
    n_trace = sum(d.is_trace for d in everything)
    if n_trace == len(vols) or (n_trace and len(vols) - n_trace < 2):
        # all trace, or a single DWI volume left: dcm2niix keeps every volume and writes no gradients,
        # except for a b=0 + trace pair, whose .bval says which is which
        kept, traces = vols, []
        write = write and n_trace == 1 and len(vols) == 2
    else:
        kept, traces = [v for v in vols if not v[2].is_trace], [v for v in vols if v[2].is_trace]
    return DwiVolumes(
        volumes=tuple(v[1] for v in kept), diffusion=tuple(v[2] for v in kept),
        excluded=tuple(v[1] for v in traces), excluded_diffusion=tuple(v[2] for v in traces),
        write_gradients=write,
    )


def is_one_volume_dwi(diffusion: Diffusion | None, manufacturer, mosaic: bool = False) -> bool:
    """Whether a series of one volume (one encoding) is a diffusion image, written with ``.bval`` (and
    ``.bvec`` unless it is a trace image), as dcm2niix decides it. Measured with dcm2niix on one-volume
    series of every vendor's tags (tests/test_prep_diffusion.py) and on real files:

    * a stored gradient direction, or b > 0: yes (a b=0 or b=1000 series exported on its own, one
      direction, a Siemens trace image; Philips and unknown vendors' trace images get no ``.bvec``);
    * b = 0 without a direction: no (GE's (0043,1039) and other vendors' b-value tags are also found
      outside diffusion sequences, e.g. in GE field maps);
    * GE: never (dcm2niix writes no ``.bval`` for a one-volume GE series, whatever its tags), nor for a
      Canon series read in the image frame (an encoding with a ``scanner`` reading: see
      :func:`canon_series`, which gives a series whose first image carries DiffusionGradientOrientation
      its ``scanner`` readings, judged as any other vendor's);
    * a Siemens mosaic with a b-value: yes (dcm2niix then writes b = 0 and a zero gradient whatever
      the header says, "assuming 1 volume B=0 series"; we write the header's b-value and gradient).

    Known difference: dcm2niix also writes ``.bval`` "0" for a real Philips b=0 volume stored
    without a gradient (other Philips diffusion tags present); that volume stays an ``image`` here."""
    if diffusion is None:
        return False
    vendor = vendor_of(manufacturer)
    if vendor == "ge" or diffusion.scanner is not None:  # a Canon image-frame reading: GE's rule
        return False
    if mosaic and vendor == "siemens":
        return True
    return diffusion.bvalue > B0_MAX or diffusion.direction is not None


def _writes_gradients(diffusion: list[Diffusion]) -> bool:
    """dcm2niix writes ``.bval``/``.bvec`` when there are two or more volumes and the b-values vary,
    or all exceed 50 s/mm^2, or the gradients vary and some volume has none (then a b=0)."""
    if len(diffusion) < 2:
        return False
    bvals = {d.bvalue for d in diffusion}
    if len(bvals) > 1 or min(bvals) > 50.0:
        return True
    dirs = {d.direction for d in diffusion}
    return len(dirs) > 1 and None in dirs


# --- FSL files -------------------------------------------------------------------------------------

def fsl_bvecs(directions_lps, affine_ras, bvalues=None) -> np.ndarray:
    """FSL gradient table ``(3, N)`` of LPS unit gradients ``(N, 3)`` for an image with ``affine_ras``.

    FSL's ``.bvec`` is in the image's **voxel frame**: component ``a`` is the gradient's projection on
    voxel axis ``a`` (``i``, ``j``, ``k``), with the axes taken as in dcm2niix: ``i`` and ``j`` along
    the affine's first two columns and ``k`` along their cross product, signed like the third
    column (so a gantry tilt, which shears the slice axis, does not tilt the gradients). FSL reads
    voxels in radiological order: for an affine with a positive determinant (neurological, e.g.
    our ``(column, row, +normal)`` grid) it flips the ``i`` axis, so the gradient must change sign
    along ``i``. dcm2niix writes that case (its only one: Siemens sagittal mosaics) as the
    antipodal vector, ``j`` and ``k`` negated instead of ``i``; a gradient and its negative encode
    the same diffusion weighting, and we write what dcm2niix writes. Negative determinant (dcm2niix's
    usual row-flipped grid): the voxel-frame vector as it is.

    Rows of zeros (no gradient) stay zero. With ``bvalues`` (N,), gradients of b <= FLT_EPSILON are
    copied unrotated (LPS), as dcm2niix does.
    """
    d = np.asarray(directions_lps, dtype=float).reshape(-1, 3)
    m = np.asarray(affine_ras, dtype=float)[:3, :3]
    i_axis = m[:, 0] / np.linalg.norm(m[:, 0])
    j_axis = m[:, 1] / np.linalg.norm(m[:, 1])
    k_axis = np.cross(i_axis, j_axis)
    k_axis *= np.sign(k_axis @ m[:, 2]) or 1.0
    rotation = np.stack([i_axis, j_axis, k_axis])  # rows: voxel axes in RAS
    out = (rotation @ (d * [-1.0, -1.0, 1.0]).T)  # LPS -> RAS -> voxel frame
    norms = np.linalg.norm(out, axis=0)
    out = np.divide(out, norms, out=np.zeros_like(out), where=norms > B0_MAX)
    if np.linalg.det(m) > 0:
        out[1:] *= -1.0
    if bvalues is not None:
        b0 = np.asarray(bvalues, dtype=float).reshape(-1) <= B0_MAX
        out[:, b0] = d[b0].T
    return out + 0.0  # no negative zeros


def _g(value) -> str:
    """A number as C's ``printf("%g", (float) value)``, as dcm2niix writes it; ``-0`` becomes ``0``."""
    return "%g" % (float(np.float32(value)) + 0.0)


def format_bval(bvalues) -> str:
    """``.bval`` text of (N,) b-values: one line, space separated, ``%g`` of float32, as dcm2niix
    writes it with its default BIDS sidecar (``-b y``): ``"0 1000 1000 0.001\\n"``."""
    return " ".join(_g(b) for b in np.asarray(bvalues, dtype=float).reshape(-1)) + "\n"


def format_bvec(bvecs) -> str:
    """``.bvec`` text of a (3, N) table (see :func:`fsl_bvecs`): three lines, same layout as
    :func:`format_bval`."""
    table = np.asarray(bvecs, dtype=float).reshape(3, -1)
    return "".join(" ".join(_g(v) for v in row) + "\n" for row in table)
