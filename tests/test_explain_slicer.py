"""The per-case 3D Slicer scenes (``<case>.mrb``) and the loader that steps through them.

No Slicer here: the bundles are checked structurally (a zip whose MRML references only its own files and
existing nodes, volume geometry as SimpleITK/ITK - and so Slicer - reads it, the segmentation as ITK's NRRD
reader sees it), and the loader runs against :func:`fake_slicer`, a stand-in ``slicer`` module whose scene
imports the bundle's MRML the way Slicer's does (new nodes added, singleton slice-composite nodes updated).
"""

from __future__ import annotations

import gzip
import os
import runpy
import shutil
import types
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path, PurePosixPath

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers.explain import oblique_affine
from helpers.nifti import SHEARED_AFFINE, write_nifti

from medimb.explain.export import write_heatmap, write_label
from medimb.explain.scene import HEATMAP_COLOR_NODE, clean_nifti, write_case_scene
from medimb.explain.slicer import render_loader

SHAPE = (20, 18, 10)


# --- a stand-in for Slicer's ``slicer`` module -----------------------------------------------------------------

def read_mrb(path) -> tuple[ET.Element, dict[str, bytes], str]:
    """``(MRML root, {zip entry: bytes}, folder of the .mrml in the zip)``; asserts Slicer would find one scene."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    scenes = sorted(n for n in files if n.endswith(".mrml"))
    assert len(scenes) == 1, scenes
    return ET.fromstring(files[scenes[0]]), files, str(PurePosixPath(scenes[0]).parent)


class FakeNode:
    def __init__(self, node_id: str, tag: str, attributes: dict) -> None:
        self.id, self.tag, self.attributes = node_id, tag, dict(attributes)

    def GetID(self):
        return self.id

    def GetName(self):
        return self.attributes.get("name", "")

    def references(self) -> dict[str, str]:
        pairs = [p.split(":", 1) for p in self.attributes.get("references", "").split(";") if p]
        return {role: ids for role, ids in pairs}

    def JumpSliceByCentering(self, r, a, s):  # slice nodes only
        self.centre = (r, a, s)


class FakeScene:
    """Slicer's scene as far as the loader and an imported .mrb touch it."""

    def __init__(self, calls: list) -> None:
        self.calls, self.nodes = calls, []
        for view in ("Red", "Yellow", "Green"):  # the views' singletons exist before anything is loaded
            self.nodes.append(FakeNode(f"vtkMRMLSliceNode{view}", "Slice", {"singletonTag": view}))
            self.nodes.append(FakeNode(f"vtkMRMLSliceCompositeNode{view}", "SliceComposite", {"singletonTag": view}))
        self.nodes.append(FakeNode("vtkMRMLScalarVolumeNode1", "Volume", {"name": "the user's own scan"}))

    def GetNumberOfNodes(self):
        return len(self.nodes)

    def GetNthNode(self, i):
        return self.nodes[i]

    def GetNodeByID(self, node_id):
        return next((n for n in self.nodes if n.id == node_id), None)

    def RemoveNode(self, node):
        self.calls.append(("RemoveNode", node.id))
        self.nodes.remove(node)

    def by_name(self, name):
        return [n for n in self.nodes if n.GetName() == name]

    def import_mrb(self, path) -> None:
        """Add the bundle's nodes: a taken ID gets a new one (references follow), singletons are updated."""
        root, files, scene_dir = read_mrb(path)
        for element in root:
            name = element.get("fileName")
            if name is not None:
                assert str(PurePosixPath(scene_dir) / name) in files, f"{name} is not in the bundle"
        renamed = {}
        for element in root:
            if element.get("singletonTag") is None and self.GetNodeByID(element.get("id")) is not None:
                renamed[element.get("id")] = f"{element.get('id')}_{len(self.nodes)}"
        for element in root:
            attributes = dict(element.attrib)
            for old, new in renamed.items():
                attributes["references"] = attributes.get("references", "").replace(old + ";", new + ";")
            singleton = attributes.get("singletonTag")
            existing = next((n for n in self.nodes if singleton and n.attributes.get("singletonTag") == singleton
                             and n.tag == element.tag), None)
            if existing is not None:
                existing.attributes.update(attributes)
            else:
                node_id = renamed.get(attributes["id"], attributes["id"])
                self.nodes.append(FakeNode(node_id, element.tag, attributes))


