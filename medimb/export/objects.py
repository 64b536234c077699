"""A case's attention map and region as DICOM objects next to their source series (highdicom).

- the map -> **Parametric Map** (float32 frames, the map's own values; real-world value mapping identity,
  0-1, unit "no units", quantity DCM 130404 "Saliency"),
- the region (map >= the region threshold) -> **Segmentation** (BINARY, one segment: category SCT 309825002
  "Spatial and Relational Concept", type DCM 130488 "Region in Space", automatic, algorithm medimb + version
  + method),

each with one frame per source frame (a single-frame instance, or a frame of a multi-frame one), in the
source order: highdicom takes the frames' positions, orientation and pixel spacing from the source instances
(given explicitly for multi-frame sources) and copies the patient, study and frame of reference. Both carry
the source patient's identity: they go back to the PACS next to the original.

UIDs are derived from the content (``2.25.<name-based UUID>``: a UUID version 5 of the source series, method,
the frames' SHA-256 and the prediction, ISO/IEC 9834-8), so writing or pushing the same result twice gives the same SOP Instance UIDs (a server keeps one copy) and a different result
(another model, threshold, map) gets new ones instead of silently overwriting a stored instance.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import numpy as np

from medimb import __version__

from .sources import SourceSeries

MANUFACTURER = "medimb"
#: series numbers of the results: a high range, away from a scanner's own (method index added)
SERIES_NUMBER = {"pm": 9100, "seg": 9200}
LO_MAX = 64  # DICOM LO: SeriesDescription, ContentDescription, SegmentLabel


@dataclass(frozen=True)
class Prediction:
    """A case's prediction as predictions.csv gives it: the predicted class name, its probability and the
    binary decision threshold (None for multi-class models: the argmax)."""

    class_name: str
    probability: float
    threshold: float | None = None

    def short(self) -> str:
        """``"malignant p=0.87 thr 0.146"``: the prediction in a few characters (series descriptions)."""
        text = f"{self.class_name} p={self.probability:.2f}"
        return text if self.threshold is None else f"{text} thr {self.threshold:.3g}"


@dataclass(frozen=True)
class ResultUIDs:
    series: str
    instance: str


def _lo(text: str) -> str:
    """A value that fits a DICOM LO (64 characters, no backslash)."""
    text = text.replace("\\", "/")
    return text if len(text) <= LO_MAX else text[: LO_MAX - 3] + "..."


def content_digest(source: SourceSeries, method: str, prediction: Prediction, *arrays: np.ndarray) -> str:
    """SHA-256 of what a result says: source instances, method, prediction and the frames' bytes."""
    h = hashlib.sha256()
    for part in (source.series_uid, *source.sop_uids, method, repr(prediction)):
        h.update(part.encode() + b"\0")
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def result_uids(kind: str, source: SourceSeries, method: str, digest: str) -> ResultUIDs:
    """Deterministic Series and SOP Instance UIDs of one result object (``kind`` ``"pm"`` or ``"seg"``)."""
    base = "|".join(["medimb", kind, source.series_uid, method, digest])
    return ResultUIDs(series=_uuid_uid(base + "|series"), instance=_uuid_uid(base + "|instance"))


#: namespace of medimb's name-based UUIDs (a fixed random UUID: the same UIDs on every machine)
UID_NAMESPACE = uuid.UUID("5b0f8a1e-4c1d-4f57-9a59-7d2f3c0b6e21")


