#!/usr/bin/env python
"""Fuzz harness for ``medimb-prep convert`` (issue 11): seeded mutations of real DICOM series + an oracle.

Every run builds a small archive in a temporary folder (a copy of one source series with one or a
few files mutated, after planting distinctive fake identifiers in every file), runs

    python -m data_prep convert ARCHIVE OUT --workers 1 --no-progress

as a subprocess under a time limit and an address-space limit, and checks an oracle. Every
violation is recorded with its rule, the mutation class(es) and the run seed, so it can be replayed:

    python benchmarks/fuzz_prep.py --mutations 300 --seed 0 [--out DIR] [--jobs J] [--keep DIR]
    python benchmarks/fuzz_prep.py --replay 0:17 --keep DIR     # one run again (archive, OUT, output kept)
    python benchmarks/fuzz_prep.py --case series_number_abc     # the regression case of a class ('all')
    python benchmarks/fuzz_prep.py --only truncate_random -n 50 # runs of chosen classes only
    python benchmarks/fuzz_prep.py --list                       # the mutation classes
    python benchmarks/fuzz_prep.py --code /tmp/old_checkout ... # test another checkout's data_prep

Limits per convert: 60 s and a 3 GiB address space (``--timeout``, ``--memory-gib``).

Identifiers planted in every run (:data:`PLANTED_TAGS`): patient name/ID/birth date, accession,
other IDs, institution and referring physician; files are named ``<n>_<SOPInstanceUID>.dcm``.
The PHI classes add free-text names and dates (``phi_in_description``), a patient-named folder
(``phi_archive_folder``) and PatientName 'HFS' (``phi_patient_name_hfs``).

Sources: the real Siemens series ``$MEDIMB_SHARED_DATA/dicom/decubitus_hfs_t1_fl2d_sag`` (or
``../shared/data`` next to the repository; left out when absent) and pydicom / pydicom-data test
files (offline): MR_small (native, RLE, JPEG-LS), MR2_J2KR, emri_small, and an 8-slice stack built
from MR_small.

Oracle rules (the ``rule`` of a violation):
  exit_status     exit status 0 or 1 (2 only where a fault expects a refusal)
  traceback       no ``Traceback`` in stdout/stderr
  timeout         finished within the time limit
  report          OUT/report.json exists and parses
  accounting      report["archive_files"] == files in the archive == sum(series[].files) + distinct
                  paths of skipped/failed/dropped issues ('no series list' while the list is absent)
  nifti           every .nii.gz passes :func:`validate_nifti`
  archive         the archive is byte-identical afterwards
  outside_out     nothing was written outside OUT (run folder listing, TMPDIR)
  phi             no planted identifier or source UID in OUT's paths, OUT's file contents
                  (.nii.gz decompressed), stdout or stderr (case-insensitive)
  patient_position  sidecars keep the source's PatientPosition
  converts        (class expectation) the series converts (exit 0, a volume): PHI classes
  rest_converts   (class expectation) the slices a mutation left untouched still convert
  reported        (class expectation) the mutated file is named in the report, or its series failed
  fault           read-only OUT / concurrent converts: the expected refusal (exit 2, one line)
  harness         (CLI only) this script failed on a run: a bug here, not in data_prep
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gzip
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
#: the checkout whose ``data_prep`` is run (``--code`` or ``$FUZZ_PREP_CODE``; default: this repository)
CODE_ROOT = Path(os.environ.get("FUZZ_PREP_CODE", REPO))
SIEMENS_SERIES = Path("dicom") / "decubitus_hfs_t1_fl2d_sag"


# ------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Limits:
    """Resource limits for one ``convert`` subprocess."""

    timeout_s: float = 60.0
    memory_bytes: int = 3 << 30  # RLIMIT_AS


#: identifiers planted in every file of every run (the oracle searches OUT for them)
PLANTED_TAGS = {
    "PatientName": "ZQXNAME^ZQXGIVEN",
    "PatientID": "ZQX1234567",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ZQXACC7788",
    "OtherPatientIDs": "ZQXOTHER99",
    "InstitutionName": "Zqxville Hospital",
    "ReferringPhysicianName": "Zqxdoctor^Anna",
}
#: dates written in free text by the PHI mutations: the study date (2022-04-07 for the Siemens
#: series) and the planted birth date, in formats other than DICOM's YYYYMMDD
FREE_TEXT_DATES = ("07.04.2022", "2022-04-07", "04/07/2022", "12.03.1947", "1947-03-12", "03/12/1947")
#: what the oracle looks for (case-insensitive); 'Anna' and 'HFS' are too short to search pixel data for
PHI_NEEDLES = ("zqxname", "zqxgiven", "zqx1234567", "19470312", "zqxacc7788", "zqxother99", "zqxville",
               "zqxdoctor") + FREE_TEXT_DATES


def shared_data_dir() -> Path | None:
    """``$MEDIMB_SHARED_DATA`` or ``../shared/data`` next to the repository, if it exists."""
    path = Path(os.environ.get("MEDIMB_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


# --------------------------------------------------------------------------------- DICOM editing
def read_dataset(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data), force=True)


def write_dataset(ds: pydicom.Dataset) -> bytes:
    """Serialise like the original (preamble, meta and encoding as read; raw values kept raw)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def set_raw(ds: pydicom.Dataset, keyword: str, value: str | bytes, vr: str | None = None,
            pad: bool = True) -> None:
    """Store ``value`` in ``keyword`` as raw bytes, bypassing pydicom's value validation.

    Text is latin-1 encoded; values are padded to an even length unless ``pad`` is false; ``vr``
    overrides the dictionary VR (a wrong VR is then written into explicit-VR headers).
    """
    tag = Tag(keyword)
    vr = vr or dictionary_VR(tag)
    raw = value.encode("latin-1") if isinstance(value, str) else value
    if pad and len(raw) % 2:
        raw += b" " if isinstance(value, str) else b"\0"
    implicit, little = ds.original_encoding
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, bool(implicit), little is not False)


def pixel_data_offset(data: bytes) -> int:
    """Byte offset of the (7FE0,0010) element: the end of the header region."""
    try:
        fh = io.BytesIO(data)
        pydicom.dcmread(fh, stop_before_pixels=True, force=True)
        return fh.tell()
    except Exception:  # a damaged file: fall back to the last pixel-data tag
        at = data.rfind(b"\xe0\x7f\x10\x00")
        return at if at > 0 else len(data)


def slice_distance(ds: pydicom.Dataset) -> float:
    """Position along the slice normal (for ordering the files of a stack)."""
    o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return float(np.dot([float(v) for v in ds.ImagePositionPatient], np.cross(o[:3], o[3:])))


# --------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Source:
    """A series to mutate, with identifiers already planted.

    ``files`` maps the archive file name (``<n>_<SOPInstanceUID>.dcm``) to its bytes;
    ``slice_order`` lists the names in ascending position along the slice normal (file order when
    there is no geometry); ``uids`` are the instance/series/study UIDs the oracle searches for.
    """

    name: str
    files: dict
    slice_order: tuple
    uids: frozenset
    patient_position: str | None
    real_data: bool = False

    @property
    def multi_slice(self) -> bool:
        return len(self.files) > 1