def fake_slicer(calls: list) -> types.ModuleType:
    """A ``slicer`` module that records what the loader asks for and imports .mrb scenes into a fake scene."""
    slicer = types.ModuleType("slicer")
    util = types.ModuleType("slicer.util")
    scene = FakeScene(calls)

    def load_scene(path, properties=None):
        calls.append(("loadScene", str(path)))
        scene.import_mrb(path)
        return None  # Slicer 5 returns no node for a scene (and raises on failure)

    util.loadScene = load_scene
    util.resetSliceViews = lambda: calls.append(("resetSliceViews",))
    util.resetThreeDViews = lambda: calls.append(("resetThreeDViews",))
    util.getNodesByClass = lambda cls: [n for n in scene.nodes if cls == "vtkMRMLSliceNode" and n.tag == "Slice"]
    util.mainWindow = lambda: None
    slicer.util, slicer.mrmlScene = util, scene
    slicer.app = types.SimpleNamespace(layoutManager=lambda: None)
    return slicer


def run_loader(script: Path, monkeypatch, calls: list, **globals_) -> dict:
    """Run ``script`` as Slicer would (``--python-script``, or ``exec`` with the given globals)."""
    monkeypatch.setitem(__import__("sys").modules, "slicer", fake_slicer(calls))
    if globals_:
        namespace = dict(globals_)
        exec(compile(script.read_text(), "<console>", "exec"), namespace)  # noqa: S102 - the console's way
        return namespace
    return runpy.run_path(str(script), run_name="__main__")


def composite(namespace: dict, view: str = "Red") -> dict[str, str]:
    """The slice view's layers as node names: ``{"backgroundVolume": name, "foregroundVolume": name}``."""
    scene = namespace["slicer"].mrmlScene
    node = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}")
    return {role: scene.GetNodeByID(ids).GetName() for role, ids in node.references().items()}


# --- a two-case folder written without a model ------------------------------------------------------------------

def _case(folder: Path, case: str, rng, truth: bool = True) -> dict:
    """A case as explain writes it: an int16 source scan with a scale factor and free text in its header, two
    maps and their regions on its grid, a truth mask on a coarser grid; returns its write_case row."""
    affine = oblique_affine(spacing=(1.2, 1.4, 3.0))
    # float values beyond int16 stored as int16: nibabel writes a scale factor (scl_slope/scl_inter)
    scan = nib.Nifti1Image((rng.random(SHAPE) * 70000 - 1000).astype(np.float32), affine)
    scan.set_data_dtype(np.int16)
    scan.set_qform(affine, code=1)
    scan.set_sform(affine, code=1)
    scan.header["descrip"] = b"Time=101530.000;JANE DOE"  # what some converters leave there
    scan.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"ACC-12345 (comment)"))
    source = folder / "scans" / f"{case}.nii.gz"
    source.parent.mkdir(parents=True, exist_ok=True)
    nib.save(scan, str(source))
    assert nib.load(str(source)).dataobj.slope != 1.0
    row = {"case": case, "source": str(source), "heatmaps": {}, "labels": {}, "prediction": "malignant (0.91)",
           "background": {"name": "ch0", "path": str(source), "in_output": False}, "truth": None}
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    for k, method in enumerate(("coam", "gradcam")):
        centre = np.array([6 + 3 * k, 8, 5])
        heat = np.exp(-np.sum((grid - centre) ** 2, -1) / 18.0).astype(np.float32)
        write_heatmap(folder / "out" / f"{case}_{method}_on-ch0.nii.gz", heat, source)
        write_label(folder / "out" / f"{case}_{method}_on-ch0_label.nii.gz", (heat >= 0.5).astype(np.uint8), source)
        row["heatmaps"][method] = f"{case}_{method}_on-ch0.nii.gz"
        row["labels"][method] = f"{case}_{method}_on-ch0_label.nii.gz"
    if truth:
        coarse = affine @ np.diag([2.0, 2.0, 1.0, 1.0])
        mask = np.zeros((10, 9, 10), np.uint8)
        mask[3:5, 3:6, 3:7] = 1
        row["truth"] = str(write_nifti(folder / "masks" / f"{case}_mask.nii.gz", mask, coarse, dtype=np.uint8,
                                       scanner_codes=True))
    return row


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    rows = [_case(root, "sub-01", rng), _case(root, "sub-02", rng, truth=False)]
    for row in rows:
        row["scene"] = write_case_scene(root / "out", row, display_threshold=0.3, opacity=0.4, threshold=0.5)
    (root / "out" / "load_in_slicer.py").write_text(render_loader(rows, final_dir=root / "out"))
    return root, rows


