"""The bundles in MONAI's conventions: the train/infer workflow properties MONAI Label, MONAI Deploy and
federated learning read (``ConfigWorkflow.check_properties``), inference as a ``SupervisedEvaluator`` over
``network_def`` with its checkpoint weights (so swapping ``network_def`` changes what runs), outputs under
``./runs/<bundle>/`` and an inference that refuses to overwrite.

Tiny data (20x18x12 volumes, 16^3 network input) and checkpoints written without training
(:func:`helpers.bundle_checkpoints.bundle_checkpoint`): these check the wiring; the demo measures quality.
"""

from __future__ import annotations

import csv
import json
import os
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.bundle_checkpoints import bundle_checkpoint
from helpers.bundles import BUNDLES, OBLIQUE_AFFINE, make_dataset, run_bundle

BREAST = "breast_dce_cmsl"
METRIC = "imbalanced_two_stage_metric"
#: per bundle: the tiny dataset (num_classes, channels) and the config overrides that fit it
SETUPS = {
    BREAST: (dict(num_classes=2, channels=4), dict(spatial_size=[16, 16, 16])),
    METRIC: (dict(num_classes=3, channels=1, per_class=(6, 4, 4)), dict(spatial_size=[16, 16, 16], num_classes=3,
                                                                         num_channels=1)),
}


def _configs(bundle: str, *names: str) -> list[str]:
    return [str(BUNDLES / bundle / "configs" / n) for n in names]


def _setup(bundle: str, tmp_path, stage1: bool = False) -> dict:
    """Tiny dataset + ``models/model.pt`` (and ``model_stage1.pt``); returns the common overrides."""
    data_kwargs, overrides = SETUPS[bundle]
    data = make_dataset(tmp_path / "data", affine=OBLIQUE_AFFINE, **data_kwargs)
    common = dict(dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"), device="cpu", **overrides)
    train_ids = {k: v for k, v in common.items() if k != "ckpt_dir"}
    bundle_checkpoint(bundle, tmp_path / "models" / "model.pt", **train_ids)
    if stage1:
        bundle_checkpoint(bundle, tmp_path / "models" / "model_stage1.pt", seed=1, **train_ids)
    return common


def _infer_ids(common: dict) -> dict:
    """The overrides inference.json takes (it has no spatial_size: the checkpoint's preprocessing decides)."""
    return {k: v for k, v in common.items() if k != "spatial_size"}


def _workflow(files: list[str], workflow_type: str, **overrides):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=files, workflow_type=workflow_type, logging_file=False, **overrides)
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("bundle", [BREAST, METRIC])
def test_train_and_infer_workflows_have_every_required_monai_property(bundle, tmp_path):
    common = _setup(bundle, tmp_path, stage1=True)
    for files in (["train.json"], ["train.json", "train_stage2.json"]):
        workflow = _workflow(_configs(bundle, *files), "train", output_dir=str(tmp_path / "runs"), **common)
        assert workflow.check_properties() == [], files  # [] = nothing missing, no optional id mis-wired
        # train#inferer is the one the trainer runs (forward_all: logits and embedding for the losses)
        assert workflow.trainer.inferer is workflow.train_inferer
    infer = _workflow(_configs(bundle, "inference.json"), "infer", output_dir=str(tmp_path / "inference"),
                      **_infer_ids(common))
    assert infer.check_properties() == []
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointLoader

    assert isinstance(infer.evaluator, SupervisedEvaluator)
    assert infer.evaluator.network is infer.network_def  # network_def itself runs, not a second model
    assert infer.evaluator.inferer is infer.inferer and infer.dataset.transform is infer.preprocessing
    assert isinstance(infer.handlers[0], CheckpointLoader)


