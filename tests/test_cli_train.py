"""`medimb train`: outputs on a tiny archive, one-line errors for bad input, and real-data smoke tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.nifti import write_datalist
from helpers.paths import SHARED
from helpers.training import tiny_npz

from medimb.cli import main

BIN = Path(sys.executable).parent


def _train(args, capsys) -> tuple[int, str, str]:
    code = main(["train", *map(str, args)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _datalist(tmp_path: Path, labels=(0, 1, 0, 1, 0, 1), channels=1, nan_item=None, **top) -> Path:
    """Noise volumes ``s{i}_c{c}.nii.gz`` next to ``datalist.json``; ``top``: extra top-level keys."""
    nan_items = () if nan_item is None else (nan_item,)
    return write_datalist(tmp_path, labels, channels=channels, nan_items=nan_items, extra=top)


def test_train_writes_metrics_checkpoints_plots_config(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    code, out, err = _train(["--data", data, "--method", "ce", "--out", tmp_path / "run", "--epochs", 1,
                             "--device", "cpu", "--no-progress", "--batch-size", 8], capsys)
    assert code == 0, err
    assert out.startswith("ce: validation balanced_accuracy=") and "metrics.json" in out and out.count("\n") == 2
    assert out.splitlines()[1].startswith("  test: balanced accuracy ")  # with its 95 % interval and threshold
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"validation", "test"}
    assert {"balanced_accuracy", "auc", "accuracy", "macro_f1", "per_class_recall", "confusion_matrix"} <= set(
        metrics["test"])
    for name in ("final.pt", "stage1_best.pt", "config.json", "predictions.csv", "plots/test/roc.png",
                 "plots/test/confusion_matrix.png", "plots/test/pr.png", "plots/test/reliability.png",
                 "plots/validation/roc.png"):
        assert (run / name).exists(), name
    config = json.loads((run / "config.json").read_text())
    assert config["method"]["name"] == "ce" and config["method"]["stage1"]["epochs"] == 1


def test_network_kwargs_reach_the_model_and_bad_ones_fail_in_one_line(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    base = ["--data", data, "--method", "ce", "--epochs", 1, "--device", "cpu", "--no-progress", "--batch-size", 8]
    code, _, err = _train([*base, "--out", tmp_path / "run", "--network-kwargs",
                           '{"stem_width": 4, "widths": [8], "depths": [1]}'], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["network_kwargs"] == {
        "stem_width": 4, "widths": [8], "depths": [1]}
    from medimb.networks import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "run" / "final.pt")
    assert model.config["widths"] == [8] and model.config["stem_width"] == 4
    for bad, message in (('{"width": [8]}', "do not fit --network cpunet"),
                         ('{"num_classes": 3}', "do not fit --network cpunet")):
        code, _, err = _train([*base, "--out", tmp_path / "bad", "--network-kwargs", bad], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):  # argparse: not JSON / not an object
        main(["train", *map(str, base), "--out", str(tmp_path / "bad"), "--network-kwargs", "[8]"])
    assert "expected a JSON object" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": (0, 1, 0, 1, 0, 2), "num_classes": 2}, "label 2 .*outside the class range 0..1"),
        ({"labels": (0, 1, 0, 1, 1, 1)}, "split 'val' contains only class 1"),
        ({"nan_item": 1}, "s1_c0.nii.gz: image contains 1 NaN"),
    ],
)
def test_bad_data_gives_one_line_error(tmp_path, capsys, kwargs, message):
    import re

    path = _datalist(tmp_path, **kwargs)
    code, _, err = _train(["--data", path, "--method", "ce", "--out", tmp_path / "run", "--epochs", 1,
                           "--device", "cpu", "--no-progress", "--spatial-size", 8], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("medimb train: error:") and re.search(message, line), err
    assert "Traceback" not in err


def test_missing_path_and_mismatched_channels(tmp_path, capsys):
    path = _datalist(tmp_path, channels=2)
    data = json.loads(path.read_text())
    data["test"][0]["image"] = data["test"][0]["image"][:1]
    path.write_text(json.dumps(data))
    code, _, err = _train(["--data", path, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2 and "mismatched channels" in err
    data["test"][0]["image"] = ["gone.nii.gz", "gone2.nii.gz"]
    path.write_text(json.dumps(data))
    code, _, err = _train(["--data", path, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2 and "image file does not exist" in err and "gone.nii.gz" in err
    code, _, err = _train(["--data", tmp_path / "nope.json", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "--data does not exist" in err
    code, _, err = _train(["--data", path, "--out", tmp_path / "empty", "--resume"], capsys)
    assert code == 2 and "no previous run" in err


def _run(cmd: list, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)  # ~1 min on an idle 2-core machine; 9 min measured at load average 14
def test_synthetic_archive_end_to_end_learns_above_chance(tmp_path):
    """medimb-prep synth -> convert -> datalist -> medimb train, DCE phases as channels.

    "Learns" is judged on the training split through the saved checkpoint (rebuilt with its own
    ``preprocessing``, as explain/evaluation do): a handful of validation/test cases is too few to
    judge generalisation reliably in a test.
    """
    import torch
    from sklearn.metrics import roc_auc_score

    from medimb.data import build_eval_transforms, load_datalist
    from medimb.networks import load_checkpoint, predict_proba

    prep = shutil.which("medimb-prep", path=str(BIN)) or shutil.which("medimb-prep")
    if prep is None:
        pytest.skip("medimb-prep is not installed")
    _run([prep, "synth", "arc", "--cases", 24, "--matrix", 16, "--slices", 8, "--post-phases", 2,
          "--positive-fraction", 0.5, "--seed", 1], tmp_path)
    _run([prep, "convert", "arc/archive", "conv"], tmp_path)
    _run([prep, "datalist", "conv", "--labels", "arc/labels.csv", "--key", "case", "--val", 0.25, "--test", 0.25],
         tmp_path)
    out = _run([BIN / "medimb", "train", "--data", "conv/datalist.json", "--method", "ce", "--out", "run",
                "--epochs", 12, "--batch-size", 4, "--spatial-size", 16, 16, 8, "--device", "cpu", "--no-progress"],
               tmp_path)
    assert (tmp_path / "run" / "metrics.json").exists(), out
    model, meta = load_checkpoint(tmp_path / "run" / "final.pt")
    assert meta["preprocessing"]["in_channels"] == 3  # pre + 2 post-contrast phases
    tf = build_eval_transforms(meta["preprocessing"])
    train_items = load_datalist(tmp_path / "conv" / "datalist.json")["train"]
    with torch.no_grad():
        x = torch.stack([tf(dict(it))["image"].as_tensor() for it in train_items])
        proba = predict_proba(model, model(x))[:, 1].numpy()
    labels = [it["label"] for it in train_items]
    assert roc_auc_score(labels, proba) > 0.75, out


@pytest.mark.real_data
@pytest.mark.slow
def test_breastmnist_three_epochs_beats_chance(tmp_path, capsys):
    path = SHARED / "medmnist" / "breastmnist.npz"
    if not path.exists():
        pytest.skip(f"MedMNIST data not found at {path}")
    # plain CE on the 2D pipeline: 3 epochs give test AUC 0.79 (crt with one short stage 2 gives 0.68-0.73,
    # its re-initialised head needs more than one epoch; the benchmark covers the methods properly)
    code, out, err = _train(["--data", path, "--method", "ce", "--out", tmp_path / "run", "--epochs", 3,
                             "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test"]["auc"] > 0.7, out


def test_operating_point_prior_from_the_command_line(tmp_path, capsys):
    data = tiny_npz(tmp_path / "tiny.npz")
    base = ["--data", data, "--epochs", 1, "--device", "cpu", "--no-progress", "--batch-size", 8]
    code, _, err = _train([*base, "--method", "ce", "--out", tmp_path / "run", "--operating-point", "prior"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["operating_point"]["rule"] == "prior"
    assert metrics["test"]["threshold"] == pytest.approx(metrics["operating_point"]["head_prior"])
    for extra, message in ((["--method", "ce", "--sensitivity", 0.9], "give one"),
                           (["--method", "focal"], "no single class prior")):
        code, _, err = _train([*base, *extra, "--out", tmp_path / "bad", "--operating-point", "prior"], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()  # refused before anything is written
