"""A case's prediction as a DICOM Structured Report (highdicom ``Comprehensive3DSR``, TID 1500 Measurement Report).

Content tree (all values machine-readable, next to the human-readable series descriptions):

- observer: the device "medimb" (its version);
- one image-level group "medimb classification": finding type = the predicted class, measurements
  DCM 122157 "Probability" (of that class, unit "no units") and, for binary models, DCM 122411 "Threshold Value"
  (the decision threshold);
- per method one volumetric ROI group referencing the method's Segmentation segment and Parametric Map, with the
  region's volume (SCT 118565006 "Volume", mm3) and the region threshold (map >= it).

The predicted class is coded in medimb's private coding scheme ``99MEDIMB`` (code value: the class name, or a
hash of it when longer than 16 characters; code meaning: the class name): class names are the user's own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from medimb import __version__

from .objects import LO_MAX, MANUFACTURER, Prediction, _lo, _uuid_uid
from .sources import SourceSeries

PRIVATE_SCHEME = "99MEDIMB"
SERIES_NUMBER = 9300


@dataclass(frozen=True)
class MethodResult:
    """One method's objects for the report: their headers (no pixels needed), the region's volume and threshold."""

    method: str
    parametric_map: object
    segmentation: object
    region_mm3: float
    region_threshold: float


def class_code(name: str):
    """The predicted class as a coded concept in medimb's private scheme."""
    from highdicom.sr import CodedConcept

    value = name if 0 < len(name) <= 16 and "\\" not in name else hashlib.sha256(name.encode()).hexdigest()[:16]
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=name[:LO_MAX])


def report_uids(source: SourceSeries, prediction: Prediction, results: list[MethodResult]) -> tuple[str, str]:
    """``(series UID, SOP Instance UID)`` of the report: derived from what it says (same report, same UIDs)."""
    parts = ["medimb", "sr", source.series_uid, repr(prediction)]
    for r in results:
        parts += [r.method, str(r.parametric_map.SOPInstanceUID), str(r.segmentation.SOPInstanceUID),
                  f"{r.region_mm3:.6g}", f"{r.region_threshold:.6g}"]
    name = "|".join(parts)
    return _uuid_uid(name + "|series"), _uuid_uid(name + "|instance")


def build_report(source: SourceSeries, prediction: Prediction, results: list[MethodResult]):
    """``highdicom.sr.Comprehensive3DSR`` of one case's prediction and its methods' regions."""
    import highdicom as hd
    from highdicom.sr import (AlgorithmIdentification, DeviceObserverIdentifyingAttributes, Measurement,
                              MeasurementReport, MeasurementsAndQualitativeEvaluations, ObservationContext,
                              ObserverContext, RealWorldValueMap, ReferencedSegment, SourceSeriesForSegmentation,
                              TrackingIdentifier, VolumetricROIMeasurementsAndQualitativeEvaluations)
    from pydicom.sr.codedict import codes

    series_uid, sop_uid = report_uids(source, prediction, results)
    finding = class_code(prediction.class_name)
    measurements = [Measurement(codes.DCM.Probability, prediction.probability, codes.UCUM.NoUnits)]
    if prediction.threshold is not None:
        measurements.append(Measurement(codes.DCM.ThresholdValue, prediction.threshold, codes.UCUM.NoUnits))
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_uuid_uid(sop_uid + "|classification"),
                                               identifier="medimb classification"),
        finding_type=finding, algorithm_id=AlgorithmIdentification("medimb", __version__),
        measurements=measurements)]
    for r in results:
        groups.append(VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=_uuid_uid(f"{sop_uid}|{r.method}"),
                                                   identifier=f"medimb {r.method} region"),
            referenced_segment=ReferencedSegment(
                sop_class_uid=str(r.segmentation.SOPClassUID), sop_instance_uid=str(r.segmentation.SOPInstanceUID),
                segment_number=1, source_series=SourceSeriesForSegmentation(source.series_uid)),
            referenced_real_world_value_map=RealWorldValueMap(str(r.parametric_map.SOPInstanceUID)),
            finding_type=finding, algorithm_id=AlgorithmIdentification(f"medimb {r.method}", __version__),
            measurements=[Measurement(codes.SCT.Volume, r.region_mm3, codes.UCUM.CubicMillimeter),
                          Measurement(codes.DCM.ThresholdValue, r.region_threshold, codes.UCUM.NoUnits)]))
    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=_uuid_uid(f"medimb|{__version__}"), name="medimb", manufacturer_name=MANUFACTURER,
            model_name=f"medimb {__version__}"))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                               procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    evidence = [*source.datasets, *(r.parametric_map for r in results), *(r.segmentation for r in results)]
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=report, series_instance_uid=series_uid,
                                 series_number=SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
                                 manufacturer=MANUFACTURER, is_complete=True)
    sr.SeriesDescription = _lo(f"medimb prediction: {prediction.short()}")
    return sr