def _extract(files: dict[str, bytes], name: str, into: Path) -> Path:
    path = into / PurePosixPath(name).name
    path.write_bytes(files[name])
    return path


def test_bundle_is_a_zip_whose_scene_references_only_its_own_files_and_nodes(scenes):
    root, rows = scenes
    root_el, files, scene_dir = read_mrb(root / "out" / "sub-01.mrb")
    assert scene_dir == "sub-01" and root_el.tag == "MRML"
    ids = {e.get("id") for e in root_el}
    stored = [e.get("fileName") for e in root_el if e.get("fileName") is not None]
    assert sorted(stored) == ["Data/background.nii.gz", "Data/heatmap_coam.nii.gz", "Data/heatmap_gradcam.nii.gz",
                              "Data/regions.seg.nrrd"]
    for name in stored:
        assert not name.startswith("/") and ".." not in name
        assert f"{scene_dir}/{name}" in files
    assert set(files) == {f"{scene_dir}/{n}" for n in stored} | {"sub-01/sub-01.mrml"}
    for element in root_el:
        for pair in filter(None, element.get("references", "").split(";")):
            role, node_id = pair.split(":", 1)
            assert node_id in ids, (element.get("id"), role, node_id)
    # volumes: a display and a storage node each; the heatmaps coloured, windowed 0..1, low values not drawn
    volumes = {e.get("name"): e for e in root_el.iter("Volume")}
    assert set(volumes) == {"sub-01 ch0", "sub-01 coam", "sub-01 gradcam"}
    by_id = {e.get("id"): e for e in root_el}
    for name in ("sub-01 coam", "sub-01 gradcam"):
        refs = dict(p.split(":", 1) for p in volumes[name].get("references").split(";") if p)
        display = by_id[refs["display"]]
        assert display.tag == "VolumeDisplay" and display.get("colorNodeID") == HEATMAP_COLOR_NODE
        assert (display.get("window"), display.get("level")) == ("1", "0.5")
        assert display.get("lowerThreshold") == "0.3" and display.get("applyThreshold") == "1"
        assert float(display.get("upperThreshold")) > 1.0 + 1e-6  # the peak shows however 255 x 1/255 is rounded
        assert display.get("autoWindowLevel") == "0" and by_id[refs["storage"]].tag == "VolumeArchetypeStorage"
    # slice views: the scan under the first method's map at opacity 0.4
    views = list(root_el.iter("SliceComposite"))
    assert [v.get("singletonTag") for v in views] == ["Red", "Yellow", "Green"]
    for view in views:
        refs = dict(p.split(":", 1) for p in view.get("references").split(";") if p)
        assert by_id[refs["backgroundVolume"]].get("name") == "sub-01 ch0"
        assert by_id[refs["foregroundVolume"]].get("name") == "sub-01 coam"
        assert view.get("foregroundOpacity") == "0.4"
    # the segmentation: surfaces in 3D, outlines in 2D
    display = next(root_el.iter("SegmentationDisplay"))
    assert display.get("PreferredDisplayRepresentationName3D") == "Closed surface"
    assert display.get("visibility3D") == "true" and display.get("Visibility2DOutline") == "true"
    assert "region_coam" in display.get("SegmentationDisplayProperties")


