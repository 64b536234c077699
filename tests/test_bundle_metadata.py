"""Bundle metadata: `monai.bundle verify_metadata` passes offline against the vendored schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import BUNDLES

NAMES = ["breast_dce_cmsl", "imbalanced_two_stage_metric"]


def _verify(bundle: Path, meta_file: str = "configs/metadata.json") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta_file,
         "--filepath", "configs/schema.json"],
        cwd=bundle, capture_output=True, text=True, timeout=120,
    )


def test_documented_metadata_check_passes_offline():
    """The documented command, from the bundle root, as a user runs it (no network needed)."""
    result = _verify(BUNDLES / NAMES[0])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_bundle_ships_its_files_and_metadata_valid_against_the_vendored_schema(name, monkeypatch):
    from monai.bundle import verify_metadata

    bundle = BUNDLES / name
    for path in ("LICENSE", "configs/metadata.json", "configs/schema.json", "configs/logging.conf", "docs/README.md"):
        assert (bundle / path).is_file(), f"{name} lacks {path}"
    assert "Apache License" in (bundle / "LICENSE").read_text()
    monkeypatch.chdir(bundle)
    verify_metadata(meta_file="configs/metadata.json", filepath="configs/schema.json")  # raises if invalid
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["schema"] == "configs/schema.json"  # the vendored file, no download
    assert len(meta["references"]) == 2


def test_schema_rejects_incomplete_metadata(tmp_path, monkeypatch):
    """The vendored schema really validates: a metadata without required fields fails."""
    from monai.bundle import verify_metadata

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    src = BUNDLES / NAMES[0] / "configs"
    (bundle / "configs" / "schema.json").write_text((src / "schema.json").read_text())
    meta = json.loads((src / "metadata.json").read_text())
    del meta["network_data_format"]
    meta["references"] = "not a list"
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.chdir(bundle)
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file="configs/metadata.json", filepath="configs/schema.json")
