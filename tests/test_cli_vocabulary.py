"""One CLI vocabulary: --version, the shared options on every torch command, device errors, quiet libraries."""

from __future__ import annotations

import logging
import warnings

import pytest

from medimb import __version__
from medimb.cli import build_parser, main


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"medimb {__version__}"


@pytest.mark.parametrize("command", ["train", "evaluate", "explain"])
def test_every_torch_command_takes_device_and_no_progress(command):
    parser = build_parser()
    required = {"train": ["--data", "d", "--out", "o"], "evaluate": ["--checkpoint", "c", "--data", "d", "--out", "o"],
                "explain": ["--checkpoint", "c", "--data", "d", "--out", "o"]}[command]
    args = parser.parse_args([command, *required, "--device", "cpu", "--no-progress"])
    assert args.device == "cpu" and args.no_progress is True
    if command != "explain":  # explain works one case at a time: no loader workers
        assert parser.parse_args([command, *required, "-j", "3"]).workers == 3


def test_split_names_are_the_datalists_everywhere():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o"])
    assert args.splits == ["validation", "test"]
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--checkpoint", "c", "--data", "d", "--out", "o", "--splits", "val"])
    args = parser.parse_args(["explain", "--checkpoint", "c", "--data", "d", "--out", "o", "--splits", "training"])
    assert args.splits == ["training"]


def test_cuda_device_on_a_cpu_machine_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--device", "cuda:1"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "medimb evaluate: error: --device cuda:1: CUDA is not available on this machine")


def test_library_noise_is_quiet_but_other_warnings_still_show(caplog):
    from medimb.runtime import quiet_library_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_library_warnings()
        warnings.warn_explicit("nvImageCodec codec probe", UserWarning, "x.py", 1, module="monai.data.image_reader")
        warnings.warn("a warning about the user's run", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning about the user's run"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning(
            "nvImageCodec is not available; skipping pydicom decoder plugin registration.")
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