def test_bundle_volumes_keep_the_source_geometry_and_values(scenes, tmp_path):
    root, rows = scenes
    row = rows[0]
    root_el, files, scene_dir = read_mrb(root / "out" / "sub-01.mrb")
    pairs = {"background.nii.gz": row["source"],
             "heatmap_coam.nii.gz": root / "out" / row["heatmaps"]["coam"],
             "heatmap_gradcam.nii.gz": root / "out" / row["heatmaps"]["gradcam"]}
    volumes = {e.get("name"): e for e in root_el.iter("Volume")}
    for inner, source in pairs.items():
        path = _extract(files, f"{scene_dir}/Data/{inner}", tmp_path)
        got, want = sitk.ReadImage(str(path)), sitk.ReadImage(str(source))
        assert got.GetSize() == want.GetSize()
        np.testing.assert_allclose(got.GetOrigin(), want.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(got.GetSpacing(), want.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(got.GetDirection(), want.GetDirection(), atol=1e-6)
        # values as a viewer shows them: the scan's scale factor applied, the maps in 1/255 steps
        tolerance = {"atol": 0.5 / 255 + 1e-6} if inner.startswith("heatmap") else {"rtol": 1e-6}
        np.testing.assert_allclose(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(want), **tolerance)
    # the MRML's own geometry attributes say the same, in RAS
    want = sitk.ReadImage(str(row["source"]))
    volume = volumes["sub-01 ch0"]
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose([float(v) for v in volume.get("origin").split()],
                               lps_to_ras @ np.array(want.GetOrigin()), atol=1e-4)
    np.testing.assert_allclose(np.array([float(v) for v in volume.get("ijkToRASDirections").split()]).reshape(3, 3),
                               lps_to_ras @ np.array(want.GetDirection()).reshape(3, 3), atol=1e-6)
    np.testing.assert_allclose([float(v) for v in volume.get("spacing").split()], want.GetSpacing(), atol=1e-6)


def test_segmentation_loads_with_its_segments(scenes, tmp_path):
    root, rows = scenes
    row = rows[0]
    _, files, scene_dir = read_mrb(root / "out" / "sub-01.mrb")
    path = _extract(files, f"{scene_dir}/Data/regions.seg.nrrd", tmp_path)
    seg = sitk.ReadImage(str(path))  # ITK's NRRD reader: what Slicer's segmentation reader is built on
    keys = set(seg.GetMetaDataKeys())
    names = [seg.GetMetaData(f"Segment{i}_Name") for i in range(3)]
    assert names == ["coam region (map >= 0.5)", "gradcam region (map >= 0.5)", "truth (lesion mask)"]
    assert [seg.GetMetaData(f"Segment{i}_ID") for i in range(3)] == ["region_coam", "region_gradcam", "truth"]
    assert [seg.GetMetaData(f"Segment{i}_Layer") for i in range(3)] == ["0", "1", "2"]
    assert "Segment3_ID" not in keys
    assert seg.GetMetaData("Segmentation_MasterRepresentation") == "Binary labelmap"
    assert "Closed surface" in seg.GetMetaData("Segmentation_ContainedRepresentationNames")
    assert seg.GetMetaData("Segmentation_ReferenceImageExtentOffset") == "0 0 0"
    source = sitk.ReadImage(str(row["source"]))
    assert seg.GetSize() == source.GetSize() and seg.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(seg.GetOrigin(), source.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(seg.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(seg.GetSpacing(), source.GetSpacing(), atol=1e-6)
    layers = sitk.GetArrayFromImage(seg)  # (k, j, i, segment)
    for i, method in enumerate(("coam", "gradcam")):
        region = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "out" / row["labels"][method])))
        np.testing.assert_array_equal(layers[..., i], region)
        k, j, ii = np.nonzero(region)
        assert seg.GetMetaData(f"Segment{i}_Extent") == f"{ii.min()} {ii.max()} {j.min()} {j.max()} {k.min()} {k.max()}"
    # the truth (2 x 3 x 4 voxels of 2.4 x 2.8 x 3 mm) resampled onto the finer grid: 4x the voxels, same place
    truth = layers[..., 2]
    assert 80 <= truth.sum() <= 112
    mask = sitk.ReadImage(str(row["truth"]))
    k, j, i = np.nonzero(truth)
    centre = source.TransformContinuousIndexToPhysicalPoint([float(i.mean()), float(j.mean()), float(k.mean())])
    mk, mj, mi = np.nonzero(sitk.GetArrayFromImage(mask))
    want = mask.TransformContinuousIndexToPhysicalPoint([float(mi.mean()), float(mj.mean()), float(mk.mean())])
    assert np.linalg.norm(np.subtract(centre, want)) < 1.5
    # one segment: a plain 3D NRRD
    _, files2, dir2 = read_mrb(root / "out" / "sub-02.mrb")
    seg2 = sitk.ReadImage(str(_extract(files2, f"{dir2}/Data/regions.seg.nrrd", tmp_path)))
    assert seg2.GetNumberOfComponentsPerPixel() == 2 and "Segment2_ID" not in seg2.GetMetaDataKeys()


def test_bundle_carries_nothing_identifying_and_is_deterministic(scenes, tmp_path):
    root, rows = scenes
    mrb = root / "out" / "sub-01.mrb"
    _, files, _ = read_mrb(mrb)
    text = b"".join(gzip.decompress(data) if name.endswith(".gz") else data for name, data in files.items())
    for secret in (b"JANE DOE", b"Time=101530", b"ACC-12345", str(root).encode(), b"scans"):
        assert secret not in text, secret
    for name in (*rows[0]["heatmaps"].values(), *rows[0]["labels"].values()):  # the NIfTI files beside it too
        header = nib.load(str(root / "out" / name)).header
        assert header["descrip"].item() == b"" and len(header.extensions) == 0
    for name, data in files.items():
        if name.endswith(".nii.gz"):
            header = nib.Nifti1Image.from_bytes(gzip.decompress(data)).header
            assert header["descrip"].item() == b"" and len(header.extensions) == 0
    again = write_case_scene(tmp_path, dict(rows[0], heatmaps={m: str(root / "out" / f)
                                                                for m, f in rows[0]["heatmaps"].items()},
                                            labels={m: str(root / "out" / f) for m, f in rows[0]["labels"].items()}),
                             display_threshold=0.3, opacity=0.4, threshold=0.5)
    assert (tmp_path / again["scene"]).read_bytes() == mrb.read_bytes()
    with zipfile.ZipFile(mrb) as archive:
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_clean_files_are_carried_as_written_others_rewritten(tmp_path):
    affine = oblique_affine(spacing=(1.2, 1.4, 3.0))
    clean = write_nifti(tmp_path / "clean.nii.gz", np.arange(np.prod(SHAPE)).reshape(SHAPE), affine,
                        dtype=np.int16, scanner_codes=True)
    assert clean_nifti(clean)[0] == clean.read_bytes()
    # the same file compressed by `gzip`, which keeps the original file name in its header
    named = tmp_path / "named.nii.gz"
    with open(named, "wb") as raw, gzip.GzipFile("Doe_John_T1.nii", "wb", fileobj=raw, mtime=0) as gz:
        gz.write(gzip.decompress(clean.read_bytes()))
    data, voxels = clean_nifti(named)
    assert b"Doe_John" not in data and data[3] & 0x08 == 0
    np.testing.assert_array_equal(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(data)).dataobj), voxels)
    np.testing.assert_array_equal(voxels, np.asarray(nib.load(str(clean)).dataobj))


