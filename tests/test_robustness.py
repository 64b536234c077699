"""Malformed input, faults and untrusted files (issue 11, part 4): corrupt or truncated checkpoints and resume
states."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from medimb.cli import main
from medimb.training import workflow
from training_utils import tiny_npz

TINY = '{"widths": [4, 8], "depths": [0, 1]}'


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
    from medimb import bundle_utils
    from medimb.cli import UserError
    from medimb.explain.pipeline import load_model
    from medimb.networks import CheckpointError, load_checkpoint, read_checkpoint_file

    run = trained_run / "run"
    for name in ("final.pt", "stage1_best.pt", "state/stage1_checkpoint_epoch=1.pt", "state/stage1_best_state.pt"):
        assert "sha256" in torch.load(run / name, weights_only=True), name  # what medimb writes carries one
        read_checkpoint_file(run / name)
    bad = tmp_path / "bad.pt"
    bad.write_bytes((run / "final.pt").read_bytes())
    _corrupt_largest_tensor(bad)
    readers = [load_checkpoint, read_checkpoint_file, load_model, bundle_utils.load_model,
               bundle_utils.load_preprocessing]
    for reader in readers:
        with pytest.raises((UserError, bundle_utils.BundleInputError)) as info:
            reader(str(bad))
        assert "checksum mismatch" in str(info.value) and str(bad) in str(info.value), reader
    assert issubclass(CheckpointError, UserError)


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
