"""Write one synthetic study as classic single-frame MR DICOM files (pydicom).

A study holds a DCE acquisition (pre-contrast first, then the post-contrast phases) and a 3-plane
localizer. The DCE phases are stored in one of two ways real scanners use, chosen per case:

- ``"single"``: one series holding every phase; each file carries TemporalPositionIdentifier
  (1 = pre-contrast), NumberOfTemporalPositions, TriggerTime (ms) and the phase's AcquisitionTime;
- ``"separate"``: one series per phase (consecutive SeriesNumbers, a description per phase, the
  phase's AcquisitionTime/SeriesTime, ContrastBolusAgent on post-contrast series).

Files get meaningless names and shuffled InstanceNumbers; pixel values are unsigned 16-bit, on
some scanners with a RescaleSlope/Intercept (real value = stored * slope + intercept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from scipy import ndimage

from data_prep.headers import SYNTH_MARK
from data_prep.synth.geometry import SeriesGeometry, make_geometry
from data_prep.synth.identity import PatientIdentity, dicom_time
from data_prep.synth.phantom import Case

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_UNIQUE = {"SOPInstanceUID", "PixelData"}  # never repeat: not worth caching
GROUP_LENGTH = Tag(0x0002, 0x0000)  # FileMetaInformationGroupLength
MEDIA_INSTANCE = Tag(0x0002, 0x0003)  # MediaStorageSOPInstanceUID
CONTRAST_AGENT = "Gadobutrol 1.0 mmol/ml"


@dataclass(frozen=True)
class StudyStyle:
    """How a case's study is stored (drawn per case, recorded in the truth table)."""

    dce_storage: str  # "single" or "separate"
    manufacturer: str
    model: str
    field_strength: float
    single_description: str
    phase_stem: str
    localizer_description: str
    rescale: tuple[float, float] | None  # (slope, intercept) or None
    hex_names: bool  # random hex file names instead of IM000123


class UidFactory:
    """Deterministic UIDs: the same seed and names always give the same UID."""

    def __init__(self, *entropy: object):
        self.entropy = [str(e) for e in entropy]

    def __call__(self, *names: object) -> str:
        return generate_uid(entropy_srcs=self.entropy + [str(n) for n in names])


def _quantise(values: np.ndarray, rescale: tuple[float, float] | None) -> np.ndarray:
    """Real-valued signal -> stored uint16 (inverse of slope/intercept), rounded and clipped."""
    slope, intercept = rescale or (1.0, 0.0)
    return np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16)


def _file_names(rng: np.random.Generator, count: int, hex_names: bool) -> list[str]:
    if hex_names:
        return [f"{int(v):016X}" for v in rng.integers(0, 2**63 - 1, size=count, dtype=np.int64)]
    start = int(rng.integers(1, 900_000))
    return [f"IM{start + i:06d}" for i in rng.permutation(count)]


def _folder_name(rng: np.random.Generator, prefix: str) -> str:
    return f"{prefix}{int(rng.integers(0, 16**6)):06X}"


def _new_buffer() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False  # Explicit VR Little Endian
    return fp


def _element_bytes(element) -> bytes:
    fp = _new_buffer()
    write_data_element(fp, element)
    return fp.getvalue()


