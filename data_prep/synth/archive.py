"""Synthesise a whole DICOM archive with labels and ground truth: the project's demo input, test
fixture and localisation benchmark data.

Layout written under ``out_dir`` (see docs/synthetic_archive.md)::

    archive/<patient>/<study>/<series>/<file>   DICOM, meaningless names, plus junk entries
    labels.csv                                  case,label  (case = the converter's subject pseudonym)
    truth/<case>_lesion.nii.gz                  lesion mask on the DCE series' grid, affine to RAS mm
    truth/cases.csv                             per-case lesion centre (RAS mm), type, storage style
    synth.json                                  parameters and counts (no PHI)

Everything is drawn from ``numpy.random.default_rng([seed, case, ...])``, so a seed always gives the
same archive, byte for byte, and case ``i`` does not depend on how many cases are asked for.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from tqdm import tqdm

from data_prep import __version__
from data_prep.deid import pseudonymize
from data_prep.synth.dicom_writer import StudyStyle, StudyWriter, UidFactory
from data_prep.synth.geometry import SeriesGeometry
from data_prep.synth.identity import SCANNERS, PatientIdentity, draw_identity
from data_prep.synth.phantom import Case, PhantomConfig, synthesize_case

MARKER = "synth.json"  # marks a folder as written by synthesize_archive (so --force may replace it)
CASES_COLUMNS = (
    "case", "label", "lesion_type", "lesion_kinetics", "centre_x_mm", "centre_y_mm", "centre_z_mm",
    "radius_mm", "lesion_voxels", "dce_storage", "phases", "phase_times_s", "oblique", "slices", "rows",
    "columns", "spacing_mm", "manufacturer", "vessels", "foci",
)
#: cases.csv columns added by ``--lesions multifocal`` (absent otherwise, so default archives read as before):
#: the number of lesion foci and each focus centre in RAS mm (``x y z`` triples separated by ``;``)
MULTIFOCAL_COLUMNS = ("lesion_foci", "focus_centres_mm")
# the RNG streams of one case, so adding a draw to one part does not change the others
_PHANTOM, _IDENTITY, _STYLE, _WRITER = range(4)


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`synthesize_archive` wrote."""

    out_dir: str
    cases: int
    positives: int
    series: int
    dicom_files: int
    seconds: float


def lesion_mask_image(mask_zyx: np.ndarray, geometry: SeriesGeometry) -> nib.Nifti1Image:
    """A lesion mask ``(Z, Y, X)`` as a uint8 NIfTI image on the DCE series' own voxel grid.

    Axes ``(i, j, k)`` = (column, row, slice in ascending order along the slice normal), affine to
    RAS mm (``RAS = diag(-1, -1, 1) @ LPS``): the same grid and affine as the volumes
    ``medimb-prep convert`` writes for that series, so mask and image overlay voxel for voxel.
    """
    affine = geometry.affine_ras()
    image = nib.Nifti1Image(np.ascontiguousarray(mask_zyx.transpose(2, 1, 0)).astype(np.uint8), affine)
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    return image


def draw_style(rng: np.random.Generator, case_index: int) -> StudyStyle:
    """How case ``case_index`` is stored; the first two cases cover both DCE storage layouts so even
    a two-case archive exercises them."""
    manufacturer, model, field, single, stem, localizer, rescaled = SCANNERS[int(rng.integers(len(SCANNERS)))]
    storage = ("single", "separate")[case_index] if case_index < 2 else str(rng.choice(["single", "separate"]))
    rescale = None
    if rescaled or case_index == 1:
        rescale = (float(rng.choice([0.5, 1.25, 2.0, 2.5])), float(rng.choice([0.0, -50.0])))
    return StudyStyle(
        dce_storage=storage, manufacturer=manufacturer, model=model, field_strength=field,
        single_description=single, phase_stem=stem, localizer_description=localizer, rescale=rescale,
        hex_names=bool(rng.random() < 0.5),
    )