def test_a_case_slicer_cannot_place_gets_no_scene_but_the_others_do(scenes, tmp_path, monkeypatch, caplog):
    root, rows = scenes
    # a sheared affine: ITK (so Slicer) refuses its geometry; nibabel and explain's NIfTI overlays do not
    source = write_nifti(tmp_path / "sheared.nii.gz", np.ones(SHAPE), SHEARED_AFFINE)
    write_heatmap(tmp_path / "sheared_coam.nii.gz", np.zeros(SHAPE, np.float32), source)
    row = {"case": "sheared", "source": str(source), "prediction": "benign (0.80)", "truth": None,
           "background": {"name": "ch0", "path": str(source), "in_output": False},
           "heatmaps": {"coam": "sheared_coam.nii.gz"}, "labels": {}}
    with caplog.at_level("WARNING", logger="medimb.explain.scene"):
        entry = write_case_scene(tmp_path, row, 0.3, 0.4, 0.5)
    assert entry["scene"] is None and "orthonormal" in entry["skipped"] and not list(tmp_path.glob("*.mrb"))
    assert "case sheared: no 3D Slicer scene" in caplog.text
    script = tmp_path / "load_in_slicer.py"  # same cases and folder as the run's loader: it finds root/out
    script.write_text(render_loader([*rows, dict(row, scene=entry)], final_dir=root / "out"))
    calls: list = []
    ns = run_loader(script, monkeypatch, calls, __file__=str(script))
    assert ns["NO_SCENE"] == ["sheared"] and [c["case"] for c in ns["CASES"]] == ["sub-01", "sub-02"]