def plant_identifiers(ds: pydicom.Dataset) -> None:
    """Overwrite the patient/visit identifiers with the distinctive fake ones of :data:`PLANTED_TAGS`."""
    for keyword, value in PLANTED_TAGS.items():
        setattr(ds, keyword, value)


def dataset_uids(ds: pydicom.Dataset) -> set[str]:
    return {str(ds.get(k)) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if ds.get(k)}


def make_source(name: str, datasets: list[pydicom.Dataset], real_data: bool = False) -> Source:
    """Plant identifiers, name files ``<n>_<SOPInstanceUID>.dcm`` and order them along the normal."""
    files, distance, uids = {}, {}, set()
    for n, ds in enumerate(datasets, start=1):
        uids |= dataset_uids(ds)
        plant_identifiers(ds)
        fname = f"{n:04d}_{ds.SOPInstanceUID}.dcm"
        files[fname] = write_dataset(ds)
        try:
            distance[fname] = slice_distance(ds)
        except (AttributeError, TypeError, ValueError):
            distance[fname] = float(n)
    order = tuple(sorted(files, key=lambda f: distance[f]))
    position = datasets[0].get("PatientPosition")
    return Source(name, files, order, frozenset(uids), str(position) if position else None, real_data)


def stack_from(ds: pydicom.Dataset, name: str, n_slices: int = 8) -> list[pydicom.Dataset]:
    """``n_slices`` copies of one classic image, stepped along its normal by SliceThickness, with
    new (deterministic) SOP instance and series UIDs: a multi-slice series from pydicom test data."""
    o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(o[:3], o[3:])
    step = float(ds.get("SliceThickness") or 1.0)
    origin = np.asarray([float(v) for v in ds.ImagePositionPatient])
    series_uid = generate_uid(entropy_srcs=[name, "series"])
    out = []
    for k in range(n_slices):
        s = copy.deepcopy(ds)
        s.ImagePositionPatient = [f"{v:.6g}" for v in origin + k * step * normal]
        s.SOPInstanceUID = generate_uid(entropy_srcs=[name, "sop", str(k)])
        s.file_meta.MediaStorageSOPInstanceUID = s.SOPInstanceUID
        s.SeriesInstanceUID = series_uid
        s.InstanceNumber = k + 1
        out.append(s)
    return out


PYDICOM_FILES = {  # source name -> pydicom / pydicom-data test file
    "mr_small": "MR_small.dcm",
    "mr_small_rle": "MR_small_RLE.dcm",
    "mr_small_jpeg_ls": "MR_small_jpeg_ls_lossless.dcm",
    "mr2_j2kr": "MR2_J2KR.dcm",
    "emri_small": "emri_small.dcm",
}
SIEMENS = "siemens_t1_sag"
STACK = "mr_small_stack"

_sources_lock = threading.Lock()
_sources: dict[str, Source] | None = None


def load_sources() -> dict[str, Source]:
    """Every available source by name (built once per process; the Siemens series only when present)."""
    global _sources
    with _sources_lock:
        if _sources is None:
            from pydicom.data import get_testdata_file

            found: dict[str, Source] = {}
            for name, fname in PYDICOM_FILES.items():
                found[name] = make_source(name, [pydicom.dcmread(get_testdata_file(fname))])
            mr_small = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
            found[STACK] = make_source(STACK, stack_from(mr_small, STACK))
            shared = shared_data_dir()
            if shared is not None and (shared / SIEMENS_SERIES).is_dir():
                paths = sorted((shared / SIEMENS_SERIES).glob("*.dcm"))
                found[SIEMENS] = make_source(SIEMENS, [pydicom.dcmread(p) for p in paths], real_data=True)
            _sources = found
        return _sources


SINGLE = ("mr_small", "mr_small_rle", "mr_small_jpeg_ls", "mr2_j2kr")
STACKS = (STACK, SIEMENS)
GEOMETRY = STACKS + SINGLE
ALL = GEOMETRY + ("emri_small",)
COMPRESSED = ("mr_small_rle", "mr_small_jpeg_ls", "mr2_j2kr")
NATIVE = (STACK, SIEMENS, "mr_small")


# --------------------------------------------------------------------------------------- archive
@dataclass
class Archive:
    """An archive being built in memory: archive-relative path -> bytes.

    ``slices`` are the source series' paths in ascending position along the normal; ``targets``
    the paths a mutation changed (for the 'reported' expectation); ``needles`` extra identifiers
    the oracle must not find in the output; ``exempt`` identifiers of :data:`PHI_NEEDLES` a mutation
    removed from every header field that says what they are (free text still holding them cannot be
    recognised); ``notes`` what could not be done.
    """

    source: Source
    files: dict = field(default_factory=dict)
    slices: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    needles: set = field(default_factory=set)
    exempt: set = field(default_factory=set)
    notes: list = field(default_factory=list)

    def phi_needles(self) -> set:
        """What the oracle searches the output for."""
        return (set(PHI_NEEDLES) - self.exempt) | self.needles

    @classmethod
    def from_source(cls, source: Source) -> Archive:
        return cls(source, dict(source.files), list(source.slice_order), [], set(source.uids))

    def pick(self, rng: random.Random, edge: bool = False) -> str:
        """One slice: any, or the first/last along the normal (dropping it leaves no gap)."""
        return rng.choice([self.slices[0], self.slices[-1]] if edge else self.slices)

    def pick_some(self, rng: random.Random, k: int) -> list[str]:
        return rng.sample(self.slices, min(k, len(self.slices)))

    def edit(self, path: str, change: Callable[[pydicom.Dataset], None]) -> None:
        """Parse one file with pydicom, apply ``change``, serialise it back; records the target.

        A file an earlier mutation of the same archive left unparsable stays as it is (noted).
        """
        try:
            ds = read_dataset(self.files[path])
            change(ds)
            self.files[path] = write_dataset(ds)
        except Exception as exc:
            self.notes.append(f"could not edit {file_number(path)} ({type(exc).__name__})")
            return
        self.mark(path)

    def edit_all(self, change: Callable[[pydicom.Dataset], None]) -> None:
        for path in list(self.slices):
            self.edit(path, change)

    def mark(self, path: str) -> None:
        if path not in self.targets:
            self.targets.append(path)

    def move_under(self, folder: str) -> None:
        """Move every file into ``folder`` (paths in ``slices``/``targets`` follow)."""
        moved = {p: f"{folder}/{p}" for p in self.files}
        self.files = {moved[p]: data for p, data in self.files.items()}
        self.slices = [moved[p] for p in self.slices]
        self.targets = [moved[p] for p in self.targets]

    def write(self, root: Path) -> None:
        for rel, data in self.files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def file_number(path: str) -> str:
    """The ``<n>`` of ``<n>_<SOPInstanceUID>.dcm`` (survives UID scrubbing in report paths)."""
    return Path(path).name.split("_")[0]


