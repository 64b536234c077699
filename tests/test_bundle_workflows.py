"""Bundle workflows: `python -m monai.bundle run` as a user runs it (a subprocess, for the command line
and its overrides) and `monai.bundle.run(...)`, the function that command calls (in-process, to keep the
suite fast: every subprocess pays ~10 s of CPU importing torch and MONAI).

Tiny data (20x18x12 volumes, 16^3 network input, 1 epoch): these check the wiring, the command-line
overrides and the outputs, not accuracy (the demo and the benchmarks do that).
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.bundles import BUNDLES, make_dataset, run_bundle

BREAST = "breast_dce_cmsl"
METRIC = "imbalanced_two_stage_metric"
TINY = ("--spatial_size", "[16,16,16]", "--batch_size", "4")


def run_inprocess(bundle: str, configs: list[str], **overrides) -> None:
    """``monai.bundle.run`` (what ``python -m monai.bundle run`` calls), without a new interpreter."""
    from monai.bundle import run

    files = [str(BUNDLES / bundle / "configs" / c) for c in configs]
    run(config_file=files, logging_file=False, **overrides)


def _ok(result, what: str) -> str:
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed:\n{log[-4000:]}"
    return log


@pytest.mark.slow
def test_breast_bundle_train_stage2_evaluate_inference(tmp_path):
    data = make_dataset(tmp_path / "data", channels=4)
    models, evals = tmp_path / "models", tmp_path / "eval"
    common = ("--dataset_dir", str(data), "--ckpt_dir", str(models), "--output_dir", str(evals), "--device", "cpu")
    # stage 1; run from tmp_path (not the bundle root): outputs go where the overrides say
    log = _ok(run_bundle(BREAST, ["train.json"], *common, *TINY, "--train#trainer#max_epochs", "1", cwd=tmp_path),
              "stage 1")
    assert "Epoch[1] Complete" in log and "Epoch[2]" not in log  # max_epochs override honoured
    stage1 = torch.load(models / "model_stage1.pt", weights_only=True)
    assert stage1["config"]["head"] == "cmsl" and stage1["config"]["in_channels"] == 4
    assert stage1["preprocessing"]["spatial_size"] == [16, 16, 16] or tuple(stage1["preprocessing"]["spatial_size"]) == (16, 16, 16)
    assert stage1["class_names"] == ["benign", "malignant"]
    assert stage1["head_prior"] is None  # a CMSL head: no single class prior (the "prior" operating point)

    # stage 2 (cRT): backbone bit-identical, classifier re-trained
    inproc = dict(dataset_dir=str(data), ckpt_dir=str(models), output_dir=str(evals), device="cpu")
    run_inprocess(BREAST, ["train.json", "train_stage2.json"], **inproc, spatial_size=[16, 16, 16], batch_size=4,
                  **{"train#trainer#max_epochs": 1})
    stage2 = torch.load(models / "model.pt", weights_only=True)
    backbone = [k for k in stage1["model"] if k.startswith("backbone.")]
    assert backbone and all(torch.equal(stage1["model"][k], stage2["model"][k]) for k in backbone)
    assert not torch.equal(stage1["model"]["classifier.weight"], stage2["model"]["classifier.weight"])
    assert stage2["method"] == "cmsl-stage2-crt" and stage2["head_prior"] == 0.5  # class-balanced cRT
    # TensorBoard events of the two stages in their own folders under the run folder
    for stage in ("stage1", "stage2"):
        assert list((evals / stage).glob("events.out.tfevents.*")), stage

    # evaluation: the evaluation output of medimb train/evaluate (metrics.json, predictions.csv, plots/test/)
    run_inprocess(BREAST, ["train.json", "evaluate.json"], **inproc)
    evaluation = evals / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert set(metrics) >= {"test", "class_names"} and metrics["test"]["num_samples"] == 3
    for key in ("balanced_accuracy", "auc", "accuracy", "macro_f1", "per_class_recall", "confusion_matrix"):
        assert key in metrics["test"]
    rows = list(csv.DictReader((evaluation / "predictions.csv").open()))
    assert [r["split"] for r in rows] == ["test"] * 3 and all(r["case"].startswith("sub-") for r in rows)
    for png in ("roc.png", "pr.png", "confusion_matrix.png"):
        assert (evaluation / "plots" / "test" / png).stat().st_size > 1000

    # inference: predictions.csv, COAM overlay in the source geometry, label map, Slicer loader
    infer = tmp_path / "inference"
    run_inprocess(BREAST, ["inference.json"], dataset_dir=str(data), ckpt_dir=str(models), output_dir=str(infer))
    rows = list(csv.DictReader((infer / "predictions.csv").open()))
    assert len(rows) == 3 and {"case", "split", "predicted", "predicted_name", "prob_benign", "prob_malignant"} <= set(rows[0])
    datalist = json.loads((data / "datalist.json").read_text())
    source = nib.load(str(data / datalist["test"][0]["image"][0]))
    case = rows[0]["case"]
    # the overlay names the input it is drawn on: the first post-contrast phase (channel 1) of a DCE model
    heat = nib.load(str(infer / f"{case}_coam_on-ch1.nii.gz"))
    label = nib.load(str(infer / f"{case}_coam_on-ch1_label.nii.gz"))
    for overlay in (heat, label):
        assert overlay.shape == source.shape
        np.testing.assert_allclose(overlay.affine, source.affine, atol=1e-4)
    assert (infer / "load_in_slicer.py").is_file() and (infer / "index.html").is_file()


def test_missing_dataset_dir_is_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_bundle(BREAST, ["train.json"], "--dataset_dir", str(missing), cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medimb bundle: error: dataset_dir") and str(missing) in last
    assert "Traceback" not in result.stderr and "Failed to evaluate" not in result.stderr


def test_wrong_datalist_keys_is_one_clear_line(tmp_path):
    from medimb.bundle import BundleInputError

    data = make_dataset(tmp_path / "data", channels=4, per_class=(4, 4))
    datalist = json.loads((data / "datalist.json").read_text())
    datalist["training"] = [{"img": it["image"], "label": it["label"]} for it in datalist["training"]]
    (data / "datalist.json").write_text(json.dumps(datalist))
    with pytest.raises(BundleInputError, match=r"items need keys 'image' and 'label', got \['img', 'label'\]"):
        run_inprocess(BREAST, ["train.json"], dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


def test_metric_bundle_three_classes_2p5d_lws(tmp_path):
    """imbalanced_two_stage_metric: 3 imbalanced classes, 1 channel, 2.5D switch, LWS stage 2."""
    data = make_dataset(tmp_path / "data", num_classes=3, channels=1, per_class=(8, 4, 4))
    models, evals = tmp_path / "models", tmp_path / "eval"
    common = dict(dataset_dir=str(data), ckpt_dir=str(models), output_dir=str(evals), device="cpu",
                  num_classes=3, input_mode="2.5d")
    tiny = dict(spatial_size=[12, 16, 16], batch_size=4, **{"train#trainer#max_epochs": 1})
    run_inprocess(METRIC, ["train.json"], **common, **tiny)
    stage1 = torch.load(models / "model_stage1.pt", weights_only=True)
    assert stage1["config"]["name"] == "slice_pool" and stage1["config"]["num_classes"] == 3
    # the one 2.5D mechanism: a slab of adjacent axial slices, as medimb train --slices
    assert stage1["preprocessing"]["slices"] == 32 and stage1["preprocessing"]["orientation"] == "RAS"  # registered K
    run_inprocess(METRIC, ["train.json", "train_stage2.json"], **common, **tiny, rebalance="lws")
    stage2 = torch.load(models / "model.pt", weights_only=True)
    assert stage2["config"]["head"] == "lws" and stage2["method"] == "two-stage-metric-stage2-lws"
    assert stage1["head_prior"] is None and stage2["head_prior"] is None  # three classes: no threshold
    run_inprocess(METRIC, ["train.json", "evaluate.json"], **common)
    metrics = json.loads((evals / "evaluation" / "metrics.json").read_text())
    assert len(metrics["test"]["per_class_recall"]) == 3 and metrics["class_names"] == ["0", "1", "2"]
    infer = tmp_path / "inference"
    # inference runs network_def: the LWS head and the 2.5D network of the checkpoint, named by overrides
    run_inprocess(METRIC, ["inference.json"], dataset_dir=str(data), ckpt_dir=str(models), output_dir=str(infer),
                  num_classes=3, input_mode="2.5d", head="lws", explain_methods=["coam"], previews=False,
                  scenes=False)
    rows = list(csv.DictReader((infer / "predictions.csv").open()))
    assert len(rows) == 4 and {"prob_0", "prob_1", "prob_2"} <= set(rows[0])
    assert len(list(infer.glob("*_coam_on-ch0.nii.gz"))) == 4  # a one-channel model: its only channel
    assert not list(infer.glob("*.mrb")) and not (infer / "load_in_slicer.py").exists()  # --scenes false