def test_bundle_inference_equals_medimb_explain_on_the_same_checkpoint(tmp_path):
    """The evaluator's prediction and the writer's overlays are what ``medimb explain`` writes for the same
    checkpoint and cases: network_def really got the checkpoint's weights (random weights would differ)."""
    from monai.bundle import run

    from medimb.explain.inputs import resolve_items, validation_items
    from medimb.explain.pipeline import run_explain
    from medimb.explain.settings import ExplainSettings
    from medimb.networks import load_checkpoint

    common = _setup(BREAST, tmp_path)
    out = tmp_path / "bundle_inference"
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(out),
        explain_methods=["coam", "gradcam"], previews=False, **_infer_ids(common))
    datalist = os.path.join(common["dataset_dir"], "datalist.json")
    model, meta = load_checkpoint(tmp_path / "models" / "model.pt", needs_preprocessing=True)
    cli = tmp_path / "cli"
    run_explain(model, meta, resolve_items(datalist, "test"), cli,
                ExplainSettings(methods=["coam", "gradcam"], previews=False), progress=False,
                checkpoint_name="model.pt", calibration_items=validation_items(datalist))
    ours, theirs = (list(csv.DictReader((d / "predictions.csv").open())) for d in (out, cli))
    assert len(ours) == 3 and [r["case"] for r in ours] == [r["case"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert a["predicted"] == b["predicted"]
        np.testing.assert_allclose(float(a["prob_malignant"]), float(b["prob_malignant"]), atol=1e-5)
    for method in ("coam", "gradcam"):
        name = f"{ours[0]['case']}_{method}_on-ch1.nii.gz"
        np.testing.assert_allclose(nib.load(str(out / name)).get_fdata(), nib.load(str(cli / name)).get_fdata(),
                                   atol=1e-4)
    assert {"explain.json", "load_in_slicer.py", "predictions.csv"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".bundle_inference")]  # staging removed


def test_network_def_swap_to_torchscript_and_a_mismatch(tmp_path):
    """The documented swap: a traced TorchScript file as network_def gives the same predictions (no overlays:
    it has no feature map to explain); a network_def that does not fit the checkpoint is one clear line."""
    from monai.bundle import run

    from medimb.bundle import BundleInputError
    from medimb.networks import load_checkpoint

    common = _setup(BREAST, tmp_path)
    model, meta = load_checkpoint(tmp_path / "models" / "model.pt")
    shape = (1, 4, *meta["preprocessing"]["spatial_size"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, torch.zeros(shape)), str(tmp_path / "model.ts"))
    ids = _infer_ids(common)
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(tmp_path / "py"),
        explain_methods=[], **ids)
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(tmp_path / "ts"),
        network_def=f"$torch.jit.load({str(tmp_path / 'model.ts')!r})", explain_methods=[],
        **{"handlers#0#_disabled_": True}, **ids)
    py, ts = ((tmp_path / d / "predictions.csv").read_text() for d in ("py", "ts"))
    assert py == ts and len(py.splitlines()) == 4
    assert not list((tmp_path / "ts").glob("*.nii.gz"))  # predictions only
    with pytest.raises(BundleInputError, match=r"network_def does not match .*model\.pt \(weights .* differ\)"):
        run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(tmp_path / "w"),
            **{"network_def#widths": [8, 16]}, **ids)
    with pytest.raises(BundleInputError, match=r"network_def does not match .*\(configs differ\)"):
        run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(tmp_path / "s"),
            cmsl_scale=30.0, **ids)  # no weight changes, but other logits: refused too


def test_inference_refuses_a_non_empty_output_unless_overwrite(tmp_path):
    from monai.bundle import run

    common = _setup(BREAST, tmp_path)
    out = tmp_path / "inference"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run")
    args = [f"--{k}" for k in ("dataset_dir", "ckpt_dir", "output_dir")]
    result = run_bundle(BREAST, ["inference.json"], args[0], common["dataset_dir"], args[1], common["ckpt_dir"],
                        args[2], str(out), "--device", "cpu", "--overwrite", "false", cwd=tmp_path)  # a string
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"medimb bundle: error: output_dir {out} is not empty; pass --overwrite true to replace it, or another "
        "--output_dir")
    assert (out / "earlier.txt").read_text() == "an earlier run"
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(out), overwrite="true",
        explain_methods=[], previews=False, **_infer_ids(common))
    assert not (out / "earlier.txt").exists() and (out / "predictions.csv").is_file()


