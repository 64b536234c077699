"""medimb.bundle_utils: bundle root resolution and the one-line input checks."""

from __future__ import annotations

import json

import pytest
from helpers.bundles import BUNDLES, make_dataset

from medimb import bundle_utils
from medimb.bundle_utils import BundleInputError


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
    assert str(bundle_utils._config_root_from_argv(argv)) == "/x/b/configs"
    assert str(bundle_utils._config_root_from_argv(["--config_file=/y/configs/a.json"])) == "/y/configs"
    assert bundle_utils._config_root_from_argv(["run"]) is None


def test_bad_bundle_inputs_are_one_line_errors_saying_what_is_wrong(tmp_path):
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


def test_missing_checkpoint_exits_with_one_line_naming_the_stage_and_file(tmp_path):
    """A SystemExit with the message as its code: `python -m monai.bundle run` prints exactly this line."""
    missing = tmp_path / "none.pt"
    expected = r"^medimb bundle: error: stage 1 checkpoint .*none\.pt does not exist; run the earlier bundle"
    with pytest.raises(SystemExit, match=expected) as info:
        bundle_utils.check_checkpoint(str(missing), "stage 1")
    assert isinstance(info.value, BundleInputError)
    assert str(info.value.code) == str(info.value) and "\n" not in str(info.value.code)
    missing.write_bytes(b"")
    assert bundle_utils.check_checkpoint(str(missing), "stage 1") is True  # present: no error


def test_fit_pixdim_follows_the_orientation(tmp_path):
    data = make_dataset(tmp_path / "data", channels=1, per_class=(2, 2))
    image = str(next(data.rglob("*.nii.gz")))
    ras = bundle_utils.fit_pixdim(image, (16, 16, 16), "RAS")
    sar = bundle_utils.fit_pixdim(image, (16, 16, 16), "SAR")
    assert sar == (ras[2], ras[1], ras[0])