def test_a_failed_scene_leaves_no_file(scenes, tmp_path):
    root, rows = scenes
    broken = dict(rows[0], heatmaps={"coam": "missing.nii.gz"})
    with pytest.raises(FileNotFoundError):
        write_case_scene(root / "out", dict(broken, case="sub-09"), 0.3, 0.4, 0.5)
    assert not list((root / "out").glob("*sub-09*"))


def test_loader_steps_through_cases_and_unloads_the_previous_one(scenes, monkeypatch):
    root, rows = scenes
    calls: list = []
    ns = run_loader(root / "out" / "load_in_slicer.py", monkeypatch, calls)
    scene = ns["slicer"].mrmlScene
    first = [c for c in calls if c[0] == "loadScene"]
    assert first == [("loadScene", str((root / "out" / "sub-01.mrb").resolve()))]
    assert composite(ns) == {"backgroundVolume": "sub-01 ch0", "foregroundVolume": "sub-01 coam"}
    assert scene.by_name("sub-01 regions") and not scene.by_name("sub-02 ch0")
    # the slices go through the first map's peak (the MRML scene's RAS coordinates)
    red = scene.GetNodeByID("vtkMRMLSliceNodeRed")
    assert red.centre == tuple(rows[0]["scene"]["peak_ras"])
    case_one = [n.id for n in scene.nodes if n.GetName().startswith("sub-01") or n.id in ns["_state"]["nodes"]]

    calls.clear()
    assert ns["next_case"]() == "sub-02"
    removed = [c[1] for c in calls if c[0] == "RemoveNode"]
    assert sorted(removed) == sorted(set(case_one)) and calls.index(("RemoveNode", removed[0])) < calls.index(
        ("loadScene", str((root / "out" / "sub-02.mrb").resolve())))
    assert not [n for n in scene.nodes if n.GetName().startswith("sub-01")]
    assert composite(ns) == {"backgroundVolume": "sub-02 ch0", "foregroundVolume": "sub-02 coam"}
    assert scene.by_name("the user's own scan"), "nodes the loader did not add stay"
    # the bundle's node IDs were taken by the user's scan: the imported references follow the new IDs
    assert scene.by_name("sub-02 ch0")[0].id != "vtkMRMLScalarVolumeNode1"

    assert ns["next_case"]() == "sub-02"  # the last case stays
    assert ns["previous_case"]() == "sub-01" and composite(ns)["foregroundVolume"] == "sub-01 coam"
    assert ns["previous_case"]() == "sub-01"
    assert ns["show_case"]("sub-02") == "sub-02" and ns["show_case"](0) == "sub-01"
    assert sum(1 for n in scene.nodes if n.tag == "Volume") == 1 + 3  # the user's scan + one case
    with pytest.raises(KeyError, match="no case 'sub-07'"):
        ns["show_case"]("sub-07")
    with pytest.raises(IndexError):
        ns["show_case"](2)
    ns["unload_case"]()
    assert [n.GetName() for n in scene.nodes if n.tag == "Volume"] == ["the user's own scan"]


