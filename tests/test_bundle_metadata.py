"""Bundle metadata: the model zoo's schema URL in ``schema``, and `monai.bundle verify_metadata` passing offline
against the vendored copy (``--filepath configs/schema.json``: an existing file is never downloaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import BUNDLES

NAMES = ["breast_dce_cmsl", "imbalanced_two_stage_metric"]
ZOO_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


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
    assert meta["schema"] == ZOO_SCHEMA  # as in the model zoo's bundles; the vendored copy is the offline override
    assert len(meta["references"]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_verification_with_the_vendored_schema_never_downloads(name, monkeypatch):
    import monai.apps.utils
    from monai.bundle import verify_metadata

    def no_network(*args, **kwargs):
        raise AssertionError(f"verify_metadata tried to download {args[:1]}")

    monkeypatch.setattr(monai.apps.utils, "urlretrieve", no_network)
    monkeypatch.chdir(BUNDLES / name)
    verify_metadata(meta_file="configs/metadata.json", filepath="configs/schema.json")


@pytest.mark.parametrize("name", NAMES)
def test_eval_metrics_are_filled_and_large_files_name_the_inference_checkpoint(name):
    """eval_metrics: measured on the demo archive (docs/benchmarks.md), between 0 and 1, with what they are;
    large_files.yml (the model zoo's format): the checkpoint inference.json loads by default."""
    bundle = BUNDLES / name
    metrics = json.loads((bundle / "configs/metadata.json").read_text())["eval_metrics"]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    assert {"test_balanced_accuracy", "test_auc"} <= set(numbers) and all(0 <= v <= 1 for v in numbers.values())
    assert "demo" in metrics["measured_on"] and "docs/benchmarks.md" in metrics["measured_on"]
    text = (bundle / "large_files.yml").read_text()
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines[:2] == ["large_files:", '  - path: "models/model.pt"']
    inference = json.loads((bundle / "configs/inference.json").read_text())
    assert inference["ckpt_path"] == "$os.path.join(@ckpt_dir, 'model.pt')"
    assert inference["ckpt_dir"] == "$os.path.join(@bundle_root, 'models')"


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
