"""`medimb evaluate`: a checkpoint from `medimb train` reproduces its metrics; clear errors."""

from __future__ import annotations

import json

from helpers.training import tiny_config, tiny_npz

from medimb.cli import main
from medimb.evaluation.predictions_csv import read_predictions
from medimb.networks import load_checkpoint, read_checkpoint_file, write_checkpoint_file
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


def test_operating_point_chosen_in_training_is_stored_and_used_by_evaluate(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--method", "ce", "--out", str(run), "--epochs", "1", "--device", "cpu",
                 "--no-progress", "--batch-size", "8", "--sensitivity", "0.9"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    point = load_checkpoint(run / "final.pt")[1]["operating_point"]
    assert point["rule"] == "sensitivity>=0.9" and point["positive_class"] == 1
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["operating_point"]["threshold"] == point["threshold"]
    assert trained["validation"]["threshold"] == trained["test"]["threshold"] == point["threshold"]
    assert trained["validation"]["sensitivity"] >= 0.9 and point["validation"]["sensitivity"] >= 0.9
    assert set(trained["test"]["ci95"]) == {"balanced_accuracy", "auc", "sensitivity", "specificity"}

    # evaluate reads the threshold from the checkpoint
    main(["evaluate", "--checkpoint", str(run / "final.pt"), "--data", str(data), "--out", str(tmp_path / "e1"),
          "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert f"threshold={point['threshold']:.3f}" in out and "  test: balanced accuracy " in out
    first = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert first["test"] == trained["test"] and first["operating_point"]["source"] == "checkpoint"
    rows = read_predictions(tmp_path / "e1" / "predictions.csv")
    assert all(r["predicted"] == int(r["prob_1"] > point["threshold"]) for r in rows)
    assert {r["threshold"] for r in rows} == {float(f"{point['threshold']:.6g}")}

    # --threshold overrides it
    main(["evaluate", "--checkpoint", str(run / "final.pt"), "--data", str(data), "--out", str(tmp_path / "e2"),
          "--device", "cpu", "--no-progress", "--threshold", "0.99"])
    given = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert given["test"]["threshold"] == 0.99 and given["operating_point"]["rule"] == "given"
    assert given["test"]["auc"] == first["test"]["auc"]
    assert all(r["predicted"] == int(r["prob_1"] > 0.99) for r in read_predictions(tmp_path / "e2" / "predictions.csv"))

    # an older checkpoint (no operating point) decides by argmax, as before
    payload = read_checkpoint_file(run / "final.pt")
    del payload["operating_point"]
    write_checkpoint_file(tmp_path / "old.pt", payload)
    main(["evaluate", "--checkpoint", str(tmp_path / "old.pt"), "--data", str(data), "--out", str(tmp_path / "e3"),
          "--device", "cpu", "--no-progress"])
    old = json.loads((tmp_path / "e3" / "metrics.json").read_text())
    assert old["test"]["threshold"] == 0.5 and old["operating_point"]["rule"] == "default"
    rows = read_predictions(tmp_path / "e3" / "predictions.csv")
    assert all(r["predicted"] == int(r["prob_1"] > r["prob_0"]) for r in rows)


def test_bad_threshold_is_one_line(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(data), "--out", str(tmp_path),
                 "--threshold", "1.5"])
    assert code == 2 and "--threshold must be in [0, 1]" in capsys.readouterr().err
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--sensitivity", "0"])
    assert code == 2 and "--sensitivity must be in (0, 1]" in capsys.readouterr().err
