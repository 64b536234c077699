"""Malformed input, faults and untrusted files (issue 11, part 4): what `medimb` does with a planted disk-cache
file, a corrupt or truncated checkpoint, a truncated resume state, a NaN image and degenerate (1x1x1) images."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.nifti import write_datalist
from helpers.paths import REPO
from helpers.training import tiny_npz

from medimb.cli import main
from medimb.training import workflow

TINY = '{"widths": [4, 8], "depths": [0, 1]}'


def _datalist(folder: Path, n: int = 6, size: int = 16, nan_item: int | None = None,
              sizes: dict[int, tuple] | None = None) -> Path:
    """``n`` cases, labels 0/1 alternating, 2/3 training and the rest both val and test; float32 volumes."""
    return write_datalist(folder, [i % 2 for i in range(n)], shape=(size,) * 3, shapes=sizes,
                          image="{case}.nii.gz", nan_items=() if nan_item is None else (nan_item,))


def _one_line_error(err: str, command: str = "train") -> str:
    assert err.strip() and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"medimb {command}: error:"), err
    return line


def _train_npz(tmp_path: Path, out: Path, *extra) -> int:
    data = tmp_path / "tiny.npz"
    if not data.exists():
        tiny_npz(data, n_train=24, n_eval=8, size=12)
    return main(["train", "--data", str(data), "--out", str(out), "--network-kwargs", TINY, "--device", "cpu",
                 "--no-progress", "--batch-size", "8", *map(str, extra)])


def _interrupt_at(monkeypatch, seed: int, epoch: int) -> None:
    """Make the run stop (Ctrl-C) when the EpochSeeder with ``seed`` starts ``epoch`` (stage 2 uses seed + 1)."""
    original = workflow.EpochSeeder.__call__

    def crash(self, engine):
        if engine.state.epoch == epoch and self.seed == seed:
            raise KeyboardInterrupt
        original(self, engine)

    monkeypatch.setattr(workflow.EpochSeeder, "__call__", crash)


# --- disk cache: nothing in a run folder is unpickled ---------------------------------------------------------


class _Planted:
    """Unpickling this runs ``open(marker, "w")``: stands for any code a planted pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_disk_cache_never_unpickles_a_planted_file(tmp_path, caplog):
    from medimb.data import load_splits

    data = _datalist(tmp_path / "data")
    cache = tmp_path / "run" / "cache"
    first = load_splits(data, cache="disk", cache_dir=cache, spatial_size=(16, 16, 16))
    expected = [first.val[i]["image"] for i in range(len(first.val))]
    files = sorted(cache.glob("*.pt"))
    assert files
    with caplog.at_level(logging.WARNING):  # a legitimate cache is reused as it is: safe load, no recompute
        again = load_splits(data, cache="disk", cache_dir=cache, spatial_size=(16, 16, 16))
        _ = [again.val[i] for i in range(len(again.val))]
    assert "failed the safe load" not in caplog.text
    marker = tmp_path / "code_ran"
    for f in files:
        torch.save({"image": _Planted(marker), "label": 0}, f)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        splits = load_splits(data, cache="disk", cache_dir=cache, spatial_size=(16, 16, 16))
        got = [splits.val[i]["image"] for i in range(len(splits.val))]
    assert not marker.exists(), "a planted cache file was unpickled with code execution"
    assert "failed the safe load and is recomputed" in caplog.text
    for a, b in zip(expected, got):  # recomputed from the scans, geometry (MetaTensor affine) included
        assert torch.equal(a.as_tensor(), b.as_tensor()) and torch.equal(a.affine, b.affine)


# --- checkpoints: checksum, one loader ------------------------------------------------------------------------


def _corrupt_largest_tensor(path: Path, n: int = 64, seed: int = 0) -> None:
    """Overwrite ``n`` random bytes in the middle of the largest tensor stored in a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2 - n // 2
    raw[start:start + n] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny finished run (method ce, 1 epoch); tests copy files out of it, never modify it."""
    tmp = tmp_path_factory.mktemp("run")
    assert _train_npz(tmp, tmp / "run", "--method", "ce", "--epochs", 1) == 0
    return tmp


def test_corrupt_checkpoint_is_a_one_line_error_naming_the_file(trained_run, tmp_path, capsys):
    bad = tmp_path / "final.pt"
    bad.write_bytes((trained_run / "run" / "final.pt").read_bytes())
    _corrupt_largest_tensor(bad)
    code = main(["evaluate", "--checkpoint", str(bad), "--data", str(trained_run / "tiny.npz"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    line = _one_line_error(capsys.readouterr().err, "evaluate")
    assert code == 2 and str(bad) in line and "checksum mismatch" in line
    assert not (tmp_path / "eval" / "metrics.json").exists()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    code = main(["evaluate", "--checkpoint", str(truncated), "--data", str(trained_run / "tiny.npz"),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    line = _one_line_error(capsys.readouterr().err, "evaluate")
    assert code == 2 and str(truncated) in line and "truncated" in line


def test_every_checkpoint_reader_checks_the_checksum(trained_run, tmp_path):
    from medimb.errors import UserError
    from medimb.networks import CheckpointError, load_checkpoint, read_checkpoint_file

    run = trained_run / "run"
    for name in ("final.pt", "stage1_best.pt", "state/stage1_checkpoint_epoch=1.pt", "state/stage1_best_state.pt"):
        assert "sha256" in torch.load(run / name, weights_only=True), name  # what medimb writes carries one
        read_checkpoint_file(run / name)
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "final.pt").read_bytes())
    _corrupt_largest_tensor(bad)
    readers = [load_checkpoint, read_checkpoint_file]  # the one reader, and the one loader built on it
    for reader in readers:
        with pytest.raises(UserError) as info:
            reader(str(bad))
        assert "checksum mismatch" in str(info.value) and str(bad) in str(info.value), reader
    assert issubclass(CheckpointError, UserError)


def test_every_torch_load_in_the_library_is_weights_only():
    """torch.load lives in two places only (the checkpoint reader, the disk cache), both weights_only=True;
    everything else reads checkpoints through medimb.networks.read_checkpoint_file."""
    calls = {}
    for path in sorted((REPO / "medimb").rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            calls.setdefault(path.relative_to(REPO).as_posix(), []).append(m.group(1))
        assert not re.search(r"[(,]\s*weights_only\s*=\s*False", text), path  # an argument, not the docs
        # MONAI's CheckpointLoader reads without the checksum: resume states go through read_checkpoint_file
        assert not re.search(r"^\s*(from monai\.handlers import .*)?CheckpointLoader,?$", text, re.M), path
    assert set(calls) == {"medimb/networks/checkpoint.py", "medimb/data/datasets.py"}, calls
    assert all("weights_only=True" in args for found in calls.values() for args in found), calls


def test_checkpoint_without_checksum_loads_with_a_warning(trained_run, tmp_path, caplog):
    from medimb.networks import load_checkpoint

    payload = torch.load(trained_run / "run" / "final.pt", weights_only=True)
    payload.pop("sha256")
    old = tmp_path / "old.pt"
    torch.save(payload, old)  # as medimb wrote checkpoints before the checksum
    with caplog.at_level(logging.WARNING):
        model, meta = load_checkpoint(old)
    assert meta["method"] == "ce" and "has no sha256 checksum" in caplog.text and str(old) in caplog.text


# --- resume ------------------------------------------------------------------------------------------------------


def test_resume_from_a_truncated_state_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    args = ("--method", "ce", "--epochs", 2)
    _interrupt_at(monkeypatch, seed=0, epoch=2)
    assert _train_npz(tmp_path, tmp_path / "run", *args) == 130
    monkeypatch.undo()
    state = tmp_path / "run" / "state" / "stage1_checkpoint_epoch=1.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    code = _train_npz(tmp_path, tmp_path / "run", *args, "--resume")
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and str(state) in line and "truncated" in line


def test_resumed_run_says_what_it_resumed(tmp_path, monkeypatch, capsys):
    args = ("--method", "crt", "--epochs", 1, "--stage2-epochs", 2)
    _interrupt_at(monkeypatch, seed=1, epoch=2)  # stage 2 (seed + 1), after its epoch 1 was saved
    assert _train_npz(tmp_path, tmp_path / "run", *args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert _train_npz(tmp_path, tmp_path / "run", *args, "--resume") == 0
    err = capsys.readouterr().err
    stage1 = tmp_path / "run" / "stage1_best.pt"
    state = tmp_path / "run" / "state" / "stage2_checkpoint_epoch=1.pt"
    assert f"medimb: resuming after stage 1: it finished (best epoch 1), weights from {stage1}" in err, err
    assert f"medimb: resuming stage2 from {state} (epoch 1 of 2 done)" in err, err


# --- NaN image: one line, exit 2, no abort ------------------------------------------------------------------------


def test_nan_image_leaves_no_thread_behind(tmp_path):
    """The in-memory cache is filled in the calling thread: when an item raises, no worker thread is still
    transforming the next one (at interpreter exit such a thread aborted the process with SIGABRT)."""
    from medimb.data import load_splits

    data = _datalist(tmp_path / "data", nan_item=0, sizes={i: (48, 48, 48) for i in range(1, 6)})
    before = set(threading.enumerate())
    with pytest.raises(Exception, match="NaN|CheckImaged"):
        load_splits(data, spatial_size=(16, 16, 16))
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not left, f"threads still running after the error: {left}"


def test_nan_image_exits_2_with_one_line_and_no_abort(tmp_path):
    data = _datalist(tmp_path / "data", nan_item=0, sizes={i: (48, 48, 48) for i in range(1, 6)})
    proc = subprocess.run([sys.executable, "-m", "medimb", "train", "--data", str(data), "--out", str(tmp_path / "run"),
                           "--method", "ce", "--epochs", "1", "--device", "cpu", "--no-progress", "--spatial-size", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    line = _one_line_error(proc.stderr)
    assert "s0.nii.gz: image contains 1 NaN" in line and "terminate called" not in proc.stderr


# --- degenerate images --------------------------------------------------------------------------------------------


def test_degenerate_images_train_with_a_warning_naming_case_and_size(tmp_path, capsys, caplog):
    data = _datalist(tmp_path / "data", n=9, sizes={1: (1, 1, 1), 7: (16, 16, 2)})
    with caplog.at_level(logging.WARNING):
        code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--method", "ce", "--epochs", "1",
                     "--device", "cpu", "--no-progress", "--spatial-size", "16", "--network-kwargs", TINY])
    assert code == 0, capsys.readouterr().err
    small = [r.getMessage() for r in caplog.records if r.getMessage().startswith("small image:")]
    assert any("train case sub-1 (s1.nii.gz) is 1x1x1 voxels" in m for m in small), small
    assert any("val case sub-7 (s7.nii.gz) is 16x16x2 voxels" in m for m in small), small
    assert not any("sub-0" in m for m in small)  # 16^3 is fine


def test_network_input_smaller_than_the_downsampling_warns_or_fails(tmp_path, capsys, caplog):
    from medimb.data import load_splits
    from medimb.networks import create_model
    from medimb.training.workflow import check_network_input

    pre = load_splits(tiny_npz(tmp_path / "tiny.npz", n_train=6, n_eval=3, size=4)).preprocessing
    model = create_model("cpunet", in_channels=1, num_classes=2)  # downsamples 8x
    with caplog.at_level(logging.WARNING):
        check_network_input(model, pre, "cpunet")
    assert "network input 4x4x4 is smaller than cpunet's downsampling factor 8x8x8" in caplog.text
    caplog.clear()
    pre.spatial_size = (16, 16, 16)
    with caplog.at_level(logging.WARNING):
        check_network_input(model, pre, "cpunet")
    assert caplog.text == ""
    data = _datalist(tmp_path / "data")  # densenet121's pooling cannot take a 2^3 input at all: a user error
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--network", "densenet121",
                 "--spatial-size", "2", "--device", "cpu", "--no-progress"])
    line = _one_line_error(capsys.readouterr().err)
    assert code == 2 and "network input 2x2x2 is too small for --network densenet121" in line


def test_a_split_of_two_cases_still_gets_its_plots(tmp_path, caplog):
    from medimb.evaluation.predictions_csv import SplitPredictions
    from medimb.evaluation.report import write_split_plots

    part = SplitPredictions("test", ["a1", "b1"], np.array([0, 1]), np.array([[0.7, 0.3], [0.4, 0.6]]))
    with caplog.at_level(logging.WARNING):
        written = write_split_plots(part, ["a", "b"], tmp_path, features=np.ones((2, 4)))
    assert sorted(Path(p).name for p in written) == ["confusion_matrix.png", "pr.png", "reliability.png", "roc.png"]
    assert "no feature projection plot" in caplog.text