class SeriesEncoder:
    """Encodes the files of one series with pydicom, encoding the elements shared by all its files
    only once (writing a whole dataset per slice made pydicom the bottleneck of synthesis).

    :meth:`encode` gives the same bytes as ``pydicom.dcmwrite(path, shared + varying,
    enforce_file_format=True)`` (a test checks this).
    """

    def __init__(self, shared: Dataset):
        meta = FileMetaDataset(shared.file_meta)
        meta.MediaStorageSOPInstanceUID = "1.2"  # placeholder; replaced per file
        fp = _new_buffer()
        write_file_meta_info(fp, meta, enforce_standard=True)  # adds version and implementation tags
        self.meta = {element.tag: _element_bytes(element) for element in meta if element.tag != GROUP_LENGTH}
        self.shared = {element.tag: _element_bytes(element) for element in shared}
        self._memo: dict[tuple, bytes] = {}

    def element(self, keyword: str, value) -> bytes:
        """Encoded element; values repeated across files (positions, phase times) are encoded once."""
        key = (keyword, value)
        cached = self._memo.get(key) if keyword not in _UNIQUE else None
        if cached is None:
            tag = tag_for_keyword(keyword)
            vr = "OW" if keyword == "PixelData" else dictionary_VR(tag)  # OW: BitsAllocated is 16
            cached = _element_bytes(DataElement(tag, vr, list(value) if isinstance(value, tuple) else value))
            if keyword not in _UNIQUE:
                self._memo[key] = cached
        return cached

    def encode(self, varying: dict) -> bytes:
        """One file: the shared elements plus ``varying`` (``{keyword: value}``, hashable values,
        tuples for multi-valued elements; must hold SOPInstanceUID)."""
        meta = dict(self.meta)
        meta[MEDIA_INSTANCE] = _element_bytes(DataElement(MEDIA_INSTANCE, "UI", varying["SOPInstanceUID"]))
        meta_body = b"".join(meta[tag] for tag in sorted(meta))
        group_length = _element_bytes(DataElement(GROUP_LENGTH, "UL", len(meta_body)))
        chunks = dict(self.shared)
        chunks.update({Tag(tag_for_keyword(k)): self.element(k, v) for k, v in varying.items()})
        body = b"".join(chunks[tag] for tag in sorted(chunks))
        return b"\x00" * 128 + b"DICM" + group_length + meta_body + body