def _case_row(case_key: str, case: Case, style: StudyStyle, lesions: str = "single") -> dict:
    """One cases.csv row; ``centre_*_mm`` is the centre of mass of the whole mask (of a multifocal lesion:
    of all its foci together, which may lie between them)."""
    centre = case.lesion_centre_ras
    g = case.geometry
    row = {
        "case": case_key,
        "label": case.label,
        "lesion_type": case.lesion_type,
        "lesion_kinetics": case.lesion_kinetics,
        "centre_x_mm": "" if centre is None else f"{centre[0]:.3f}",
        "centre_y_mm": "" if centre is None else f"{centre[1]:.3f}",
        "centre_z_mm": "" if centre is None else f"{centre[2]:.3f}",
        "radius_mm": f"{case.lesion_radius_mm:.2f}",
        "lesion_voxels": int(case.lesion_mask.sum()),
        "dce_storage": style.dce_storage,
        "phases": len(case.phase_times_s),
        "phase_times_s": ";".join(f"{t:.1f}" for t in case.phase_times_s),
        "oblique": int(g.is_oblique),
        "slices": g.shape[0],
        "rows": g.shape[1],
        "columns": g.shape[2],
        "spacing_mm": "x".join(f"{s:g}" for s in (g.pixel_spacing[1], g.pixel_spacing[0], g.slice_step)),
        "manufacturer": style.manufacturer,
    }
    row.update(case.extras)
    if lesions != "single":
        row["lesion_foci"] = len(case.focus_centres_zyx)
        row["focus_centres_mm"] = ";".join(
            " ".join(f"{v:.3f}" for v in g.zyx_to_ras(c)) for c in case.focus_centres_zyx)
    return row


