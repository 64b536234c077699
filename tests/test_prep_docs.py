"""docs/data_prep.md documents every report reason and every manifest column the code can write."""

from __future__ import annotations

from pathlib import Path

from data_prep.convert import MANIFEST_COLUMNS
from data_prep.report import REASONS

DOC = Path(__file__).resolve().parents[1] / "docs" / "data_prep.md"


def test_every_reason_and_manifest_column_is_documented():
    text = DOC.read_text()
    for reason, (severity, _) in REASONS.items():
        assert f"| `{reason}` | {severity} |" in text, reason
    for column in MANIFEST_COLUMNS:
        assert f"| `{column}` |" in text, column