class StudyWriter:
    """Writes the DICOM files of one case under ``patient_dir/<study>/<series>/``."""

    def __init__(self, case: Case, identity: PatientIdentity, style: StudyStyle, uids: UidFactory,
                 rng: np.random.Generator, patient_dir: Path):
        self.case, self.identity, self.style, self.uid, self.rng = case, identity, style, uids, rng
        self.study_dir = patient_dir / _folder_name(rng, "ST")
        self.study_uid = uids("study")
        self.frame_uid = uids("frame-of-reference")
        self.injection_s = identity.study_time_s + 240.0  # localizer and pre-contrast come first
        self.station = f"MR{int(rng.integers(1, 9))}"
        self.study_id = str(int(rng.integers(1000, 99999)))
        self.series_written: list[dict] = []

    # ----- shared header parts
    def _base(self, series_uid: str, series_number: int, description: str, image_type: list[str],
              series_time_s: float) -> Dataset:
        ident, style = self.identity, self.style
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = SYNTH_MARK  # lets medimb-prep recognise invented identities
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = image_type
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
        ds.StudyTime = dicom_time(ident.study_time_s)
        ds.SeriesTime = dicom_time(series_time_s)
        ds.AccessionNumber = ident.accession
        ds.Modality = "MR"
        ds.Manufacturer = style.manufacturer
        ds.InstitutionName = ident.institution
        ds.ReferringPhysicianName = ident.referring_physician
        ds.StationName = self.station
        ds.StudyDescription = "MR BREAST BILATERAL W/WO CONTRAST"
        ds.SeriesDescription = description
        ds.ManufacturerModelName = style.model
        ds.PatientName = ident.name
        ds.PatientID = ident.patient_id
        ds.PatientBirthDate = ident.birth_date
        ds.PatientSex = "F"
        ds.PatientAge = f"{ident.age_years:03d}Y"
        ds.BodyPartExamined = "BREAST"
        ds.MagneticFieldStrength = style.field_strength
        ds.PatientPosition = "HFP"  # breast MRI is acquired prone
        ds.StudyInstanceUID = self.study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = self.study_id
        ds.SeriesNumber = series_number
        ds.FrameOfReferenceUID = self.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.PixelRepresentation = 0
        return ds

    def _write_slices(self, ds: Dataset, folder: Path, geometry: SeriesGeometry, images: list[np.ndarray],
                      positions: list[list[float]], orientations: list[list[float]], per_file: list[dict],
                      rescale: tuple[float, float] | None) -> list[Path]:
        """Write one file per 2D image (``(rows, cols)`` float arrays): ``ds`` holds the elements all
        files share, ``per_file`` the extra elements of each file."""
        folder.mkdir(parents=True, exist_ok=True)
        names = _file_names(self.rng, len(images), self.style.hex_names)
        instance_numbers = self.rng.permutation(len(images)) + 1  # shuffled on purpose
        stored = [_quantise(img, rescale) for img in images]
        top = max(int(s.max()) for s in stored)
        ds.BitsStored = 12 if top < 4096 else 16
        ds.HighBit = ds.BitsStored - 1
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
            ds.RescaleType = "US"
        ds.Rows, ds.Columns = stored[0].shape
        ds.WindowCenter, ds.WindowWidth = int(top // 2), int(top)
        encoder = SeriesEncoder(ds)
        paths = []
        for n, (pixels, ipp, iop, extra) in enumerate(zip(stored, positions, orientations, per_file)):
            normal = np.cross(iop[:3], iop[3:])
            varying = {
                "SOPInstanceUID": self.uid(ds.SeriesInstanceUID, n),
                "InstanceNumber": int(instance_numbers[n]),
                "ImagePositionPatient": tuple(f"{v:.4f}" for v in ipp),
                "ImageOrientationPatient": tuple(f"{v:.6f}" for v in iop),
                "SliceLocation": f"{float(np.dot(ipp, normal)):.4f}",
                **extra,
                "PixelData": pixels.tobytes(),
            }
            path = folder / names[n]
            path.write_bytes(encoder.encode(varying))
            paths.append(path)
        return paths

    def _mr_acquisition(self, ds: Dataset, geometry: SeriesGeometry, three_d: bool) -> None:
        dy, dx = geometry.pixel_spacing
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = ["SP", "SS"] if three_d else ["SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D" if three_d else "2D"
        ds.SliceThickness = f"{geometry.slice_step:g}"
        ds.RepetitionTime = f"{self.rng.uniform(4.0, 6.0):.2f}" if three_d else "8.6"
        ds.EchoTime = f"{self.rng.uniform(1.6, 2.6):.2f}" if three_d else "4.0"
        ds.NumberOfAverages = 1
        ds.ImagingFrequency = f"{42.577478 * self.style.field_strength:.6f}"
        ds.EchoNumbers = 1
        ds.EchoTrainLength = 1
        ds.FlipAngle = 10 if three_d else 20
        if three_d:
            ds.SpacingBetweenSlices = f"{geometry.slice_step:g}"
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]

    # ----- the series
    def write_dce(self, first_series_number: int) -> None:
        case, style, geometry = self.case, self.style, self.case.geometry
        n_phases, n_slices = case.phases.shape[0], geometry.shape[0]
        acq_times = [self.injection_s + t if t > 0 else self.injection_s - 75.0 for t in case.phase_times_s]
        slice_order = self.rng.permutation(n_slices)  # so file order says nothing about position
        positions = [geometry.slice_position(int(k)) for k in slice_order]
        orientation = geometry.image_orientation
        if style.dce_storage == "single":
            uid = self.uid("dce")
            ds = self._base(uid, first_series_number, style.single_description,
                            ["ORIGINAL", "PRIMARY", "M", "ND"], acq_times[0])
            self._mr_acquisition(ds, geometry, three_d=True)
            ds.NumberOfTemporalPositions = n_phases
            ds.ContrastBolusAgent = CONTRAST_AGENT
            ds.ContrastBolusStartTime = dicom_time(self.injection_s)
            images, per_file, all_positions = [], [], []
            for p in range(n_phases):
                for k, pos in zip(slice_order, positions):
                    images.append(case.phases[p, int(k)])
                    all_positions.append(pos)
                    per_file.append({
                        "TemporalPositionIdentifier": p + 1,
                        "TriggerTime": f"{1000 * case.phase_times_s[p]:.0f}",
                        "AcquisitionTime": dicom_time(acq_times[p]),
                        "ContentTime": dicom_time(acq_times[p]),
                        "AcquisitionNumber": p + 1,
                    })
            folder = self.study_dir / _folder_name(self.rng, "SE")
            self._write_slices(ds, folder, geometry, images, all_positions,
                               [orientation] * len(images), per_file, style.rescale)
            self.series_written.append({"kind": "dce", "phases": n_phases, "files": len(images)})
            return
        for p in range(n_phases):
            description = f"{style.phase_stem}_pre" if p == 0 else f"{style.phase_stem}_post{p}"
            ds = self._base(self.uid("dce", p), first_series_number + p, description,
                            ["ORIGINAL", "PRIMARY", "M", "ND"], acq_times[p])
            self._mr_acquisition(ds, geometry, three_d=True)
            if p > 0:
                ds.ContrastBolusAgent = CONTRAST_AGENT
                ds.ContrastBolusStartTime = dicom_time(self.injection_s)
            per_file = [{"AcquisitionTime": dicom_time(acq_times[p]), "ContentTime": dicom_time(acq_times[p]),
                         "AcquisitionNumber": 1}] * n_slices
            images = [case.phases[p, int(k)] for k in slice_order]
            folder = self.study_dir / _folder_name(self.rng, "SE")
            self._write_slices(ds, folder, geometry, images, positions, [orientation] * n_slices, per_file,
                               style.rescale)
            self.series_written.append({"kind": "dce_phase", "phase": p, "files": n_slices})

    def write_localizer(self, series_number: int) -> None:
        """Three orthogonal planes (axial, sagittal, coronal) through the DCE field of view, one
        series, ImageType LOCALIZER, resampled from the pre-contrast phantom."""
        dce = self.case.geometry
        centre = dce.affine_lps() @ np.append((np.array(dce.shape[::-1]) - 1) / 2, 1.0)
        n = dce.shape[1]
        spacing = 1.8 * dce.pixel_spacing[0]
        # rotations whose columns are (row direction, column direction, normal) in LPS
        planes = {"axial": np.eye(3),
                  "sagittal": np.column_stack([[0, 1, 0], [0, 0, -1], [-1, 0, 0]]),
                  "coronal": np.column_stack([[1, 0, 0], [0, 0, -1], [0, 1, 0]])}
        to_voxel = np.linalg.inv(dce.affine_lps())
        images, positions, orientations = [], [], []
        for rotation in planes.values():
            plane = make_geometry((1, n, n), (spacing, spacing), 8.0, centre[:3], rotation)
            ij = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="xy"), axis=-1)  # (rows, cols, 2)
            world = plane.affine_lps() @ np.stack(
                [ij[..., 0].ravel(), ij[..., 1].ravel(), np.zeros(n * n), np.ones(n * n)])
            ijk = (to_voxel @ world)[:3]
            sample = ndimage.map_coordinates(self.case.phases[0], ijk[::-1], order=1, cval=0.0)
            images.append(sample.reshape(n, n) + self.rng.normal(0, 5.0, (n, n)).clip(0))
            positions.append(plane.slice_position(0))
            orientations.append(plane.image_orientation)
        ds = self._base(self.uid("localizer"), series_number, self.style.localizer_description,
                        ["ORIGINAL", "PRIMARY", "LOCALIZER"], self.identity.study_time_s + 30.0)
        self._mr_acquisition(ds, make_geometry((1, n, n), (spacing, spacing), 8.0, centre[:3]), three_d=False)
        per_file = [{"AcquisitionTime": dicom_time(self.identity.study_time_s + 30.0)}] * 3
        self._write_slices(ds, self.study_dir / _folder_name(self.rng, "SE"), dce, images, positions,
                           orientations, per_file, None)
        self.series_written.append({"kind": "localizer", "files": 3})
