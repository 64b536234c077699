"""BIDS / dcm2niix-style JSON sidecars (no PHI, no UIDs, no dates).

Times follow BIDS: EchoTime, RepetitionTime and InversionTime in **seconds** (DICOM stores ms).
DCE outputs add ``PhaseIndex``/``PhaseTime`` (s after the first phase) or, for 4D files,
``PhaseTimes`` (one per volume).
"""

from __future__ import annotations

import re

import data_prep
from data_prep.deid import PhiScrubber

_RENAME = {"ManufacturerModelName": "ManufacturersModelName"}  # dcm2niix's spelling
#: sidecar keys whose DICOM VR is CS (code strings)
_CODED = {"ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "BodyPartExamined",
          "PatientPosition", "ImageType"}
_CS = re.compile(r"[A-Z0-9 _]{0,16}")
_MS_TO_S = ("EchoTime", "RepetitionTime", "InversionTime")
_COPY = (
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "ImagingFrequency", "ScanningSequence",
    "SequenceVariant", "ScanOptions", "MRAcquisitionType", "SequenceName", "PulseSequenceName",
    "BodyPartExamined", "PatientPosition", "FlipAngle", "PixelBandwidth", "SliceThickness",
    "SpacingBetweenSlices", "ImageType", "BitsStored", "EchoNumber", "ImagePart", "PhilipsRescaleSlope",
    "PhilipsRescaleIntercept", "PhilipsScaleSlope", "UsePhilipsFloatNotDisplayScaling",
)


def build_sidecar(params: dict, *, modality: str, description: str, series_number, scrub,
                  extra: dict | None = None) -> dict:
    """Sidecar dict from the scan's acquisition ``params``.

    Free text (ProtocolName; ``description`` comes scrubbed) passes through ``scrub``; coded and
    device values (PatientPosition, ImageType, Manufacturer, ...) only lose UIDs and dates, so that a
    patient named ``HFS`` does not blank out the patient position."""
    out: dict = {"Modality": modality, "SeriesDescription": description}
    if series_number is not None:
        out["SeriesNumber"] = int(series_number)
    protocol = scrub(params["ProtocolName"]) if params.get("ProtocolName") else ""
    if protocol:  # empty when descriptors are not written (convert --no-descriptors)
        out["ProtocolName"] = protocol
    for k in _COPY:
        v = params.get(k)
        if v is None or v == "" or v == []:
            continue
        k = _RENAME.get(k, k)
        if k in _CODED:  # DICOM CS: upper-case letters, digits, space and _ only; anything else is damage
            values = v if isinstance(v, list) else [v]
            if not all(isinstance(x, str) and _CS.fullmatch(x) for x in values):
                continue
        coded = PhiScrubber.scrub_coded
        out[k] = [coded(x) for x in v] if isinstance(v, list) else (coded(v) if isinstance(v, str) else v)
    for k in _MS_TO_S:
        if params.get(k) is not None:
            out[k] = round(float(params[k]) / 1000.0, 8)
    out.update(extra or {})
    out["ConversionSoftware"] = "medimb-prep"
    out["ConversionSoftwareVersion"] = data_prep.__version__
    out["Deidentified"] = True
    return out