def _csv_text(rows: list[dict], columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_junk(archive: Path, first_file: Path, rng: np.random.Generator) -> list[str]:
    """What real exports also contain: a text file, a DICOMDIR and a truncated DICOM file."""
    (archive / "README.txt").write_text(
        "Exported from PACS by the imaging helpdesk.\nCD burned with viewer; see DICOMDIR.\n", encoding="utf-8")
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"  # Media Storage Directory
    dicomdir.file_meta.MediaStorageSOPInstanceUID = UidFactory("dicomdir")(int(rng.integers(1 << 30)))
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dicomdir.FileSetID = "PACS_EXPORT"
    dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = []
    dicomdir.save_as(archive / "DICOMDIR", enforce_file_format=True)
    # a copy of a real file cut inside its header, as left by an interrupted copy
    data = first_file.read_bytes()
    truncated_dir = first_file.parent.parent / f"SE{int(rng.integers(0, 16**6)):06X}"
    truncated_dir.mkdir()
    truncated = truncated_dir / f"IM{int(rng.integers(0, 10**6)):06d}"
    truncated.write_bytes(data[: min(len(data) // 2, 600)])
    return [str(p.relative_to(archive.parent)) for p in (archive / "README.txt", archive / "DICOMDIR", truncated)]


def _prepare_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty folder unless ``force`` and it is an earlier synthetic archive."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"{out_dir} is not empty; choose an empty folder or pass --force")
        if not (out_dir / MARKER).is_file():
            raise FileExistsError(
                f"{out_dir} is not empty and was not written by `medimb-prep synth` (no {MARKER}); "
                "refusing to delete it even with --force")


def synthesize_archive(
    out_dir: str | os.PathLike,
    cases: int = 40,
    positive_fraction: float = 0.2,
    seed: int = 0,
    config: PhantomConfig = PhantomConfig(),
    deid_key: str | None = None,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> ArchiveSummary:
    """Write a synthetic breast DCE-MRI DICOM archive with labels and lesion masks to ``out_dir``.

    ``round(cases * positive_fraction)`` cases are malignant (label 1). Case keys are
    ``data_prep.deid.pseudonymize(PatientID, deid_key)``, the subject names the converter uses with
    the same key. The folder is built beside ``out_dir`` and renamed into place at the end, so an
    interrupted run leaves nothing under ``out_dir``.
    """
    if cases < 1:
        raise ValueError(f"--cases must be at least 1, got {cases}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"--positive-fraction must be in [0, 1], got {positive_fraction}")
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    _prepare_out_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        summary = _write_archive(tmp, cases, positive_fraction, seed, config, deid_key, progress, workers)
        _prepare_out_dir(out_dir, force)  # nothing appeared meanwhile
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ArchiveSummary(out_dir=str(out_dir), seconds=round(time.perf_counter() - started, 2), **summary)


def _write_case(task: tuple) -> tuple[dict, dict, int, int, Path]:
    """Synthesise and write case ``i`` (runs in a worker process when ``workers > 1``).

    Returns (labels row, cases.csv row, series written, files written, the study's first file)."""
    archive, truth, i, label, seed, config, deid_key = task
    with pydicom.config.disable_value_validation():  # our own values are valid by construction
        identity: PatientIdentity = draw_identity(np.random.default_rng([seed, i, _IDENTITY]), i)
        style = draw_style(np.random.default_rng([seed, i, _STYLE]), i)
        oblique = (False, True)[i] if i < 2 else None  # the first two cases: one straight, one oblique
        case = synthesize_case(np.random.default_rng([seed, i, _PHANTOM]), label, config, oblique)
        writer_rng = np.random.default_rng([seed, i, _WRITER])
        patient_dir = archive / f"{int(writer_rng.integers(0, 16**8)):08X}"
        writer = StudyWriter(case, identity, style, UidFactory("medimb-synth", seed, i), writer_rng, patient_dir)
        writer.write_localizer(series_number=1)
        writer.write_dce(first_series_number=3)
    key = pseudonymize(identity.patient_id, deid_key)
    nib.save(lesion_mask_image(case.lesion_mask, case.geometry), truth / f"{key}_lesion.nii.gz")
    first_file = min(p for p in writer.study_dir.rglob("*") if p.is_file())
    return ({"case": key, "label": case.label}, _case_row(key, case, style, config.lesions), len(writer.series_written),
            sum(s["files"] for s in writer.series_written), first_file)


def _write_archive(root: Path, cases: int, positive_fraction: float, seed: int, config: PhantomConfig,
                   deid_key: str | None, progress: bool, workers: int) -> dict:
    archive, truth = root / "archive", root / "truth"
    truth.mkdir(parents=True)
    archive.mkdir()
    n_positive = int(round(cases * positive_fraction))
    positives = set(np.random.default_rng([seed]).permutation(cases)[:n_positive].tolist())
    tasks = [(archive, truth, i, int(i in positives), seed, config, deid_key) for i in range(cases)]
    bar = tqdm(total=cases, desc="synth", unit="case", disable=not progress)
    results = []
    if workers > 1 and cases > 1:
        with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
            for result in pool.map(_write_case, tasks):  # in case order: outputs do not depend on workers
                results.append(result)
                bar.update()
    else:
        for task in tasks:
            results.append(_write_case(task))
            bar.update()
    bar.close()
    labels = [r[0] for r in results]
    case_rows = [r[1] for r in results]
    series = sum(r[2] for r in results)
    files = sum(r[3] for r in results)
    first_file = results[0][4]
    junk = _write_junk(archive, first_file, np.random.default_rng([seed, cases, 9]))
    (root / "labels.csv").write_text(_csv_text(labels, ("case", "label")), encoding="utf-8")
    columns = CASES_COLUMNS + (MULTIFOCAL_COLUMNS if config.lesions != "single" else ())
    (truth / "cases.csv").write_text(_csv_text(case_rows, columns), encoding="utf-8")
    summary = {"cases": cases, "positives": n_positive, "series": series, "dicom_files": files}
    parameters = asdict(config)
    if config.lesions == "single":  # the default, as before the option existed: default archives stay unchanged
        del parameters["lesions"]
    manifest = {
        "generator": f"medimb-prep synth {__version__}",
        "parameters": {"cases": cases, "positive_fraction": positive_fraction, "seed": seed,
                       "custom_deid_key": deid_key is not None, **parameters},
        **summary,
        "junk": junk,
    }
    (root / MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return summary
