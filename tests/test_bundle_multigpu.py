"""multi_gpu_train.json and multi_gpu_evaluate.json under torchrun: 2 processes, gloo backend on CPU (what CI can
run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.bundles import BUNDLES, make_dataset


@pytest.mark.slow
def test_two_process_gloo_stage1_and_stage2(tmp_path):
    data = make_dataset(tmp_path / "data", channels=4, per_class=(8, 4))
    models = tmp_path / "models"
    models.mkdir()  # the per-rank files below are written by every rank; only rank 0 creates ckpt_dir itself
    configs = BUNDLES / "breast_dce_cmsl" / "configs"
    # each rank saves the parameters it ends with: equal across ranks only if DDP all-reduced the gradients
    # (the ranks see different shards of the data). BatchNorm running statistics are per rank by design
    # (DDP broadcasts rank 0's buffers at each forward; rank 0 writes the checkpoint), so they are left out.
    finalize = repr([
        "$torch.save({k: v.detach() for k, v in @train_model.named_parameters()}, os.path.join(@ckpt_dir, 'rank%d_%s.pt' % (@dist['rank'], @method)))",
        "$medimb.bundle.report_checkpoint(@ckpt_path)",
        "$medimb.training.distributed.finish_distributed()",
    ])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for stage_configs in (["train.json"], ["train.json", "train_stage2.json"]):
        files = repr([str(configs / c) for c in [*stage_configs, "multi_gpu_train.json"]])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
               "--config_file", files, "--dataset_dir", str(data), "--ckpt_dir", str(models),
               "--output_dir", str(tmp_path / "eval"), "--spatial_size", "[16,16,16]", "--batch_size", "2",
               "--train#trainer#max_epochs", "1", "--finalize", finalize]
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for method, ckpt in (("cmsl-stage1", "model_stage1.pt"), ("cmsl-stage2-crt", "model.pt")):
        r0 = torch.load(models / f"rank0_{method}.pt", weights_only=True)
        r1 = torch.load(models / f"rank1_{method}.pt", weights_only=True)
        assert r0.keys() == r1.keys()
        for key in r0:
            torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=1e-6, msg=f"{method}: {key} differs across ranks")
        assert (models / ckpt).is_file()  # written by rank 0
    stage1 = torch.load(models / "model_stage1.pt", weights_only=True)["model"]
    stage2 = torch.load(models / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("backbone."))
    assert sorted(p.name for p in models.iterdir() if p.name.startswith("model")) == ["model.pt", "model_stage1.pt"]


@pytest.mark.slow
def test_two_process_gloo_evaluation_equals_one_process(tmp_path):
    """multi_gpu_evaluate.json shards the split (DistributedSampler, no padding); rank 0 writes the report of the
    whole split from every rank's outputs, in dataset order: the same files as a one-process evaluation."""
    import json

    from helpers.bundle_checkpoints import bundle_checkpoint
    from monai.bundle import run

    data = make_dataset(tmp_path / "data", channels=4, per_class=(10, 6))  # 5 test cases: uneven shards 3 + 2
    bundle_checkpoint("breast_dce_cmsl", tmp_path / "models" / "model.pt", dataset_dir=str(data),
                      spatial_size=[16, 16, 16])
    configs = BUNDLES / "breast_dce_cmsl" / "configs"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    files = repr([str(configs / c) for c in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
           "--config_file", files, "--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "models"),
           "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run(config_file=[str(configs / c) for c in ("train.json", "evaluate.json")], logging_file=False,
        dataset_dir=str(data), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "one"), device="cpu")
    two, one = tmp_path / "two" / "evaluation", tmp_path / "one" / "evaluation"
    assert (two / "predictions.csv").read_text() == (one / "predictions.csv").read_text()
    assert len((one / "predictions.csv").read_text().splitlines()) == 1 + 5
    m2, m1 = (json.loads((d / "metrics.json").read_text())["test"] for d in (two, one))
    assert m2["confusion_matrix"] == m1["confusion_matrix"] and m2["auc"] == m1["auc"]


def test_interleave_restores_dataset_order_of_uneven_shards():
    from medimb.evaluation.distributed import interleave

    # 5 items on 2 ranks: rank 0 held 0, 2, 4; rank 1 held 1, 3
    assert interleave([torch.tensor([0, 2, 4]), torch.tensor([1, 3])]).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unpadded, unshuffled"):
        interleave([torch.tensor([0, 2]), torch.tensor([1, 3, 5, 7])])
