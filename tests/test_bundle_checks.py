"""medimb.bundle: bundle root resolution, the one-line input checks and the one-line user-error hook."""

from __future__ import annotations

import json

import pytest
from helpers.bundles import BUNDLES, make_dataset

from medimb import bundle
from medimb.bundle import BundleInputError


def test_bundle_root_comes_from_the_running_config_not_the_working_directory(tmp_path, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.chdir(tmp_path)
    bundle = BUNDLES / "breast_dce_cmsl"
    # resolved inside the workflow's initialize step, as `python -m monai.bundle run` does
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), logging_file=False,
                              workflow_type=None, initialize=["$@bundle_root", "$@ckpt_dir"])
    assert workflow.initialize() == [str(bundle.resolve()), str(bundle.resolve() / "models")]


def test_config_folder_is_read_from_the_config_file_argument():
    argv = ["-m", "monai.bundle", "run", "--config_file", "['/x/b/configs/train.json','/x/b/configs/s2.json']"]
    assert str(bundle._config_root_from_argv(argv)) == "/x/b/configs"
    assert str(bundle._config_root_from_argv(["--config_file=/y/configs/a.json"])) == "/y/configs"
    assert bundle._config_root_from_argv(["run"]) is None


def test_bad_bundle_inputs_are_one_line_errors_saying_what_is_wrong(tmp_path):
    data = make_dataset(tmp_path / "data", channels=4, per_class=(4, 4))
    datalist = str(data / "datalist.json")
    assert bundle.check_inputs(str(data), datalist, num_channels=4, num_classes=2)
    with pytest.raises(BundleInputError, match="does not exist or is not a folder"):
        bundle.check_inputs(str(tmp_path / "missing"), datalist)
    with pytest.raises(BundleInputError, match="items have 4 image.*expects 3"):
        bundle.check_inputs(str(data), datalist, num_channels=3)
    with pytest.raises(BundleInputError, match="outside the class range"):
        bundle.check_inputs(str(data), datalist, num_classes=1)
    broken = json.loads((data / "datalist.json").read_text())
    del broken["validation"]
    (data / "datalist.json").write_text(json.dumps(broken))
    with pytest.raises(BundleInputError, match="no \\['validation'\\] split"):
        bundle.check_inputs(str(data), datalist)


def test_missing_checkpoint_exits_with_one_line_naming_the_stage_and_file(tmp_path):
    """A SystemExit with the message as its code: `python -m monai.bundle run` prints exactly this line."""
    missing = tmp_path / "none.pt"
    expected = r"^medimb bundle: error: stage 1 checkpoint .*none\.pt does not exist; run the earlier bundle"
    with pytest.raises(SystemExit, match=expected) as info:
        bundle.check_checkpoint(str(missing), "stage 1")
    assert isinstance(info.value, BundleInputError)
    assert str(info.value.code) == str(info.value) and "\n" not in str(info.value.code)
    missing.write_bytes(b"")
    assert bundle.check_checkpoint(str(missing), "stage 1") is True  # present: no error


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


def test_yes_no_overrides_arrive_as_strings_and_false_means_false():
    """`--overwrite false` reaches the config as the string "false" (python-fire), which must not count as true."""
    for value in (True, "true", "True", "yes", 1, "1"):
        assert bundle.flag(value) is True
    for value in (False, "false", "FALSE", "no", 0, "0", None):
        assert bundle.flag(value) is False
    with pytest.raises(BundleInputError, match=r"--overwrite 'maybe': pass true or false"):
        bundle.flag("maybe", "overwrite")
