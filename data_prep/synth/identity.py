"""Fake but realistic patient, study and scanner identities for synthetic archives.

Every value is invented (names from short lists of common names, random IDs and dates), so that
de-identification is exercised on headers that look like a hospital's without holding anyone's data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_GIVEN = ("Anna", "Maria", "Laura", "Sofia", "Julia", "Emma", "Hanna", "Clara", "Ines", "Nora",
          "Elena", "Marta", "Lucia", "Irene", "Paula", "Alice", "Greta", "Olga", "Rosa", "Vera")
_FAMILY = ("Keller", "Moreau", "Rossi", "Novak", "Jansen", "Berger", "Lindqvist", "Costa", "Weber",
           "Fischer", "Dubois", "Ricci", "Kowalski", "Nielsen", "Schmidt", "Garcia", "Horvat", "Meyer")
_INSTITUTIONS = ("St. Elsewhere General Hospital", "Northfield University Clinic",
                 "Lakeside Breast Centre", "Riverside Medical Imaging")
_PHYSICIANS = ("Hartmann^Peter^^Dr.", "Okafor^Grace^^Dr.", "Lindgren^Tomas^^Dr.", "Bianchi^Luca^^Dr.")

#: scanner models and their naming habits: (manufacturer, model, field T, single-series DCE
#: description, per-phase description stem, localizer description, applies rescale slope)
SCANNERS = (
    ("SIEMENS", "Skyra", 3.0, "t1_fl3d_tra_dynaVIEWS", "t1_fl3d_tra_dyn", "localizer", False),
    ("SIEMENS", "Avanto", 1.5, "t1_fl3d_tra_dynaVIEWS", "t1_fl3d_tra_dyn", "AAHScout", False),
    ("GE MEDICAL SYSTEMS", "SIGNA Architect", 3.0, "Ax VIBRANT MultiPhase", "Ax VIBRANT", "3Plane Loc", False),
    ("Philips", "Ingenia", 1.5, "DYN eTHRIVE", "DYN eTHRIVE", "Survey", True),
)


@dataclass(frozen=True)
class PatientIdentity:
    """The PHI one synthetic patient carries in the headers (all invented)."""

    name: str  # DICOM PN, "Family^Given"
    patient_id: str
    birth_date: str  # YYYYMMDD
    accession: str
    institution: str
    referring_physician: str
    study_date: str  # YYYYMMDD
    study_time_s: float  # seconds after midnight at study start
    age_years: int

    @property
    def phi_values(self) -> dict[str, str]:
        """The values a de-identification check must never find in outputs."""
        return {
            "PatientName": self.name,
            "PatientID": self.patient_id,
            "PatientBirthDate": self.birth_date,
            "AccessionNumber": self.accession,
        }


def draw_identity(rng: np.random.Generator, case_index: int) -> PatientIdentity:
    """An invented identity; PatientIDs are unique within an archive (they embed ``case_index``)."""
    study_day = np.datetime64("2019-01-01") + int(rng.integers(0, 6 * 365))
    age = int(rng.integers(32, 80))
    birth_day = study_day - np.timedelta64(int(age * 365.25 + rng.integers(0, 365)), "D")
    return PatientIdentity(
        name=f"{_FAMILY[rng.integers(len(_FAMILY))]}^{_GIVEN[rng.integers(len(_GIVEN))]}",
        patient_id=f"MRN{int(rng.integers(1_000_000, 9_999_999)):07d}{case_index:03d}",
        birth_date=str(birth_day).replace("-", ""),
        accession=f"A{int(rng.integers(10**8, 10**9 - 1))}",
        institution=str(_INSTITUTIONS[rng.integers(len(_INSTITUTIONS))]),
        referring_physician=str(_PHYSICIANS[rng.integers(len(_PHYSICIANS))]),
        study_date=str(study_day).replace("-", ""),
        study_time_s=float(rng.integers(7 * 3600, 18 * 3600)),
        age_years=age,
    )


def dicom_time(seconds: float) -> str:
    """Seconds after midnight as a DICOM TM ``HHMMSS.ffffff``."""
    seconds = seconds % 86400
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"
