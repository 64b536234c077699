"""medimb.bundle: bundle root resolution, the one-line input checks and the one-line user-error hook."""

from __future__ import annotations

import json

import pytest
from test_bundle_helpers import BUNDLES, make_dataset

from medimb import bundle as bundle_utils
from medimb.bundle import BundleInputError


def test_bundle_root_comes_from_the_running_config_not_the_working_directory(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    bundle = BUNDLES / "breast_dce_cmsl"
    # resolved inside the workflow's initialize step, as `python -m monai.bundle run` does
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), logging_file=False,
                              workflow_type=None, initialize=["$@bundle_root", "$@ckpt_dir"])
    assert workflow.initialize() == [str(bundle.resolve()), str(bundle.resolve() / "models")]


def test_bundle_root_from_command_line():
    argv = ["-m", "monai.bundle", "run", "--config_file", "['/x/b/configs/train.json','/x/b/configs/s2.json']"]
    assert str(bundle_utils._config_root_from_argv(argv)) == "/x/b/configs"
    assert str(bundle_utils._config_root_from_argv(["--config_file=/y/configs/a.json"])) == "/y/configs"
    assert bundle_utils._config_root_from_argv(["run"]) is None


def test_check_inputs(tmp_path):
    data = make_dataset(tmp_path / "data", channels=4, per_class=(4, 4))
    datalist = str(data / "datalist.json")
    assert bundle_utils.check_inputs(str(data), datalist, num_channels=4, num_classes=2)
    with pytest.raises(BundleInputError, match="does not exist or is not a folder"):
        bundle_utils.check_inputs(str(tmp_path / "missing"), datalist)
    with pytest.raises(BundleInputError, match="items have 4 image.*expects 3"):
        bundle_utils.check_inputs(str(data), datalist, num_channels=3)
    with pytest.raises(BundleInputError, match="outside the class range"):
        bundle_utils.check_inputs(str(data), datalist, num_classes=1)
    broken = json.loads((data / "datalist.json").read_text())
    del broken["validation"]
    (data / "datalist.json").write_text(json.dumps(broken))
    with pytest.raises(BundleInputError, match="no \\['validation'\\] split"):
        bundle_utils.check_inputs(str(data), datalist)
    # a SystemExit with the message as its code: `python -m monai.bundle run` prints exactly this line
    try:
        bundle_utils.check_checkpoint(str(tmp_path / "none.pt"), "stage 1")
    except BundleInputError as exc:
        assert isinstance(exc, SystemExit) and str(exc.code).startswith("medimb bundle: error: stage 1 checkpoint")


def test_a_user_error_anywhere_in_a_bundle_run_ends_it_in_one_line(tmp_path):
    """MONAI wraps errors raised in config expressions; the hook finds the UserError in the chain."""
    import subprocess
    import sys

    code = ("import medimb.bundle\n"
            "from medimb.errors import CheckpointError\n"
            "medimb.bundle.report_user_errors()\n"
            "try:\n    raise CheckpointError('model.pt: checksum mismatch')\n"
            "except CheckpointError as exc:\n    raise RuntimeError('Failed to evaluate network') from exc\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == "medimb bundle: error: model.pt: checksum mismatch"
