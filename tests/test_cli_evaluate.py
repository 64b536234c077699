"""`medimb evaluate`: a checkpoint from `medimb train` reproduces its metrics; clear errors."""

from __future__ import annotations

import json

from helpers.training import tiny_config, tiny_npz

from medimb.cli import main
from medimb.training import train


def test_evaluate_reproduces_training_metrics(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    res = train(tiny_config(data, tmp_path / "run", "crt", epochs=1, stage2_epochs=1), progress=False)
    code = main(["evaluate", "--checkpoint", str(tmp_path / "run" / "final.pt"), "--data", str(data),
                 "--out", str(tmp_path / "eval"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "validation balanced_accuracy=" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["test"] == res["test"] and metrics["validation"] == res["validation"] and metrics["method"] == "crt"
    assert metrics["flip_tta"] is True  # evaluated the way training reported (flip TTA by default)
    assert (tmp_path / "eval" / "plots" / "test" / "roc.png").exists()


def test_missing_checkpoint_or_data_exits_2_with_one_line(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(data), "--out", str(tmp_path)])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err
    code = main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path)])
    assert code == 2 and "--data does not exist" in capsys.readouterr().err
