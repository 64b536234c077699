"""Overlays people would look at: the background under the maps (first post-contrast phase, subtraction), one
map scale across cases calibrated on validation, file names that say which input they are drawn on, and an
index.html sorted by split and probability with the truth outlined."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.explain import BrightSpotNet, oblique_affine
from helpers.nifti import write_datalist, write_nifti
from test_explain_slicer import composite, read_mrb, run_loader

from medimb.cli import main
from medimb.data.transforms import Preprocessing
from medimb.explain.normalize import calibrate_scale, minmax_per_volume, scale_calibrated
from medimb.explain.pipeline import run_explain
from medimb.explain.preview import render_index
from medimb.explain.settings import ExplainSettings, background_channels, background_tag, parse_background
from medimb.networks import create_model, save_checkpoint

PHASES = ["phase-00", "phase-01"]
SPLITS = {"training": [0, 1], "validation": [2, 3], "test": [4, 5]}


def test_background_choices():
    assert background_channels("first-post", 4) == (1,)
    assert background_channels("first-post", 1) == (0,)  # one-channel models: their only channel
    assert background_channels("last", 4) == (3,) and background_channels("last", 1) == (0,)
    assert background_channels("subtraction", 4) == (1, 0)
    assert background_channels(2, 4) == (2,) and background_channels(parse_background("2"), 4) == (2,)
    for bad, channels in (("subtraction", 1), (4, 4), (1, 1)):
        with pytest.raises(ValueError):
            background_channels(bad, channels)
    for bad in ("post", "-1", ""):
        with pytest.raises(ValueError):
            parse_background(bad)
    assert background_tag("first-post", 4, ["phase-00", "phase-01", "phase-02", "phase-03"]) == "phase-01"
    assert background_tag("first-post", 2) == "ch1" and background_tag("first-post", 1) == "ch0"
    assert background_tag("subtraction", 2, PHASES) == "subtraction"
    # names Slicer would open as label maps, or names of the wrong count, are not used
    assert background_tag(0, 2, ["segment_a", "b"]) == "ch0" and background_tag(0, 2, ["a"]) == "ch0"
    assert background_tag("last", 2, ["pre contrast", "post/1"]) == "post-1"


def test_calibrated_scale_keeps_a_weak_map_low():
    strong = [torch.zeros(1, 1, 8, 8, 8) for _ in range(4)]
    for k, m in enumerate(strong):
        m[0, 0, 2:4, 2:4, 2:4] = 10.0 + k
    weak = torch.zeros(1, 1, 8, 8, 8)
    weak[0, 0, 5:7, 5:7, 5:7] = 1.0
    lo, hi = calibrate_scale(strong)
    assert lo == pytest.approx(0.0) and 12.0 < hi <= 13.0
    assert float(scale_calibrated(weak, lo, hi).max()) < 0.1  # the weak case stays quiet
    assert float(minmax_per_volume(weak).max()) == pytest.approx(1.0)  # per-case stretches it to 1
    assert float(scale_calibrated(strong[3], lo, hi).max()) == pytest.approx(1.0)
    assert torch.equal(scale_calibrated(weak, 1.0, 1.0), torch.zeros_like(weak))


def _cube_scan(path: Path, value: float) -> str:
    data = 0.05 * np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    data[4:8, 8:12, 6:10] = value
    return str(write_nifti(path, data, np.diag([1.0, 1.0, 1.0, 1.0]), scanner_codes=True))


def test_run_explain_calibrated_scale_on_validation(tmp_path):
    """A case with a faint spot stays low on the scale calibrated on strong validation cases, while the
    per-case scale stretches it to 1; explain.json says which scale was used."""
    model = BrightSpotNet().eval()
    model.classifier.activation = "softmax"  # what medimb heads declare (predict_proba reads it)
    meta = {"preprocessing": Preprocessing(spatial_size=(16, 16, 16), intensity="none").to_dict(),
            "class_names": ["benign", "malignant"]}
    validation = [{"image": [_cube_scan(tmp_path / f"val{i}.nii.gz", 1.0)], "label": 1, "case": f"val{i}",
                   "split": "validation"} for i in range(3)]
    items = [{"image": [_cube_scan(tmp_path / "weak.nii.gz", 0.35)], "label": 0, "case": "weak", "split": "test"},
             {"image": [_cube_scan(tmp_path / "strong.nii.gz", 1.0)], "label": 1, "case": "strong",
              "split": "test"}]
    peaks = {}
    for scale in ("calibrated", "per-case"):
        settings = ExplainSettings(methods=["coam"], map_scale=scale, previews=False)
        summary = run_explain(model, meta, items, tmp_path / scale, settings, progress=False,
                              calibration_items=validation)
        assert summary["map_scale"] == scale
        peaks[scale] = {case: float(np.asarray(nib.load(str(tmp_path / scale / f"{case}_coam_on-ch0.nii.gz"))
                                               .dataobj).max()) for case in ("weak", "strong")}
    assert peaks["calibrated"]["weak"] < 0.2 and peaks["calibrated"]["strong"] > 0.9
    assert peaks["per-case"]["weak"] == pytest.approx(1.0, abs=1e-3)
    written = json.loads((tmp_path / "calibrated" / "explain.json").read_text())
    assert written["calibration"]["split"] == "validation" and written["calibration"]["cases"] == 3
    assert written["calibration"]["scale"]["coam"]["hi"] > written["calibration"]["scale"]["coam"]["lo"]
    # auto: calibrated with validation items, per-case without; calibrated without any: one-line error
    auto = run_explain(model, meta, items, tmp_path / "auto", ExplainSettings(methods=["coam"], previews=False),
                       progress=False)
    assert auto["map_scale"] == "per-case" and "no validation split" in auto["map_scale_note"]
    from medimb.errors import UserError
    with pytest.raises(UserError, match="validation split"):
        run_explain(model, meta, items, tmp_path / "none", ExplainSettings(methods=["coam"], map_scale="calibrated"),
                    progress=False)


def _dce(rng, label, channels, shape):
    """Pre-contrast noise; the post-contrast phase enhances a block (strongly for malignant cases). The
    "truth" mask is the half volume x < 10, so every preview slice crosses its outline."""
    data = rng.random((channels, *shape)).astype(np.float32)
    data[1:, 8:12, 6:10, 4:7] += 3.0 if label else 0.5
    mask = np.zeros(shape, dtype=np.uint8)
    mask[:10] = 1
    return data, mask


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=2, num_classes=2, head="cmsl", widths=(4, 8), depths=(1, 1))
    pre = Preprocessing(spatial_size=(24, 24, 24), pixdim=(2.0, 2.0, 2.0), in_channels=2).to_dict()
    return save_checkpoint(path, model, preprocessing=pre, class_names=["benign", "malignant"], method="test",
                           epoch=0)


@pytest.fixture(scope="module")
def dce(tmp_path_factory):
    root = tmp_path_factory.mktemp("dce")
    datalist = write_datalist(root, [0, 1, 0, 1, 0, 1], channels=2, shape=(20, 18, 10), volume=_dce,
                              affine=oblique_affine(spacing=(1.2, 1.4, 3.0)), scanner_codes=True, splits=SPLITS,
                              case="case-{i}", image="scans/{case}_phase-0{c}.nii.gz", subject=None, masks=True,
                              extra={"channels": PHASES})
    ckpt = _checkpoint(root / "model.pt")
    out = root / "out"
    assert main(["explain", "--checkpoint", str(ckpt), "--data", str(datalist), "--out", str(out),
                 "--methods", "coam,gradcam", "--no-progress"]) == 0
    return root, datalist, ckpt, out


def test_default_background_is_the_first_post_contrast_phase(dce, monkeypatch):
    root, _, _, out = dce
    summary = json.loads((out / "explain.json").read_text())
    assert summary["background"] == {"choice": "first-post", "channels": [1], "name": "phase-01"}
    assert summary["files"]["heatmap"] == "<case>_<method>_on-phase-01.nii.gz"
    assert summary["map_scale"] == "calibrated" and summary["calibration"]["cases"] == 2  # auto: validation
    for i in range(6):
        for method in ("coam", "gradcam"):
            for name in (f"case-{i}_phase-00_{method}_on-phase-01.nii.gz",
                         f"case-{i}_phase-00_{method}_on-phase-01_label.nii.gz",
                         f"previews/case-{i}_phase-00_{method}_on-phase-01.png"):
                assert (out / name).is_file(), name
    assert not list(out.glob("*subtraction*"))
    calls: list = []
    ns = run_loader(out / "load_in_slicer.py", monkeypatch, calls)
    # the scene shows the first post-contrast phase (not the pre-contrast phase the case is named after)
    assert composite(ns) == {"backgroundVolume": "case-0_phase-00 phase-01",
                             "foregroundVolume": "case-0_phase-00 coam"}
    _, files, folder = read_mrb(out / "case-0_phase-00.mrb")
    background = nib.Nifti1Image.from_bytes(gzip.decompress(files[f"{folder}/Data/background.nii.gz"]))
    np.testing.assert_array_equal(np.asarray(background.dataobj),
                                  np.asarray(nib.load(str(root / "scans" / "case-0_phase-01.nii.gz")).dataobj))
    # the truth travels as a segment of every case's segmentation, next to the regions
    assert ns["CASES"][5]["segments"] == ["coam region (map >= 0.5)", "gradcam region (map >= 0.5)",
                                          "truth (lesion mask)"]


def test_index_sorted_by_split_and_probability_with_truth_outline(dce):
    _, _, _, out = dce
    index = (out / "index.html").read_text()
    rows = re.findall(r"<tr><td>(\w*)</td><td><b>([\w-]+)</b></td><td>(\w*)</td><td[^>]*>(\w+)</td>"
                      r"<td[^>]*>([^<]*)</td><td>([\d.]+)</td>", index)
    assert len(rows) == 6
    splits = [r[0] for r in rows]
    assert splits == ["training"] * 2 + ["validation"] * 2 + ["test"] * 2
    for split in SPLITS:
        probs = [float(r[5]) for r in rows if r[0] == split]
        assert probs == sorted(probs, reverse=True)
    for _, _, label, predicted, verdict, _ in rows:
        assert ("correct" in verdict) == (label == predicted) and ("wrong" in verdict) == (label != predicted)
    assert "p(malignant)" in index and "outline is the truth" in index and "Background: phase-01" in index
    png = matplotlib.image.imread(str(out / "previews" / "case-1_phase-00_coam_on-phase-01.png"))[..., :3]
    lime = (png[..., 0] < 0.1) & (png[..., 1] > 0.9) & (png[..., 2] < 0.1)
    assert lime.sum() > 20, "the truth outline is drawn in the preview"


def test_index_without_masks_has_no_truth_legend():
    row = {"case": "a", "split": "", "predicted": 0, "probabilities": [0.8, 0.2], "label": None, "previews": {}}
    index = render_index([row, dict(row, case="b", probabilities=[0.3, 0.7], predicted=1)], ["coam"], ["x", "y"])
    assert "truth" not in index and index.index("<b>b</b>") < index.index("<b>a</b>")


def test_subtraction_background_is_written_on_the_source_grid(dce):
    root, datalist, ckpt, _ = dce
    out = root / "out_sub"
    assert main(["explain", "--checkpoint", str(ckpt), "--data", str(datalist), "--out", str(out), "--splits",
                 "test", "--methods", "coam", "--background", "subtraction", "--map-scale", "per-case",
                 "--no-progress"]) == 0
    summary = json.loads((out / "explain.json").read_text())
    assert summary["background"]["name"] == "subtraction" and summary["map_scale"] == "per-case"
    pre, post = root / "scans" / "case-4_phase-00.nii.gz", root / "scans" / "case-4_phase-01.nii.gz"
    sub = nib.load(str(out / "case-4_phase-00_subtraction.nii.gz"))
    src = nib.load(str(pre))
    assert sub.shape == src.shape and sub.get_data_dtype() == np.float32
    np.testing.assert_allclose(sub.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(sub.get_qform(), src.get_qform(), atol=1e-5)
    np.testing.assert_allclose(sub.get_sform(), src.get_sform(), atol=1e-5)
    assert int(sub.header["qform_code"]) == int(src.header["qform_code"])
    np.testing.assert_allclose(np.asarray(sub.dataobj), np.asarray(nib.load(str(post)).dataobj)
                               - np.asarray(src.dataobj), atol=1e-5)
    assert (out / "case-4_phase-00_coam_on-subtraction.nii.gz").is_file()
    assert (out / "previews" / "case-4_phase-00_coam_on-subtraction.png").is_file()
    _, files, folder = read_mrb(out / "case-4_phase-00.mrb")  # the scene's background is the subtraction
    background = nib.Nifti1Image.from_bytes(gzip.decompress(files[f"{folder}/Data/background.nii.gz"]))
    np.testing.assert_allclose(np.asarray(background.dataobj), np.asarray(sub.dataobj))


def test_bad_background_and_scale_give_one_line_errors(dce, tmp_path, capsys):
    root, datalist, ckpt, _ = dce
    base = ["explain", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--methods", "coam"]
    assert main([*base, "--data", str(datalist), "--background", "7"]) == 2
    assert "2 input channel(s)" in capsys.readouterr().err
    assert main([*base, "--data", str(datalist), "--background", "post"]) == 2
    assert "choose first-post" in capsys.readouterr().err
    no_validation = tmp_path / "test_only.json"
    no_validation.write_text(json.dumps({"test": [{"image": [str(root / "scans" / f"case-4_phase-0{c}.nii.gz")
                                                             for c in range(2)], "label": 0}]}))
    assert main([*base, "--data", str(no_validation), "--map-scale", "calibrated"]) == 2
    assert "validation split" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_maps_are_scored_against_lesion_masks_even_when_the_calibrated_scale_saturates(tmp_path):
    """With a lesion mask per item, explain.json reports each method's pointing game and centre-of-mass distance;
    they are computed on the unclipped map, so a peak saturated at 1 by the calibrated scale still points right."""
    model = BrightSpotNet().eval()
    model.classifier.activation = "softmax"
    meta = {"preprocessing": Preprocessing(spatial_size=(16, 16, 16), intensity="none").to_dict(),
            "class_names": ["benign", "malignant"]}
    lesion = np.zeros((16, 16, 16), np.uint8)
    lesion[4:8, 8:12, 6:10] = 1  # where _cube_scan puts the bright spot
    away = np.zeros_like(lesion)
    away[12:15, 1:4, 1:4] = 1
    identity = np.diag([1.0, 1.0, 1.0, 1.0])
    masks = {name: str(write_nifti(tmp_path / f"{name}_mask.nii.gz", m, identity, scanner_codes=True))
             for name, m in (("on", lesion), ("off", away), ("empty", np.zeros_like(lesion)))}
    validation = [{"image": [_cube_scan(tmp_path / "val.nii.gz", 0.3)], "label": 1, "case": "val",
                   "split": "validation"}]  # a weak validation case: the test cases saturate the scale
    items = [{"image": [_cube_scan(tmp_path / f"{n}.nii.gz", 1.0)], "label": 1, "case": n, "split": "test",
              "mask": masks[n]} for n in ("on", "off", "empty")]
    summary = run_explain(model, meta, items, tmp_path / "out", ExplainSettings(methods=["coam"], previews=False,
                                                                                 map_scale="calibrated"),
                          progress=False, calibration_items=validation)
    written = nib.load(str(tmp_path / "out" / "on_coam_on-ch0.nii.gz")).get_fdata()
    assert (written >= 0.999).sum() > 1  # saturated: many voxels tie at the top of the scale
    per_case = {c["case"]: c.get("localization", {}).get("coam") for c in summary["cases"]}
    assert per_case["on"]["pointing_game"] == 1.0 and per_case["off"]["pointing_game"] == 0.0
    assert per_case["empty"] is None  # no lesion: nothing to point at, not counted
    assert per_case["on"]["com_distance_mm"] < per_case["off"]["com_distance_mm"]
    assert summary["localization"]["coam"]["cases"] == 2
    assert summary["localization"]["coam"]["pointing_game"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "explain.json").read_text())["localization"] == summary["localization"]
