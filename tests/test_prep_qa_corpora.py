"""Every volume dcm2niix writes from the shared vendor corpora (../shared/data/dicom_qa) is reproduced:
same voxels in RAS+, affine within 1e-3 mm, same .bval/.bvec for DWI (benchmarks/prep_vs_dcm2niix.py)."""

from __future__ import annotations

import json

import pytest
from helpers.paths import load_benchmark

prep_vs_dcm2niix = load_benchmark("prep_vs_dcm2niix")

pytestmark = pytest.mark.skipif(prep_vs_dcm2niix.dcm2niix_exe() is None, reason="dcm2niix not installed")


@pytest.mark.real_data
@pytest.mark.parametrize("corpus", ["dcm_qa", "dcm_qa_fmap", "dcm_qa_philips_dwi"])
def test_every_dcm2niix_volume_is_reproduced(shared_data, corpus, tmp_path):
    folder = shared_data / "dicom_qa" / corpus
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    result = prep_vs_dcm2niix.compare(folder, tmp_path, workers=1)
    assert result.reference > 0
    assert result.missing == [], result.missing
    assert result.ours == result.reference  # and nothing extra
    report = json.loads((tmp_path / "medimb" / "report.json").read_text())
    accounted = sum(s["files"] for s in report["series"]) + len(
        {i["path"] for i in report["issues"] if i.get("path") and i["action"] in ("skipped", "failed", "dropped")})
    assert accounted == report["archive_files"]
