"""``medimb explain`` predicts (and explains) binary models at the checkpoint's operating point."""

from __future__ import annotations

import json

from test_explain_cli import make_checkpoint, write_scans

from medimb.cli import main
from medimb.evaluation.operating_point import store_operating_point
from medimb.evaluation.predictions_csv import read_predictions


def _explain(ckpt, datalist, out, *extra) -> tuple[list[dict], dict]:
    assert main(["explain", "--checkpoint", str(ckpt), "--data", str(datalist), "--out", str(out),
                 "--methods", "gradcam", "--no-previews", "--no-progress", *extra]) == 0
    return read_predictions(out / "predictions.csv"), json.loads((out / "explain.json").read_text())


def test_explain_uses_the_stored_operating_point_and_the_override(tmp_path):
    ckpt = make_checkpoint(tmp_path / "model.pt", head="linear")
    datalist, _ = write_scans(tmp_path, n=3)
    rows, summary = _explain(ckpt, datalist, tmp_path / "old")
    # no operating point: 0.5, the argmax of before
    assert all(r["predicted"] == int(r["prob_malignant"] > r["prob_benign"]) for r in rows)
    assert summary["operating_point"]["rule"] == "default" and {r["threshold"] for r in rows} == {0.5}

    # a stored threshold below every probability: every case is called malignant, and explained as such
    low = min(r["prob_malignant"] for r in rows) / 2
    store_operating_point(ckpt, {"threshold": low, "rule": "balanced_accuracy", "positive_class": 1})
    rows, summary = _explain(ckpt, datalist, tmp_path / "stored")
    assert [r["predicted"] for r in rows] == [1, 1, 1] and {r["predicted_name"] for r in rows} == {"malignant"}
    assert summary["operating_point"]["source"] == "checkpoint"
    assert [c["predicted"] for c in summary["cases"]] == [1, 1, 1]

    # --decision-threshold overrides it: above every probability, every case is benign
    rows, summary = _explain(ckpt, datalist, tmp_path / "given", "--decision-threshold", "0.999999")
    assert [r["predicted"] for r in rows] == [0, 0, 0] and summary["operating_point"]["rule"] == "given"