def test_loader_finds_its_folder_without_trusting_a_stale_file(scenes, monkeypatch, tmp_path):
    root, rows = scenes
    # a moved output folder: the written path is gone, the scenes and the script are elsewhere
    moved = tmp_path / "moved"
    moved.mkdir()
    for row in rows:
        shutil.copy(root / "out" / row["scene"]["scene"], moved)
    (moved / "load_in_slicer.py").write_text(render_loader(rows, final_dir=tmp_path / "gone"))
    # another run's folder with the same case names: its script has another token
    other = tmp_path / "other"
    shutil.copytree(moved, other)
    (other / "load_in_slicer.py").write_text(render_loader(rows, final_dir=tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)

    calls: list = []
    run_loader(moved / "load_in_slicer.py", monkeypatch, calls)  # --python-script: __file__ is right
    assert ("loadScene", str(moved / "sub-01.mrb")) in calls

    calls.clear()  # pasted into a console whose __file__ is another run's script: refused
    with pytest.raises(RuntimeError, match="moved"):
        run_loader(moved / "load_in_slicer.py", monkeypatch, calls, __file__=str(other / "load_in_slicer.py"))
    assert not [c for c in calls if c[0] == "loadScene"]

    monkeypatch.chdir(moved)  # ... unless the console is in the moved folder
    run_loader(moved / "load_in_slicer.py", monkeypatch, calls, __file__=str(other / "load_in_slicer.py"))
    assert ("loadScene", os.path.join(str(moved), "sub-01.mrb")) in calls

    calls.clear()  # the folder written into the script wins over a stale __file__
    run_loader(root / "out" / "load_in_slicer.py", monkeypatch, calls, __file__=str(other / "load_in_slicer.py"))
    assert calls[0] == ("loadScene", str((root / "out" / "sub-01.mrb").resolve()))


def _fake_qt(widgets: list) -> types.ModuleType:
    """A ``qt`` (PythonQt) module just big enough for the loader's dock: widgets record what is done to them."""

    class Widget:
        def __init__(self, *args):
            self.args, self.items, self.slots, self.children, self.current = args, [], {}, [], None
            widgets.append(self)

        def connect(self, signal, slot):
            self.slots[signal] = slot

        def addItem(self, text):
            self.items.append(text)

        def addWidget(self, widget):
            self.children.append(widget)

        def setWidget(self, widget):
            self.children.append(widget)

        def setCurrentIndex(self, index):
            self.current = index

        def deleteLater(self):
            self.deleted = True

    qt = types.ModuleType("qt")
    for name in ("QDockWidget", "QWidget", "QHBoxLayout", "QPushButton", "QComboBox"):
        setattr(qt, name, type(name, (Widget,), {}))
    qt.Qt = types.SimpleNamespace(TopDockWidgetArea=4)
    return qt


def test_loader_dock_steps_like_the_functions(scenes, monkeypatch):
    root, rows = scenes
    widgets: list = []
    docks: list = []

    def remove_dock(dock):
        docks[:] = [d for d in docks if d[1] is not dock]

    window = types.SimpleNamespace(addDockWidget=lambda area, dock: docks.append((area, dock)),
                                   removeDockWidget=remove_dock)
    monkeypatch.setitem(__import__("sys").modules, "qt", _fake_qt(widgets))
    calls: list = []
    slicer = fake_slicer(calls)
    slicer.util.mainWindow = lambda: window
    slicer.util.findChildren = lambda widget, name="": [d for _, d in docks if d.objectName == name]
    monkeypatch.setitem(__import__("sys").modules, "slicer", slicer)
    ns = runpy.run_path(str(root / "out" / "load_in_slicer.py"), run_name="__main__")
    (area, dock), = docks
    assert dock.objectName == "medimbCases" and dock.args == ("medimb cases",)
    buttons = {w.args[0]: w for w in widgets if type(w).__name__ == "QPushButton"}
    combo = next(w for w in widgets if type(w).__name__ == "QComboBox")
    assert combo.items == ["sub-01  (malignant (0.91))", "sub-02  (malignant (0.91))"] and combo.current == 0
    buttons["Next >"].slots["clicked()"]()
    assert composite(ns)["backgroundVolume"] == "sub-02 ch0" and combo.current == 1
    buttons["< Previous"].slots["clicked()"]()
    combo.slots["activated(int)"](1)
    assert composite(ns)["backgroundVolume"] == "sub-02 ch0"
    # running the script again replaces the dock instead of adding a second one
    runpy.run_path(str(root / "out" / "load_in_slicer.py"), run_name="__main__")
    assert len(docks) == 1 and docks[0][1] is not dock
