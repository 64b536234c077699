"""`verify_net_in_out` and `ckpt_export` on both bundles (in-process: the functions the CLI calls)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers.bundles import BUNDLES

from medimb.networks import save_checkpoint


@pytest.mark.parametrize(
    "bundle,overrides",
    [("breast_dce_cmsl", {}), ("imbalanced_two_stage_metric", {}),
     ("imbalanced_two_stage_metric", {"input_mode": "2.5d"})],
)
def test_bundle_networks_match_their_declared_input_and_output_format(bundle, overrides, monkeypatch):
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(BUNDLES / bundle)
    verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                      device="cpu", **overrides)  # raises on a channel or dtype mismatch


def test_network_with_another_class_count_fails_the_format_check(monkeypatch):
    from monai.bundle import verify_net_in_out

    monkeypatch.chdir(BUNDLES / "breast_dce_cmsl")
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_def", meta_file="configs/metadata.json",
                          config_file="configs/inference.json", device="cpu", num_classes=3)


@pytest.mark.parametrize("bundle", ["breast_dce_cmsl", "imbalanced_two_stage_metric"])
def test_ckpt_export_traced_matches_pytorch(bundle, tmp_path, monkeypatch):
    """The models' Python-side checks (config dicts, f-string errors) cannot be scripted, so the documented
    export is ``--use_trace True --input_shape``; the TorchScript file must give the PyTorch outputs."""
    from monai.bundle import ConfigParser, ckpt_export

    monkeypatch.chdir(BUNDLES / bundle)
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.read_meta("configs/metadata.json")
    model = parser.get_parsed_content("network_def")
    meta = parser.get("_meta_")["network_data_format"]["inputs"]["image"]
    shape = [1, meta["num_channels"], *meta["spatial_shape"]]
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        model(torch.randn(4, *shape[1:]))
    model.eval()
    ckpt = save_checkpoint(tmp_path / "model.pt", model, preprocessing={}, class_names=[], method="test", epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                    meta_file="configs/metadata.json", config_file="configs/inference.json", key_in_ckpt="model",
                    use_trace=True, input_shape=shape)
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    x = torch.randn(3, *shape[1:])  # another batch size than the trace
    with torch.no_grad():
        expected, got = model(x), exported(x)
    assert got.shape == (3, model.config["num_classes"])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
