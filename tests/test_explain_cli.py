"""``medimb explain`` end to end on tiny NIfTI files: outputs, predictions, Slicer loader, bad input."""

from __future__ import annotations

import csv
import gzip
import json
import py_compile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers.explain import oblique_affine
from helpers.nifti import write_datalist, write_nifti
from test_explain_slicer import composite, read_mrb, run_loader

from medimb.cli import main
from medimb.data.transforms import Preprocessing
from medimb.networks import create_model, read_checkpoint_file, save_checkpoint, write_checkpoint_file

PRE = Preprocessing(spatial_size=(24, 24, 24), pixdim=(2.0, 2.0, 2.0), intensity="zscore").to_dict()


def make_checkpoint(path: Path, head: str = "cmsl", in_channels: int = 1) -> Path:
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=in_channels, num_classes=2, head=head, widths=(4, 8),
                         depths=(1, 1))
    pre = dict(PRE, in_channels=in_channels)
    return save_checkpoint(path, model, preprocessing=pre, class_names=["benign", "malignant"], method="test",
                           epoch=0)


def _bright_block(rng, label, channels, shape):
    """Uniform noise with a block 3 brighter in the middle (where the explanation should look)."""
    data = rng.random((channels, *shape)).astype(np.float32)
    data[:, 8:12, 6:10, 4:7] += 3.0
    return data, None


def write_scans(root: Path, n: int = 2) -> tuple[Path, list[Path]]:
    """``n`` oblique scans ``root/scans/scan-{i}.nii.gz`` and ``root/datalist.json`` listing them as the test
    split (labels alternating, no subject: cases are named after their files); returns (datalist, scans)."""
    datalist = write_datalist(root, [i % 2 for i in range(n)], shape=(20, 18, 10), volume=_bright_block,
                              affine=oblique_affine(spacing=(1.2, 1.4, 3.0)), scanner_codes=True,
                              splits={"test": range(n)}, case="scan-{i}", image="scans/{case}.nii.gz",
                              subject=None, image_list=False)
    return datalist, [root / "scans" / f"scan-{i}.nii.gz" for i in range(n)]


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    ckpt = make_checkpoint(root / "model.pt")
    datalist, scans = write_scans(root)
    out = root / "out"
    rc = main(["explain", "--checkpoint", str(ckpt), "--data", str(datalist), "--out", str(out),
               "--methods", "coam,gradcam,cam"])
    assert rc == 0
    return root, out, scans