# ------------------------------------------------------------------------------------- mutations
@dataclass(frozen=True)
class Mutation:
    """A named mutation class.

    ``apply(archive, rng, k)`` changes the archive in memory (``k`` = how many files, where the class
    allows several). ``sources`` are the compatible sources; ``regression_source`` the one the
    per-class regression test uses. ``expect`` adds class-specific oracle rules ('converts',
    'rest_converts', 'reported'; see :func:`check_expectations`) that hold only when this mutation is
    alone in its archive. A ``fault`` class runs
    its own scenario instead of one plain convert.
    """

    name: str
    doc: str
    apply: Callable
    sources: tuple
    regression_source: str
    expect: tuple = ()
    multi_file: bool = False
    fault: Callable | None = None
    byte_level: bool = False  # damages bytes pydicom may no longer parse: applied after the others


MUTATIONS: dict[str, Mutation] = {}


def summary_of(fn: Callable) -> str:
    """The first paragraph of ``fn``'s docstring, on one line."""
    return " ".join(fn.__doc__.strip().split("\n\n")[0].split())


def register(name: str, apply: Callable, sources: tuple, regression_source: str | None = None,
             expect: tuple = (), multi_file: bool = False, fault: Callable | None = None,
             byte_level: bool = False) -> None:
    """Add a mutation class, described by the first paragraph of ``apply``'s (or ``fault``'s) docstring."""
    MUTATIONS[name] = Mutation(name, summary_of(fault or apply), apply, sources,
                               regression_source or sources[0], expect, multi_file, fault, byte_level)


def on_one_slice(keyword: str, value: str, edge: bool = False) -> Callable:
    """Mutation: raw ``value`` in ``keyword`` of one slice (an edge slice when ``edge``)."""
    def apply(archive: Archive, rng: random.Random, k: int = 1) -> None:
        archive.edit(archive.pick(rng, edge), lambda ds: set_raw(ds, keyword, value))
    apply.__doc__ = f"{keyword} {value!r} on one {'edge ' if edge else ''}slice."
    return apply


def on_all_slices(keyword: str, value: str) -> Callable:
    """Mutation: raw ``value`` in ``keyword`` of every slice of the series."""
    def apply(archive: Archive, rng: random.Random, k: int = 1) -> None:
        archive.edit_all(lambda ds: set_raw(ds, keyword, value))
    apply.__doc__ = f"{keyword} {value!r} on every slice."
    return apply


def _us(*values: int) -> bytes:
    return np.asarray(values, "<u2").tobytes()


