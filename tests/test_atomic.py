"""Atomic outputs: all or nothing at the final path, with the permissions of a plain write."""

from __future__ import annotations

import os

import pytest

from data_prep import io as prep_io
from medimb import atomic
from medimb.atomic import atomic_output


@pytest.mark.parametrize("write_text_atomic", [atomic.write_text_atomic, prep_io.write_text_atomic],
                         ids=["medimb", "data_prep"])
def test_success_replaces_the_file_with_umask_permissions(tmp_path, write_text_atomic):
    target = tmp_path / "sub" / "metrics.json"
    old = os.umask(0o027)
    try:
        write_text_atomic(target, "{}\n")
    finally:
        os.umask(old)
    assert target.read_text() == "{}\n"
    assert target.stat().st_mode & 0o777 == 0o640  # 0o666 minus the umask, not mkstemp's 0o600
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "final.pt"
    target.write_text("previous")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(target, suffix=".nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz")
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["final.pt"]


@pytest.mark.parametrize("backend", ["isal", "zlib"])
def test_nifti_gzip_is_deterministic_and_exact_with_either_compressor(tmp_path, monkeypatch, backend):
    """``.nii.gz`` from ISA-L (when installed) and from the zlib fallback: the same voxels, scaling and
    affine back through nibabel, one gzip member with mtime 0, the same bytes on a second write."""
    import gzip

    import nibabel as nib
    import numpy as np

    if backend == "isal":
        if prep_io.isal_zlib is None:
            pytest.skip("python-isal is not installed on this platform")
    else:
        monkeypatch.setattr(prep_io, "isal_zlib", None)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4096, size=(17, 13, 5), dtype=np.int16)
    affine = np.diag([0.7, 0.8, 3.0, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 5.5)
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    for path in (first, second):
        prep_io.write_nifti_atomic(path, data, affine, slope=2.0, inter=-1.0)
    raw = first.read_bytes()
    assert raw == second.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\x00\x00\x00\x00"  # gzip magic, mtime 0
    assert len(gzip.decompress(raw)) == 352 + data.nbytes
    img = nib.load(first)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj.get_unscaled()), data)
    assert img.dataobj.slope == 2.0 and img.dataobj.inter == -1.0
    np.testing.assert_allclose(img.affine, affine)


def test_atomic_open_writes_all_or_nothing_with_plain_permissions(tmp_path):
    """data_prep's lean atomic writer: umask permissions from the start, a temporary name that
    remove_partial_files finds, nothing under the final name (and no temporary) after an error."""
    target = tmp_path / "new" / "a.nii.gz"
    old = os.umask(0o022)
    try:
        with prep_io.atomic_open(target, keep_suffix=False) as fh:
            fh.write(b"data")
            (tmp_name,) = [p.name for p in target.parent.iterdir()]
            assert tmp_name.startswith(".a.nii.gz.") and tmp_name.endswith(".part")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"data" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError):
        with prep_io.atomic_open(target) as fh:
            fh.write(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"data" and [p.name for p in target.parent.iterdir()] == ["a.nii.gz"]
    with prep_io.atomic_open(tmp_path / "b.json") as fh:  # a leftover from a killed run is found by name
        (tmp_path / f".b.json.{os.getpid()}-x.part.json").write_bytes(b"left")
    assert prep_io.remove_partial_files(tmp_path) == 1