@pytest.mark.parametrize("bundle", [BREAST, METRIC])
def test_outputs_default_to_a_run_folder_under_the_working_directory(bundle, tmp_path, monkeypatch):
    """Not inside configs/ or the bundle: ./runs/<bundle>/{stage1,stage2,evaluation,inference}; the device."""
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / bundle

    def parsed(files: list[str], ids: list[str]) -> list:
        # resolved inside the workflow's initialize step, as `python -m monai.bundle run` does
        workflow = ConfigWorkflow(config_file=_configs(bundle, *files), logging_file=False, workflow_type=None,
                                  initialize=[f"$@{i}" for i in ids])
        return workflow.initialize()

    assert parsed(["train.json"], ["output_dir", "tensorboard_dir"]) == [str(run_dir), str(run_dir / "stage1")]
    assert parsed(["train.json", "train_stage2.json"], ["tensorboard_dir"]) == [str(run_dir / "stage2")]
    assert parsed(["train.json", "evaluate.json"], ["eval_dir"]) == [str(run_dir / "evaluation")]
    assert parsed(["inference.json"], ["output_dir", "overwrite"]) == [str(run_dir / "inference"), False]
    assert parsed(["inference.json"], ["ckpt_path"]) == [str(BUNDLES.resolve() / bundle / "models" / "model.pt")]
    # the device follows CUDA's availability in every workflow (no fixed cpu)
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert parsed(["train.json"], ["device"]) == parsed(["inference.json"], ["device"]) == [device]


def test_inference_takes_a_4d_dce_file_and_keeps_its_split_phases(tmp_path):
    """--datalist may name a 4D DCE NIfTI (as medimb predict takes it): its volumes become the phases the
    checkpoint takes, split into OUTPUT/converted (kept in the output folder), same prediction as the case."""
    from monai.bundle import run

    common = _setup(BREAST, tmp_path)
    ids = _infer_ids(common)
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(tmp_path / "list"),
        explain_methods=[], previews=False, **ids)
    first = next(csv.DictReader((tmp_path / "list" / "predictions.csv").open()))
    item = json.loads((tmp_path / "data" / "datalist.json").read_text())["test"][0]
    phases = [nib.load(str(tmp_path / "data" / p)) for p in item["image"]]
    nib.save(nib.Nifti1Image(np.stack([np.asarray(p.dataobj) for p in phases], -1), phases[0].affine),
             str(tmp_path / "dce4d.nii.gz"))
    out = tmp_path / "four"
    run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(out),
        datalist=str(tmp_path / "dce4d.nii.gz"), explain_methods=["coam"], previews=False, **ids)
    row = next(csv.DictReader((out / "predictions.csv").open()))
    assert row["case"] == "dce4d" and row["predicted"] == first["predicted"]
    np.testing.assert_allclose(float(row["prob_malignant"]), float(first["prob_malignant"]), atol=1e-5)
    assert len(list((out / "converted").rglob("*.nii.gz"))) == 4  # the split phases the overlays refer to
    heat = [p for p in out.glob("dce4d_coam_on-*.nii.gz") if "_label" not in p.name]
    assert len(heat) == 1 and nib.load(str(heat[0])).shape == phases[0].shape


def test_a_failed_inference_leaves_no_output_and_no_staging_folder(tmp_path):
    """A case that cannot be read ends the run; the overlay folder is staged, so nothing half-written stays."""
    from monai.bundle import run

    common = _setup(BREAST, tmp_path)
    item = json.loads((tmp_path / "data" / "datalist.json").read_text())["test"][-1]
    (tmp_path / "data" / item["image"][1]).write_bytes(b"not a NIfTI file")  # the last case, read last
    out = tmp_path / "runs" / "inference"
    with pytest.raises(Exception):  # noqa: B017 - MONAI wraps the reader's error; what matters is what is left
        run(config_file=_configs(BREAST, "inference.json"), logging_file=False, output_dir=str(out),
            explain_methods=["coam"], previews=False, **_infer_ids(common))
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []
