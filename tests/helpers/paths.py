"""Where the repository, its bundles and the shared real-data folder are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
#: ``../shared/data`` next to the repository, or ``$MEDIMB_SHARED_DATA``; tests that need it skip when absent
SHARED = Path(os.environ.get("MEDIMB_SHARED_DATA", REPO.parent / "shared" / "data"))