def test_writes_every_output_on_the_source_grid(explained):
    _, out, scans = explained
    for scan in scans:
        case = scan.name[: -len(".nii.gz")]
        for method in ("coam", "gradcam", "cam"):
            heat, label = out / f"{case}_{method}_on-ch0.nii.gz", out / f"{case}_{method}_on-ch0_label.nii.gz"
            src_img, heat_img = sitk.ReadImage(str(scan)), sitk.ReadImage(str(heat))
            assert heat_img.GetSize() == src_img.GetSize()
            np.testing.assert_allclose(heat_img.GetOrigin(), src_img.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(heat_img.GetDirection(), src_img.GetDirection(), atol=1e-6)
            values = np.asarray(nib.load(str(heat)).dataobj)
            assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1
            mask = np.asarray(nib.load(str(label)).dataobj)
            assert mask.dtype == np.uint8
            np.testing.assert_array_equal(mask, (values >= 0.5).astype(np.uint8))
            assert (out / "previews" / f"{case}_{method}_on-ch0.png").stat().st_size < 200_000
    assert not list(out.parent.glob(".out.partial-*"))


def test_predictions_csv_and_index(explained):
    _, out, scans = explained
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case"] for r in rows] == ["scan-0", "scan-1"]
    assert [r["label"] for r in rows] == ["0", "1"]
    for r in rows:
        probs = [float(r["prob_benign"]), float(r["prob_malignant"])]
        assert abs(sum(probs) - 1) < 1e-4
        assert int(r["predicted"]) == int(np.argmax(probs))
        assert r["predicted_name"] == ["benign", "malignant"][int(r["predicted"])]
    index = (out / "index.html").read_text()
    assert "scan-0" in index and "previews/scan-1_gradcam_on-ch0.png" in index and "malignant" in index


def test_slicer_loader_compiles_and_shows_one_case_scene_at_a_time(explained, monkeypatch):
    root, out, scans = explained
    script = out / "load_in_slicer.py"
    py_compile.compile(str(script), doraise=True)
    calls: list = []
    ns = run_loader(script, monkeypatch, calls)
    assert [c for c in calls if c[0] == "loadScene"] == [("loadScene", str((out / "scan-0.mrb").resolve()))]
    tag = json.loads((out / "explain.json").read_text())["background"]["name"]
    assert composite(ns) == {"backgroundVolume": f"scan-0 {tag}", "foregroundVolume": "scan-0 coam"}
    assert ns["next_case"]() == "scan-1"
    names = [n.GetName() for n in ns["slicer"].mrmlScene.nodes if n.tag == "Volume"]
    assert sorted(names) == sorted(["scan-1 cam", f"scan-1 {tag}", "scan-1 coam", "scan-1 gradcam",
                                    "the user's own scan"])
    # the background in the scene is the scan explain drew on, voxel for voxel
    _, files, folder = read_mrb(out / "scan-1.mrb")
    background = nib.Nifti1Image.from_bytes(gzip.decompress(files[f"{folder}/Data/background.nii.gz"]))
    np.testing.assert_array_equal(np.asarray(background.dataobj), np.asarray(nib.load(str(scans[1])).dataobj))


def test_folder_input_and_refusal_to_overwrite(explained, capsys):
    root, out, _ = explained
    before = sorted(p.name for p in out.iterdir())
    rc = main(["explain", "--checkpoint", str(root / "model.pt"), "--data", str(root / "scans"),
               "--out", str(out), "--methods", "coam", "--no-previews"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    out2 = root / "out_folder"
    assert main(["explain", "--checkpoint", str(root / "model.pt"), "--data", str(root / "scans"),
                 "--out", str(out2), "--methods", "coam", "--no-previews"]) == 0
    assert sorted(p.name for p in out2.iterdir()) == [
        "explain.json", "load_in_slicer.py", "predictions.csv", "scan-0.mrb", "scan-0_coam_on-ch0.nii.gz",
        "scan-0_coam_on-ch0_label.nii.gz", "scan-1.mrb", "scan-1_coam_on-ch0.nii.gz",
        "scan-1_coam_on-ch0_label.nii.gz"]
    out3 = root / "out_no_scenes"  # --no-scenes: the overlays without the Slicer scenes and their loader
    assert main(["explain", "--checkpoint", str(root / "model.pt"), "--data", str(root / "scans"),
                 "--out", str(out3), "--methods", "coam", "--no-previews", "--no-scenes"]) == 0
    assert sorted(p.name for p in out3.iterdir()) == [
        "explain.json", "predictions.csv", "scan-0_coam_on-ch0.nii.gz", "scan-0_coam_on-ch0_label.nii.gz",
        "scan-1_coam_on-ch0.nii.gz", "scan-1_coam_on-ch0_label.nii.gz"]


def _run_error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "model.pt")
    _, scans = write_scans(tmp_path, n=1)
    out = tmp_path / "out"
    base = ["explain", "--checkpoint", str(ckpt), "--out", str(out), "--methods", "coam"]

    (tmp_path / "empty").mkdir()
    assert "no .nii or .nii.gz files" in _run_error([*base, "--data", str(tmp_path / "empty")], capsys)

    # weights of another architecture under this config (with a valid checksum: the weights are the problem)
    other = create_model("cpunet", in_channels=1, num_classes=2, head="cmsl", widths=(4, 16), depths=(1, 1))
    payload = read_checkpoint_file(ckpt)
    payload["model"] = other.state_dict()
    write_checkpoint_file(tmp_path / "mismatch.pt", payload)
    err = _run_error(["explain", "--checkpoint", str(tmp_path / "mismatch.pt"), "--out", str(out),
                      "--data", str(scans[0])], capsys)
    assert "weights do not match the stored config" in err and "Traceback" not in err

    # a two-channel item for a one-channel model
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"test": [{"image": [f"scans/{scans[0].name}", f"scans/{scans[0].name}"]}]}))
    assert "channel" in _run_error([*base, "--data", str(two)], capsys)

    # a 4D (two-volume) NIfTI for a model trained on one 3D image series: the error says what it takes
    payload = read_checkpoint_file(ckpt)
    payload["preprocessing"]["channels"] = ["image"]
    write_checkpoint_file(tmp_path / "image.pt", payload)
    four_d = tmp_path / "four_d.nii.gz"
    write_nifti(four_d, np.zeros((8, 8, 8, 2)))
    assert _run_error(["explain", "--checkpoint", str(tmp_path / "image.pt"), "--out", str(out), "--data",
                       str(four_d)], capsys).strip() == (
        "medimb explain: error: case four_d: the model takes 1 image (a 3D series); found a 4D file of 2 volumes "
        "(phase-00..phase-01)")

    assert "gradcan" in _run_error([*base, "--data", str(scans[0]), "--methods", "gradcan"], capsys)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("backbone", ["slice_pool", "slice_channels"])
def test_explains_2p5d_checkpoints_on_the_slab(tmp_path, backbone):
    """2.5D models see a slab of K adjacent slices: every method's overlay is on the source grid,
    non-zero only on those K slices (the central ones)."""
    torch.manual_seed(0)
    kwargs = {"encoder_kwargs": {"widths": (4, 8), "depths": (1, 1)}}
    if backbone == "slice_channels":
        kwargs["num_slices"] = 3
    model = create_model(backbone, in_channels=1, num_classes=2, head="linear", **kwargs)
    pre = Preprocessing(spatial_size=(24, 24, 3), pixdim=(2.0, 2.0, 0.0), slices=3).to_dict()
    ckpt = save_checkpoint(tmp_path / "m.pt", model, preprocessing=pre, class_names=["a", "b"], method="t",
                           epoch=0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    data = np.random.default_rng(0).random((20, 18, 9)).astype(np.float32)
    data[8:12, 6:10, 3:6] += 3.0  # the central 3 slices are 3, 4, 5
    write_nifti(tmp_path / "scan.nii.gz", data, affine, scanner_codes=True)
    out = tmp_path / "out"
    assert main(["explain", "--checkpoint", str(ckpt), "--data", str(tmp_path / "scan.nii.gz"), "--out", str(out),
                 "--methods", "coam,gradcam,cam"]) == 0
    for method in ("coam", "gradcam", "cam"):
        heat = np.asarray(nib.load(str(out / f"scan_{method}_on-ch0.nii.gz")).dataobj)
        assert heat.shape == data.shape
        outside = np.delete(heat, [3, 4, 5], axis=2)
        assert outside.max() == 0 and heat[:, :, 3:6].max() > 0.5, method
