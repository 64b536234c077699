"""Report reasons and the ``report.json`` writer.

Every skipped or failed file or series gets one entry with a reason code from :data:`REASONS`.
Severity ``info`` is expected archive content (a DICOMDIR, ...); ``warning`` means something
was dropped or split but the rest converted; ``error`` means data could not be converted.
``--strict`` turns any warning or error into a non-zero exit status.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: reason code -> (severity, one-line meaning); docs/data_prep.md explains each
REASONS = {
    "empty_file": ("warning", "zero-byte file"),
    "not_dicom": ("warning", "not a DICOM file (no preamble/DICM prefix)"),
    "unreadable": ("error", "the file cannot be opened (permissions or I/O error)"),
    "symlink_loop": ("warning", "a symbolic link that loops back on itself or an ancestor folder; not followed"),
    "broken_link": ("warning", "a symbolic link whose target does not exist"),
    "corrupt_header": ("error", "the DICOM header cannot be parsed (cut off or damaged)"),
    "truncated": ("error", "the file is shorter than its pixel data"),
    "dicomdir": ("info", "DICOMDIR index file; images are found by walking the folders instead"),
    "not_an_image": ("info", "DICOM object without pixels (report, presentation state, ...)"),
    "unsupported_pixels": ("warning", "colour pixels other than 8-bit RGB/YBR are not converted"),
    "missing_geometry": ("error", "no ImagePositionPatient/ImageOrientationPatient/PixelSpacing"),
    "split_orientation": ("warning", "a series holding images in several planes, matrix sizes or pixel spacings: "
                          "each group converted separately"),
    "duplicate_file": ("warning", "the same SOP instance appears twice; one copy converted"),
    "duplicate_slice_position": ("error", "two different images at the same position, time and InstanceNumber"),
    "missing_slice": ("error", "a gap of a whole number of slice spacings: a slice is missing"),
    "nonuniform_spacing": ("error", "slice spacing varies; cannot be one regular volume"),
    "invalid_orientation": ("error", "ImageOrientationPatient row and column vectors are parallel"),
    "invalid_value": ("error", "a header value needed to read the image is malformed or impossible"),
    "invalid_geometry": ("error", "position, orientation or pixel spacing is not finite, not orthonormal or "
                                  "out of range"),
    "localizer_in_series": ("warning", "images tagged LOCALIZER/SCOUT inside a series of other images; dropped"),
    "inconsistent_diffusion": ("error", "a diffusion series whose volumes do not each cover every slice position"),
    "invalid_volume": ("error", "the assembled volume failed the checks before writing"),
    "internal_error": ("error", "an unexpected error in medimb-prep; the rest of the archive was converted"),
    "inconsistent_phases": ("error", "DCE phases with different slice counts"),
    "pixel_decode_error": ("error", "pixel data cannot be decoded (missing codec or damaged data)"),
    "write_error": ("error", "the output could not be written"),
}


def severity(reason: str) -> str:
    return REASONS.get(reason, ("error", ""))[0]


@dataclass
class Issue:
    """One report entry. ``path`` is archive-relative (scrubbed); ``series`` the output series label."""

    reason: str
    detail: str
    path: str = ""
    subject: str = ""
    session: str = ""
    series: str = ""
    action: str = "skipped"  # skipped | failed | dropped | split | not_followed (a folder or folder link)

    @property
    def severity(self) -> str:
        return severity(self.reason)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v != ""}
        d["severity"] = self.severity
        return d


def summarize(issues: list[Issue]) -> dict:
    """Counts by reason and by severity."""
    by_reason: dict[str, int] = {}
    by_severity = {"info": 0, "warning": 0, "error": 0}
    for i in issues:
        by_reason[i.reason] = by_reason.get(i.reason, 0) + 1
        by_severity[i.severity] += 1
    return {"by_reason": dict(sorted(by_reason.items())), "by_severity": by_severity}
