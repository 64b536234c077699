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