def _uuid_uid(name: str) -> str:
    """``2.25.<decimal UUID>``, the UUID a version-5 (SHA-1, name-based) UUID of ``name``: reproducible."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def parametric_map_uids(source: SourceSeries, frames: np.ndarray, method: str, prediction: Prediction) -> ResultUIDs:
    """The UIDs :func:`build_parametric_map` gives these frames (known before building: a re-run can skip)."""
    frames = np.ascontiguousarray(frames, dtype=np.float32)
    return result_uids("pm", source, method, content_digest(source, method, prediction, frames))


def segmentation_uids(source: SourceSeries, mask: np.ndarray, method: str, prediction: Prediction,
                      region_threshold: float) -> ResultUIDs:
    """The UIDs :func:`build_segmentation` gives this mask."""
    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    digest = content_digest(source, method, prediction, mask, np.float64(region_threshold))
    return result_uids("seg", source, method, digest)


def series_number(kind: str, method: str) -> int:
    from medimb.explain.settings import EXPLAINER_NAMES

    return SERIES_NUMBER[kind] + (EXPLAINER_NAMES.index(method) if method in EXPLAINER_NAMES else 9)


def build_parametric_map(source: SourceSeries, frames: np.ndarray, method: str, prediction: Prediction):
    """``highdicom.pm.ParametricMap`` of ``frames`` ``(N, rows, cols)`` float32 (frame n on
    ``source.frames[n]``), values as given (maps are in [0, 1])."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames = np.ascontiguousarray(frames, dtype=np.float32)
    _check_frames(source, frames)
    uids = parametric_map_uids(source, frames, method, prediction)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=method.upper()[:16], lut_explanation=f"medimb {method} attention map, 0-1",
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
        quantity_definition=codes.DCM.Saliency)
    pm = hd.pm.ParametricMap(
        source_images=source.datasets, pixel_array=frames,
        series_instance_uid=uids.series, series_number=series_number("pm", method),
        sop_instance_uid=uids.instance, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=f"medimb {method}", software_versions=__version__,
        device_serial_number="none", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label=method.upper()[:16],
        content_description=_lo(f"{method} attention 0-1; predicted {prediction.short()}"),
        **_plane_geometry(source),
    )
    pm.SeriesDescription = _lo(f"medimb {method} map: {prediction.short()}")
    return pm


def build_segmentation(source: SourceSeries, mask: np.ndarray, method: str, prediction: Prediction,
                       region_threshold: float):
    """``highdicom.seg.Segmentation`` (BINARY, one segment, every frame kept) of ``mask`` ``(N, rows, cols)``
    (frame n on ``source.frames[n]``): the map's region ``map >= region_threshold``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    mask = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
    _check_frames(source, mask)
    uids = segmentation_uids(source, mask, method, prediction, region_threshold)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medimb {method}", version=__version__, family=codes.cid7162.ArtificialIntelligence,
        parameters={"region": f"map >= {region_threshold:g}"})
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=_lo(f"{method} map >= {region_threshold:g}"),
        segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.RegionInSpace,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    seg = hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=uids.series, series_number=series_number("seg", method),
        sop_instance_uid=uids.instance, instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=f"medimb {method}", software_versions=__version__,
        device_serial_number="none", omit_empty_frames=False,
        content_label=f"{method.upper()}_REGION"[:16],
        content_description=_lo(f"{method} map >= {region_threshold:g}; predicted {prediction.short()}"),
        **_plane_geometry(source),
    )
    seg.SeriesDescription = _lo(f"medimb {method} region: {prediction.short()}")
    return seg


def _check_frames(source: SourceSeries, frames: np.ndarray) -> None:
    rows, cols = source.frames[0].shape
    if frames.shape != (len(source.frames), rows, cols):
        raise ValueError(f"frames {frames.shape} for {len(source.frames)} source frames of {rows}x{cols}")


def _plane_geometry(source: SourceSeries) -> dict:
    """highdicom's explicit plane arguments for frames of multi-frame sources (it takes single-frame sources'
    geometry from the instances themselves, one frame per instance); it matches each result frame to its
    source frame by position (per-frame ReferencedFrameNumber)."""
    if not source.multiframe:
        return {}
    import highdicom as hd

    patient, first = hd.CoordinateSystemNames.PATIENT, source.frames[0]
    return {
        "plane_positions": [hd.PlanePositionSequence(patient, [float(v) for v in f.position]) for f in source.frames],
        "plane_orientation": hd.PlaneOrientationSequence(patient, [float(v) for v in first.orientation]),
        "pixel_measures": hd.PixelMeasuresSequence(pixel_spacing=list(first.spacing),
                                                   slice_thickness=first.thickness or source.step,
                                                   spacing_between_slices=source.step),
    }