def rows_two_values(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """Rows holds two values (VM 2), e.g. ``64\\64``."""
    def change(ds):
        set_raw(ds, "Rows", _us(int(ds.Rows), int(ds.Rows)))
    archive.edit(archive.pick(rng), change)


def orientation_skewed(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """Every slice's column direction tilted towards the row direction: c' = 0.3 r + 0.95 c
    (for MR_small exactly 1,0,0,0.3,0.95,0). The normal keeps its direction, so the stack still sorts."""
    def change(ds):
        o = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        skewed = np.concatenate([o[:3], 0.3 * o[:3] + 0.95 * o[3:]])
        set_raw(ds, "ImageOrientationPatient", "\\".join(f"{v:.6g}" for v in skewed))
    archive.edit_all(change)


def position_nan_one_slice(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """ImagePositionPatient of one slice with NaN in one or all components."""
    def change(ds):
        pos = [f"{float(v):.6g}" for v in ds.ImagePositionPatient]
        for i in (rng.sample(range(3), 1) if rng.random() < 0.5 else range(3)):
            pos[i] = "NaN"
        set_raw(ds, "ImagePositionPatient", "\\".join(pos))
    archive.edit(archive.pick(rng), change)


def pixel_spacing_one_slice_differs(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """One slice with 1.5x the PixelSpacing of the others (same matrix size)."""
    def change(ds):
        set_raw(ds, "PixelSpacing", "\\".join(f"{1.5 * float(v):.6g}" for v in ds.PixelSpacing))
    archive.edit(archive.pick(rng, edge=True), change)


def bits_stored_zero(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """BitsStored 0 on one (edge) slice."""
    archive.edit(archive.pick(rng, edge=True), lambda ds: set_raw(ds, "BitsStored", _us(0)))


def bits_stored_too_big(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """BitsStored = BitsAllocated + 4 on one (edge) slice."""
    archive.edit(archive.pick(rng, edge=True),
                 lambda ds: set_raw(ds, "BitsStored", _us(int(ds.BitsAllocated) + 4)))


def localizer_one_of_many(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """ImageType ORIGINAL\\PRIMARY\\LOCALIZER on one (edge) slice of a full stack."""
    archive.edit(archive.pick(rng, edge=True),
                 lambda ds: set_raw(ds, "ImageType", "ORIGINAL\\PRIMARY\\LOCALIZER"))


def truncate_random(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """k files cut at a random offset (anywhere, preamble to last pixel byte)."""
    for path in archive.pick_some(rng, k):
        data = archive.files[path]
        archive.files[path] = data[: rng.randrange(0, len(data))]
        archive.mark(path)


def header_byte_flips(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """k files with 1-8 random bytes XOR-ed in the header region (before the pixel data element)."""
    for path in archive.pick_some(rng, k):
        data = bytearray(archive.files[path])
        end = max(pixel_data_offset(bytes(data)), 129)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(128, end)] ^= rng.randint(1, 255)
        archive.files[path] = bytes(data)
        archive.mark(path)


REQUIRED_ELEMENTS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "PixelData", "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID",
    "StudyInstanceUID", "PatientID", "Modality", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing",
)


def delete_required_element(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """k files each lose one element a converter needs (Rows, PixelData, SeriesInstanceUID, ...)."""
    for path in archive.pick_some(rng, k):
        keyword = rng.choice(REQUIRED_ELEMENTS)
        archive.edit(path, lambda ds, kw=keyword: ds.pop(Tag(kw), None))


def _garbage(rng: random.Random) -> bytes:
    return bytes(rng.choice(b"\x00\xff\xfe\\.-eE9nN \x80\xc3\x28") for _ in range(rng.randrange(2, 17, 2)))


GARBAGE_TEXT_ELEMENTS = (
    "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SpacingBetweenSlices", "EchoTime", "RepetitionTime", "AcquisitionTime", "StudyDate", "SeriesNumber",
    "EchoNumbers", "RescaleSlope", "PatientPosition", "ImageType", "SpecificCharacterSet", "NumberOfFrames",
    "TemporalPositionIdentifier",
)
WRONG_VR = (  # (keyword, VR written instead, raw value)
    ("Rows", "DS", b"64.5"), ("Columns", "IS", b"abc "), ("BitsAllocated", "CS", b"SIXTEEN "),
    ("ImagePositionPatient", "FD", np.asarray([1.0, 2.0, 3.0], "<f8").tobytes()),
    ("PixelSpacing", "US", _us(1, 1)), ("SeriesNumber", "UL", np.asarray([7], "<u4").tobytes()),
    ("ImageOrientationPatient", "OB", b"\x01\x02\x03\x04"), ("Rows", "US", b"\x40\x00\x00"),
)


def garbage_value(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """k files with garbage bytes in a value, or a value written under a wrong VR / odd length."""
    for path in archive.pick_some(rng, k):
        if rng.random() < 0.5:
            keyword, raw = rng.choice(GARBAGE_TEXT_ELEMENTS), _garbage(rng)
            archive.edit(path, lambda ds, kw=keyword, v=raw: set_raw(ds, kw, v, dictionary_VR(Tag(kw))))
        else:
            keyword, vr, raw = rng.choice(WRONG_VR)
            archive.edit(path, lambda ds, kw=keyword, vr=vr, v=raw: set_raw(ds, kw, v, vr, pad=False))


def pixel_data_shortened(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """k files whose PixelData element is consistently shorter (native: half the bytes; compressed:
    each frame's codestream halved inside a valid encapsulation)."""
    def change(ds):
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            n = int(ds.get("NumberOfFrames") or 1)
            frames = list(generate_frames(ds.PixelData, number_of_frames=n))
            ds.PixelData = encapsulate([f[: max(2, len(f) // 2) // 2 * 2] for f in frames])
        else:
            data = ds.PixelData
            ds.PixelData = data[: len(data) // 4 * 2]
    for path in archive.pick_some(rng, k):
        archive.edit(path, change)


def phi_in_description(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """Names, the institution, the referring physician and dates in other formats inside
    SeriesDescription and ProtocolName of every slice."""
    dates = rng.sample(FREE_TEXT_DATES, 3)
    description = f"t1 ZQXNAME Zqxgiven {dates[0]} Zqxville Hospital"
    protocol = f"Zqxdoctor^Anna {dates[1]} ZQX1234567 {dates[2]}"
    def change(ds):
        set_raw(ds, "SeriesDescription", description)
        set_raw(ds, "ProtocolName", protocol)
    archive.edit_all(change)


PHI_FOLDERS = ("ZQXNAME^ZQXGIVEN", "ZQX1234567", "Zqxname, Zqxgiven", "zqxname_zqxgiven_1947-03-12",
               "ZQXNAME ZQXGIVEN 12.03.1947")


def phi_archive_folder(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """The series lies in a folder named after the patient (name, ID, birth date), next to a
    non-DICOM ``notes.txt`` so that the report has a path inside it."""
    folder = rng.choice(PHI_FOLDERS)
    archive.move_under(folder)
    archive.files[f"{folder}/notes.txt"] = b"exported by PACS\n"


def phi_patient_name_hfs(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """PatientName 'HFS' (as in the real Siemens series) while PatientPosition is HFS: the sidecar's
    PatientPosition must stay 'HFS'. The planted name is then in no name field, so the oracle no
    longer expects it scrubbed from free text (with ``phi_in_description`` a description would carry a
    name no header field names: header-driven scrubbing cannot know it; docs/data_prep.md)."""
    archive.edit_all(lambda ds: setattr(ds, "PatientName", "HFS"))
    archive.exempt |= {"zqxname", "zqxgiven"}


# --- the registry: name, mutation, compatible sources (the first is the regression source unless given)
REST_CONVERTS, REPORTED, CONVERTS = ("rest_converts",), ("reported",), ("converts",)
PARALLEL, ZERO = "1\\0\\0\\1\\0\\0", "0\\0\\0\\0\\0\\0"

register("series_number_abc", on_one_slice("SeriesNumber", "abc", edge=True), (STACK,) + ALL,
         expect=REST_CONVERTS)
register("series_number_float", on_one_slice("SeriesNumber", "1.5", edge=True), (STACK,) + ALL,
         expect=REST_CONVERTS)
register("series_number_nan", on_one_slice("SeriesNumber", "NaN", edge=True), (STACK,) + ALL,
         expect=REST_CONVERTS)
register("series_number_multi", on_one_slice("SeriesNumber", "3\\4", edge=True), (STACK,) + ALL,
         expect=REST_CONVERTS)
register("rows_two_values", rows_two_values, ("mr_small_rle",) + ALL)
register("orientation_parallel_single", on_one_slice("ImageOrientationPatient", PARALLEL), SINGLE)
register("orientation_zero_single", on_one_slice("ImageOrientationPatient", ZERO), SINGLE)
register("orientation_parallel_one_slice", on_one_slice("ImageOrientationPatient", PARALLEL, edge=True),
         STACKS,
         expect=REST_CONVERTS + REPORTED)
register("orientation_zero_one_slice", on_one_slice("ImageOrientationPatient", ZERO, edge=True), STACKS,
         expect=REST_CONVERTS + REPORTED)
register("orientation_skewed", orientation_skewed, GEOMETRY)
register("position_nan_one_slice", position_nan_one_slice, STACKS, expect=REPORTED)
register("pixel_spacing_nan", on_all_slices("PixelSpacing", "NaN\\NaN"), GEOMETRY)
register("pixel_spacing_zero", on_all_slices("PixelSpacing", "0\\0"), GEOMETRY)
register("pixel_spacing_huge", on_all_slices("PixelSpacing", "1e308\\1e308"), GEOMETRY)
register("pixel_spacing_one_slice_differs", pixel_spacing_one_slice_differs, STACKS, expect=REPORTED)
register("echo_numbers_nan", on_one_slice("EchoNumbers", "NaN", edge=True), (STACK,) + ALL,
         expect=REST_CONVERTS)
register("frames_huge_compressed", on_one_slice("NumberOfFrames", "1000000000"), COMPRESSED, expect=REPORTED)
register("frames_negative", on_one_slice("NumberOfFrames", "-5", edge=True), (STACK,) + ALL, expect=REPORTED)
register("frames_zero", on_one_slice("NumberOfFrames", "0", edge=True), (STACK,) + ALL)
register("rescale_slope_inf_one_slice", on_one_slice("RescaleSlope", "inf"), STACKS, expect=REPORTED)
register("rescale_slope_nan_one_slice", on_one_slice("RescaleSlope", "NaN"), STACKS, expect=REPORTED)
register("rescale_slope_zero_one_slice", on_one_slice("RescaleSlope", "0"), STACKS, expect=REPORTED)
register("rescale_intercept_huge", on_all_slices("RescaleIntercept", "1e39"), GEOMETRY)
register("bits_stored_zero", bits_stored_zero, (SIEMENS,) + NATIVE + ALL, regression_source=STACK,
         expect=REPORTED)
register("bits_stored_too_big", bits_stored_too_big, (SIEMENS,) + NATIVE + ALL, expect=REPORTED)
register("localizer_one_of_many", localizer_one_of_many, STACKS, regression_source=SIEMENS,
         expect=REST_CONVERTS + REPORTED)
register("truncate_random", truncate_random, ALL, multi_file=True, byte_level=True)
register("header_byte_flips", header_byte_flips, ALL, multi_file=True, byte_level=True)
register("delete_required_element", delete_required_element, ALL, multi_file=True)
register("garbage_value", garbage_value, ALL, multi_file=True)
register("pixel_data_shortened", pixel_data_shortened, ALL, multi_file=True)
register("phi_in_description", phi_in_description, GEOMETRY, expect=CONVERTS)
register("phi_archive_folder", phi_archive_folder, GEOMETRY, expect=CONVERTS)
register("phi_patient_name_hfs", phi_patient_name_hfs, GEOMETRY, regression_source=SIEMENS, expect=CONVERTS)


def no_change(archive: Archive, rng: random.Random, k: int = 1) -> None:
    """The fault classes convert an unmutated series."""


# -------------------------------------------------------------------------------- process running
@dataclass
class ProcessResult:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_LIBC = ctypes.CDLL(None, use_errno=True)


def _child_setup(memory_bytes: int, honour_permissions: bool) -> Callable[[], None]:
    """preexec_fn: the address-space limit; as root, also drop the capabilities that ignore file
    permissions (so a read-only OUT is read-only for the child too)."""
    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        if honour_permissions and os.geteuid() == 0:
            for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
                if _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    return setup


def child_env(tmp: Path) -> dict:
    """The child's environment: :data:`CODE_ROOT`'s data_prep first on the path, TMPDIR in the run folder."""
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=os.pathsep.join(
        [str(CODE_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("MEDIMB_PREP_FAULT_AT_WRITE", None)
    return env


def start_convert(archive: Path, out: Path, run_dir: Path, limits: Limits,
                  honour_permissions: bool = False) -> tuple[subprocess.Popen, float]:
    cmd = [sys.executable, "-m", "data_prep", "convert", str(archive), str(out),
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=run_dir, env=child_env(run_dir / "tmp"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
                            preexec_fn=_child_setup(limits.memory_bytes, honour_permissions))
    return proc, time.monotonic()


def finish(proc: subprocess.Popen, started: float, limits: Limits) -> ProcessResult:
    """Wait for ``proc`` (killing its process group at the time limit) and collect its output."""
    remaining = max(0.1, limits.timeout_s - (time.monotonic() - started))
    try:
        out, err = proc.communicate(timeout=remaining)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return ProcessResult(proc.returncode, out, err, time.monotonic() - started, timed_out)


def run_convert(archive: Path, out: Path, run_dir: Path, limits: Limits, honour_permissions: bool = False):
    return finish(*start_convert(archive, out, run_dir, limits, honour_permissions), limits)


# ----------------------------------------------------------------------------------------- oracle
@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str


def traceback_summary(text: str) -> str:
    """The exception line of the last traceback and where it was raised (file:line in function)."""
    lines = text.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    frames = [i for i in range(start, len(lines)) if lines[i].lstrip().startswith('File "')]
    after = frames[-1] + 1 if frames else start + 1
    exc = next((line for line in lines[after:] if line and not line[0].isspace()), lines[-1])
    where = ""
    m = re.match(r'\s*File "(.+)", line (\d+), in (\S+)', lines[frames[-1]]) if frames else None
    if m:
        path = os.path.relpath(m[1], CODE_ROOT) if m[1].startswith(str(CODE_ROOT)) else Path(m[1]).name
        where = f" ({path}:{m[2]} in {m[3]})"
    return f"{exc.strip()[:200]}{where}"


def check_process(proc: ProcessResult, allowed: tuple = (0, 1), label: str = "") -> list[Violation]:
    out = []
    if proc.timed_out:
        out.append(Violation("timeout", f"{label}killed after {proc.seconds:.0f} s"))
    elif proc.rc not in allowed:
        killed = proc.rc is not None and proc.rc < 0
        what = f"killed by signal {-proc.rc}" if killed else f"exit status {proc.rc}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
        expected = "/".join(map(str, allowed))
        out.append(Violation("exit_status", f"{label}{what} (expected {expected}): {tail}"))
    for text in (proc.stderr, proc.stdout):
        if "Traceback (most recent call last)" in text:
            out.append(Violation("traceback", label + traceback_summary(text)))
            break
    return out


def load_report(out: Path) -> tuple[dict | None, list[Violation]]:
    path = out / "report.json"
    if not path.is_file():
        return None, [Violation("report", "OUT/report.json missing")]
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, [Violation("report", f"report.json does not parse: {exc}")]
    if report.get("complete") is False:
        return report, [Violation("report", "report.json says it is incomplete")]
    return report, []


SERIES_KEYS = {"subject", "session", "series", "status", "files", "outputs"}
SERIES_STATUS = {"converted", "resumed", "failed"}
LEFT_OUT_ACTIONS = ("skipped", "failed", "dropped")


def check_accounting(report: dict, n_files: int) -> list[Violation]:
    """Every archive file is counted once: in a planned series or as a skipped/failed/dropped file."""
    out = []
    counted = report.get("archive_files")
    if counted != n_files:
        out.append(Violation("accounting", f"archive_files={counted} but the archive holds {n_files} files"))
    series = report.get("series")
    if not isinstance(series, list):
        return out + [Violation("accounting", "no series list")]
    for s in series:
        if not isinstance(s, dict) or not SERIES_KEYS <= set(s) or s.get("status") not in SERIES_STATUS:
            return out + [Violation("accounting", f"malformed series entry {str(s)[:120]}")]
    in_series = sum(int(s["files"]) for s in series)
    left_out = {i["path"] for i in report.get("issues", [])
                if i.get("path") and i.get("action") in LEFT_OUT_ACTIONS}
    if counted != in_series + len(left_out):
        out.append(Violation("accounting", f"archive_files={counted} != {in_series} files in {len(series)} "
                                           f"series + {len(left_out)} skipped/failed/dropped paths"))
    return out


def stored_header(path: Path):
    """The NIfTI header exactly as stored in the file."""
    import nibabel as nib

    with (gzip.open(path) if path.name.endswith(".gz") else open(path, "rb")) as fh:
        return nib.Nifti1Header.from_fileobj(fh)


def validate_nifti(path: Path) -> list[str]:
    """Problems of one NIfTI file (empty when valid): loads; scl_slope/scl_inter finite; every voxel
    value finite; affine finite; direction cosines orthonormal within 1e-3; voxel sizes in
    [1e-3, 1e3] mm; no zero-length dimension."""
    import nibabel as nib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(path))
            data = img.get_fdata() if 0 not in img.shape else np.zeros(0)
    except Exception as exc:
        return [f"does not load: {type(exc).__name__}: {str(exc)[:120]}"]
    problems = []
    stored = stored_header(path)  # img.header has scl_slope/scl_inter reset by nibabel after loading
    for name in ("scl_slope", "scl_inter"):
        if not np.isfinite(float(stored[name])):
            problems.append(f"{name}={float(stored[name])}")
    if 0 in img.shape:
        problems.append(f"shape {img.shape} has a zero dimension")
    elif not np.all(np.isfinite(data)):
        problems.append(f"{int(np.sum(~np.isfinite(data)))} of {data.size} voxel values not finite")
    affine = img.affine
    if not np.all(np.isfinite(affine)):
        problems.append(f"affine not finite: {np.round(affine[:3], 3).tolist()}")
        return problems
    axes = affine[:3, :3]
    zooms = np.linalg.norm(axes, axis=0)
    if np.any(zooms < 1e-3) or np.any(zooms > 1e3):
        problems.append(f"voxel sizes {np.round(zooms, 6).tolist()} mm outside [1e-3, 1e3]")
    else:
        cosines = axes / zooms
        err = float(np.abs(cosines.T @ cosines - np.eye(3)).max())
        if err > 1e-3:
            problems.append(f"direction cosines not orthonormal (max |R^T R - I| = {err:.3g})")
    return problems


def check_outputs(out: Path) -> list[Violation]:
    return [Violation("nifti", f"{p.relative_to(out).name}: {problem}")
            for p in sorted(out.rglob("*.nii.gz")) for problem in validate_nifti(p)]


def hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listing(run_dir: Path, out: Path) -> set[str]:
    """Every path under the run folder except OUT's subtree."""
    return {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if out not in (p, *p.parents)}


def check_archive(before: dict, after: dict) -> list[Violation]:
    if before == after:
        return []
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [Violation("archive", f"{len(changed)} archive file(s) changed, added or removed: {changed[:3]}")]


def check_outside(before: set, after: set, tmp: Path) -> list[Violation]:
    new = sorted(after - before)
    leftover = sorted(p.name for p in tmp.rglob("*")) if tmp.is_dir() else []
    out = []
    if new:
        out.append(Violation("outside_out", f"{len(new)} path(s) appeared outside OUT: {new[:3]}"))
    if leftover:
        out.append(Violation("outside_out", f"left in TMPDIR: {leftover[:3]}"))
    return out


def _content(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError):
            return data
    return data


def check_phi(out: Path, texts: dict, needles: set) -> list[Violation]:
    """No needle (case-insensitive) in OUT's paths, OUT's file contents or the given texts."""
    lowered = sorted({n.lower() for n in needles if n})
    found = []

    def search(where: str, blob: bytes) -> None:
        for n in lowered:
            if n.encode("latin-1") in blob:
                found.append(f"{n!r} in {where}")

    if out.is_dir():
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            search(f"path {rel!r}", rel.lower().encode("utf-8", "replace"))
            if p.is_file():
                search(rel, _content(p).lower())
    for name, text in texts.items():
        search(name, text.lower().encode("utf-8", "replace"))
    return [Violation("phi", f"{len(found)} finding(s): {'; '.join(found[:3])}")] if found else []


def sidecars(out: Path) -> list[Path]:
    return [p for p in sorted(out.rglob("*.json"))
            if p.name != "report.json" and ".medimb-prep" not in p.parts]


def check_patient_position(out: Path, expected: str | None) -> list[Violation]:
    if not expected:
        return []
    bad = []
    for p in sidecars(out):
        try:
            got = json.loads(p.read_text()).get("PatientPosition")
        except (OSError, ValueError):
            continue
        if got != expected:
            bad.append(f"{p.name}: {got!r}")
    return [Violation("patient_position", f"PatientPosition is not {expected!r}: {bad[0]}")] if bad else []


def check_expectations(expect: tuple, proc: ProcessResult, report: dict | None, out: Path,
                       archive: Archive) -> list[Violation]:
    """The class-specific rules: 'converts' (exit 0 and a volume), 'rest_converts' (the same, when the
    mutation left some slices of the series untouched) and 'reported' (the mutated file is named in
    an issue, or its series failed)."""
    out_v = []
    volumes = list(out.rglob("*.nii.gz")) if out.is_dir() else []
    converted = proc.rc == 0 and bool(volumes)
    untouched = len(set(archive.slices) - set(archive.targets))
    if "converts" in expect and not converted:
        out_v.append(Violation("converts", f"the series did not convert (exit {proc.rc}, "
                                           f"{len(volumes)} volumes)"))
    if "rest_converts" in expect and untouched and not converted:
        out_v.append(Violation("rest_converts", f"the {untouched} untouched slice(s) did not convert "
                                                f"(exit {proc.rc}, {len(volumes)} volumes)"))
    if "reported" in expect and report is not None:
        issues = report.get("issues", [])
        named = {file_number(i["path"]) for i in issues if i.get("path")}
        series = [s for s in report.get("series") or [] if isinstance(s, dict)]
        series_failed = (any(not i.get("path") and i.get("action") == "failed" for i in issues)
                         or any(s.get("status") == "failed" for s in series))
        missing = [file_number(t) for t in archive.targets if file_number(t) not in named]
        if missing and not series_failed:
            reasons = sorted({i.get("reason") for i in issues})
            out_v.append(Violation("reported", f"mutated file(s) {missing} not in the report and no series "
                                               f"failed (reasons: {reasons}); {len(volumes)} volume(s)"))
    return out_v


def check_output_tree(out: Path, procs: dict, archive: Archive,
                      n_files: int) -> tuple[dict | None, list[Violation]]:
    """The checks on a finished OUT: report, accounting, NIfTI validity, PHI, PatientPosition."""
    report, v = load_report(out)
    if report is not None:
        v += check_accounting(report, n_files)
    v += check_outputs(out)
    v += check_phi(out, streams_of(procs), archive.phi_needles())
    v += check_patient_position(out, archive.source.patient_position)
    return report, v


# ------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One fuzz run: which mutation classes (in order) on which source, ``k`` files where allowed."""

    seed: int
    index: int
    mutations: tuple
    source: str
    k: int = 1

    @property
    def run_id(self) -> str:
        return f"{self.seed}:{self.index}"

    @property
    def label(self) -> str:
        k = f" k={self.k}" if self.k > 1 else ""
        return f"{'+'.join(self.mutations)}@{self.source}{k}"

    def rng(self) -> random.Random:
        return random.Random(f"medimb-fuzz:{self.seed}:{self.index}:{self.label}")


@dataclass
class RunResult:
    spec: RunSpec
    rc: int | None
    seconds: float
    violations: list
    reasons: dict = field(default_factory=dict)
    note: str = ""
    streams: dict = field(default_factory=dict)  # "<process> stdout|stderr" -> text (kept with --keep)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"run": self.spec.run_id, "mutations": list(self.spec.mutations), "source": self.spec.source,
                "k": self.spec.k, "rc": self.rc, "seconds": round(self.seconds, 2), "reasons": self.reasons,
                "note": self.note, "violations": [asdict(v) for v in self.violations]}


def build_archive(spec: RunSpec, sources: dict) -> Archive:
    """The source's files with the spec's mutations applied (byte-level damage last)."""
    archive = Archive.from_source(sources[spec.source])
    rng = spec.rng()
    for name in sorted(spec.mutations, key=lambda n: MUTATIONS[n].byte_level):
        MUTATIONS[name].apply(archive, rng, spec.k)
    return archive


def standard_run(run_dir: Path, archive: Archive, spec: RunSpec, limits: Limits) -> RunResult:
    """Write the archive, convert it once and check every oracle rule."""
    root, out, tmp = run_dir / "archive", run_dir / "out", run_dir / "tmp"
    archive.write(root)
    tmp.mkdir()
    hashes, before = hash_tree(root), listing(run_dir, out)
    proc = run_convert(root, out, run_dir, limits)
    v = check_process(proc)
    report, tree_v = check_output_tree(out, {"convert": proc}, archive, len(archive.files))
    v += tree_v
    v += check_archive(hashes, hash_tree(root))
    v += check_outside(before, listing(run_dir, out), tmp)
    if len(spec.mutations) == 1:
        v += check_expectations(MUTATIONS[spec.mutations[0]].expect, proc, report, out, archive)
    reasons = (report or {}).get("summary", {}).get("by_reason", {})
    return RunResult(spec, proc.rc, proc.seconds, v, reasons, streams=streams_of({"convert": proc}))


def streams_of(procs: dict) -> dict:
    """``{"<process> stdout": text, "<process> stderr": text, ...}`` of named process results."""
    return {f"{name} {stream}": getattr(p, stream)
            for name, p in procs.items() for stream in ("stdout", "stderr")}


def one_line_refusal(proc: ProcessResult, label: str) -> list[Violation]:
    """Exit 2 with exactly one non-empty line on stderr and no traceback."""
    v = [x for x in check_process(proc, allowed=(2,), label=label) if x.rule != "exit_status"]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.rc != 2 or len(lines) != 1:
        shown = (lines[-1] if lines else proc.stdout.strip().splitlines()[-1:] or [""])
        v.append(Violation("fault", f"{label}exit {proc.rc} with {len(lines)} stderr line(s), expected "
                                    f"exit 2 and one line: {str(shown)[:160]}"))
    return v


def fault_readonly_out(run_dir: Path, archive: Archive, spec: RunSpec, limits: Limits) -> RunResult:
    """OUT exists and is read-only: expect exit 2 and a one-line error, no traceback, archive intact."""
    root, out, tmp = run_dir / "archive", run_dir / "out", run_dir / "tmp"
    archive.write(root)
    tmp.mkdir()
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w')",
                                str(out / "probe")],
                               capture_output=True, preexec_fn=_child_setup(limits.memory_bytes, True))
        if probe.returncode == 0:
            (out / "probe").unlink()
            return RunResult(spec, None, 0.0, [], note="inconclusive: OUT is writable for the child")
        hashes, before = hash_tree(root), listing(run_dir, out)
        proc = run_convert(root, out, run_dir, limits, honour_permissions=True)
    finally:
        out.chmod(0o755)
    v = one_line_refusal(proc, "")
    v += check_phi(out, streams_of({"convert": proc}), archive.phi_needles())
    v += check_archive(hashes, hash_tree(root))
    v += check_outside(before, listing(run_dir, out), tmp)
    return RunResult(spec, proc.rc, proc.seconds, v, streams=streams_of({"convert": proc}))


def replicate_series(archive: Archive, copies: int) -> None:
    """Turn the archive's one series into ``copies`` series (folders ``series-<c>``, new series and
    instance UIDs), so that one convert runs long enough for a second one to start meanwhile."""
    files = {}
    for c in range(1, copies + 1):
        series_uid = generate_uid(entropy_srcs=["concurrent", str(c)])
        for path, data in archive.files.items():
            ds = read_dataset(data)
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 100 + c
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["concurrent", str(c), path])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            archive.needles |= {series_uid, str(ds.SOPInstanceUID)}
            files[f"series-{c}/{file_number(path)}_{ds.SOPInstanceUID}.dcm"] = write_dataset(ds)
    archive.files = files
    archive.slices = sorted(files)


def wait_for_first_output(out: Path, proc: subprocess.Popen, deadline: float) -> bool:
    """True as soon as OUT holds anything (a lock, a state folder) while ``proc`` still runs."""
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(out.iterdir()):
            return True
        time.sleep(0.005)
    return False


def fault_concurrent_same_out(run_dir: Path, archive: Archive, spec: RunSpec, limits: Limits) -> RunResult:
    """Two converts into the same OUT: the second must refuse with exit 2 and one line; the first
    must finish with a complete, valid report. To make the overlap certain, the first is paused
    (SIGSTOP) once it has put anything into OUT (its lock), the second runs to its end, then the first
    resumes (SIGCONT)."""
    replicate_series(archive, copies=3 if archive.source.real_data else 4)
    root, out, tmp = run_dir / "archive", run_dir / "out", run_dir / "tmp"
    archive.write(root)
    tmp.mkdir()
    hashes, before = hash_tree(root), listing(run_dir, out)
    first, t_first = start_convert(root, out, run_dir, limits)
    if wait_for_first_output(out, first, t_first + limits.timeout_s):
        time.sleep(0.1)  # let it finish taking the lock it has just created
    if first.poll() is not None:
        p1 = finish(first, t_first, limits)
        return RunResult(spec, p1.rc, p1.seconds, [], note="inconclusive: the first convert ended before "
                                                           "the second began")
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second, t_second = start_convert(root, out, run_dir, limits)
        p2 = finish(second, t_second, limits)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    p1 = finish(first, t_first, limits)
    v = check_process(p1, label="first convert: ")
    v += one_line_refusal(p2, "second convert: ")
    report, tree_v = check_output_tree(out, {"first": p1, "second": p2}, archive, len(archive.files))
    v += tree_v
    v += check_archive(hashes, hash_tree(root))
    v += check_outside(before, listing(run_dir, out), tmp)
    reasons = (report or {}).get("summary", {}).get("by_reason", {})
    return RunResult(spec, p1.rc, p1.seconds, v, reasons, streams=streams_of({"first": p1, "second": p2}))


register("fault_readonly_out", no_change, (STACK,) + GEOMETRY, fault=fault_readonly_out)
register("fault_concurrent_same_out", no_change, (SIEMENS, "mr2_j2kr"), fault=fault_concurrent_same_out)


def execute(spec: RunSpec, limits: Limits = Limits(), workdir: str | Path | None = None,
            keep: str | Path | None = None) -> RunResult:
    """Build the archive of ``spec``, run it and check the oracle. ``keep``: copy the run folder
    (archive, OUT, stdout/stderr) there when the run violates a rule."""
    sources = load_sources()
    run_dir = Path(tempfile.mkdtemp(prefix=f"fuzz-{spec.seed}-{spec.index}-", dir=workdir))
    try:
        archive = build_archive(spec, sources)
        fault = next((MUTATIONS[m].fault for m in spec.mutations if MUTATIONS[m].fault), None)
        result = (fault or standard_run)(run_dir, archive, spec, limits)
        result.note = "; ".join([n for n in [result.note] if n] + archive.notes)
        if keep and result.violations:
            dest = Path(keep) / f"run-{spec.seed}-{spec.index}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run_dir, dest, symlinks=True)
            (dest / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
            for name, text in result.streams.items():
                (dest / name.replace(" ", ".")).write_text(text)
        return result
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------- planning
def applicable(name: str, sources: dict) -> list[str]:
    return [s for s in dict.fromkeys(MUTATIONS[name].sources) if s in sources]


def plan_run(seed: int, index: int, sources: dict, mix_probability: float = 0.15) -> RunSpec:
    """The run ``index`` of ``seed``: a mutation class (uniform over those with an available source),
    a compatible source; sometimes more files (k) or a second/third class in the same archive."""
    rng = random.Random(f"medimb-fuzz-plan:{seed}:{index}")
    names = sorted(n for n in MUTATIONS if applicable(n, sources))
    first = rng.choice(names)
    source = rng.choice(applicable(first, sources))
    chosen = [first]
    if not MUTATIONS[first].fault and rng.random() < mix_probability:
        extra = [n for n in names if n != first and not MUTATIONS[n].fault and source in MUTATIONS[n].sources]
        chosen += rng.sample(extra, min(len(extra), rng.randint(1, 2)))
    multi = any(MUTATIONS[n].multi_file for n in chosen) and len(sources[source].files) > 1
    k = rng.randint(2, 3) if multi and rng.random() < 0.25 else 1
    return RunSpec(seed, index, tuple(chosen), source, k)


def plan_runs(n: int, seed: int, sources: dict | None = None) -> list[RunSpec]:
    sources = load_sources() if sources is None else sources
    return [plan_run(seed, i, sources) for i in range(n)]


REGRESSION_SEED = 11


def regression_case(name: str, sources: dict | None = None) -> RunSpec | None:
    """The fixed run for one mutation class on its regression source (None when that source is absent)."""
    sources = load_sources() if sources is None else sources
    source = MUTATIONS[name].regression_source
    return RunSpec(REGRESSION_SEED, 0, (name,), source) if source in sources else None


def format_violations(result: RunResult) -> str:
    lines = [f"run {result.spec.run_id} {result.spec.label}: exit {result.rc}, {result.seconds:.1f} s"]
    lines += [f"  [{v.rule}] {v.detail}" for v in result.violations]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- summary
def class_key(spec: RunSpec) -> str:
    return spec.mutations[0] if len(spec.mutations) == 1 else "(mixed archive)"


def summary_table(results: list[RunResult]) -> str:
    """Markdown: per mutation class, how many runs violate which rule, with the first detail."""
    by_class: dict[str, list[RunResult]] = {}
    for r in results:
        by_class.setdefault(class_key(r.spec), []).append(r)
    rows = ["| class | runs | failing | rule | runs | first detail (run) |", "|---|---|---|---|---|---|"]
    for name in sorted(by_class):
        runs = by_class[name]
        failing = sum(not r.ok for r in runs)
        first: dict[str, tuple[int, str]] = {}
        for r in runs:
            for rule in dict.fromkeys(v.rule for v in r.violations):
                detail = next(v.detail for v in r.violations if v.rule == rule)
                shown = f"{detail.splitlines()[0][:150]} ({r.spec.run_id}@{r.spec.source})"
                count, shown = first.get(rule, (0, shown))
                first[rule] = (count + 1, shown)
        if not first:
            rows.append(f"| {name} | {len(runs)} | 0 | - | - | - |")
        for i, (rule, (count, shown)) in enumerate(sorted(first.items())):
            lead = f"| {name} | {len(runs)} | {failing} " if i == 0 else "| | | "
            rows.append(f"{lead}| {rule} | {count} | {shown.replace('|', '/')} |")
    notes = [f"- {r.spec.run_id} {r.spec.label}: {r.note}" for r in results if r.note]
    return "\n".join(rows + ([""] + notes if notes else []))


def rule_totals(results: list[RunResult]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in results:
        for rule in dict.fromkeys(v.rule for v in r.violations):
            totals[rule] = totals.get(rule, 0) + 1
    return dict(sorted(totals.items()))


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mutations", "-n", type=int, default=100, help="number of runs (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", "-j", type=int, default=1, help="runs in parallel (default %(default)s)")
    p.add_argument("--out", help="folder for results.json and summary.md")
    p.add_argument("--keep", help="copy the run folder of every violating run here")
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds per convert")
    p.add_argument("--memory-gib", type=float, default=Limits.memory_bytes / 2**30,
                   help="address-space limit per convert")
    p.add_argument("--only", help="comma-separated mutation classes: plan runs only from these")
    p.add_argument("--replay", help="SEED:INDEX of one run to repeat")
    p.add_argument("--case", help="run the regression case of these classes (comma-separated, or 'all')")
    p.add_argument("--list", action="store_true", help="list the mutation classes and exit")
    p.add_argument("--code", help="checkout whose data_prep is tested (default: this repository)")
    return p.parse_args(argv)


def select_specs(args) -> list[RunSpec]:
    sources = load_sources()
    if args.replay:
        seed, index = (int(x) for x in args.replay.split(":"))
        return [plan_run(seed, index, sources)]
    if args.case:
        names = list(MUTATIONS) if args.case == "all" else args.case.split(",")
        specs = [regression_case(name, sources) for name in names]
        return [s for s in specs if s is not None]
    if args.only:
        wanted = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in wanted if n not in MUTATIONS]
        if unknown:
            sys.exit(f"unknown mutation class(es): {unknown}; see --list")
        rng = random.Random(f"medimb-fuzz-only:{args.seed}")
        specs = []
        for i in range(args.mutations):
            name = wanted[i % len(wanted)]
            specs.append(RunSpec(args.seed, i, (name,), rng.choice(applicable(name, sources))))
        return specs
    return plan_runs(args.mutations, args.seed, sources)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        sources = load_sources()
        for name, m in MUTATIONS.items():
            available = ", ".join(applicable(name, sources)) or "none available"
            print(f"{name:34s} {m.doc}  [sources: {available}]")
        return 0
    if args.code:
        global CODE_ROOT
        CODE_ROOT = Path(args.code).resolve()
    limits = Limits(timeout_s=args.timeout, memory_bytes=int(args.memory_gib * 2**30))
    specs = select_specs(args)
    print(f"{len(specs)} runs against {CODE_ROOT}, sources: {', '.join(load_sources())}; "
          f"limits {limits.timeout_s:.0f} s, {limits.memory_bytes / 2**30:.1f} GiB", flush=True)
    t0 = time.monotonic()
    results: list[RunResult] = []

    def one(spec: RunSpec) -> RunResult:
        try:
            result = execute(spec, limits, keep=args.keep)
        except Exception as exc:  # a bug of this harness must not end the campaign; it is reported as such
            result = RunResult(spec, None, 0.0, [Violation("harness", f"{type(exc).__name__}: {exc}")])
        rules = ",".join(dict.fromkeys(v.rule for v in result.violations)) or "ok"
        print(f"[{spec.run_id}] {spec.label}: exit {result.rc}, {result.seconds:.1f} s, {rules}"
              f"{' (' + result.note + ')' if result.note else ''}", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, specs))
    elapsed = time.monotonic() - t0
    table = summary_table(results)
    failing = sum(not r.ok for r in results)
    print(f"\n{len(results)} runs in {elapsed:.0f} s, {failing} violate the oracle; "
          f"by rule: {rule_totals(results)}\n")
    print(table)
    if len(results) == 1 and results[0].violations:
        print("\n" + format_violations(results[0]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")
        (out / "summary.md").write_text(
            f"# fuzz_prep: {len(results)} runs, seed {args.seed}, {elapsed:.0f} s, {failing} violating\n\n"
            f"Rule totals (runs): {rule_totals(results)}\n\n{table}\n")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
