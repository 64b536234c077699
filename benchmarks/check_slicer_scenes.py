"""Open medimb's per-case 3D Slicer scenes (``<case>.mrb``) with 3D Slicer's own MRML libraries and check them.

Needs the ``slicer-core`` wheel (3D Slicer's Qt-free core libraries: MRML scene, storage nodes, application,
volumes and segmentations logic; about 800 MB with VTK) and nibabel, in a virtual environment of their own, not in
medimb's (where CI would pay for it)::

    python3 -m venv /tmp/slv && /tmp/slv/bin/pip install slicer-core nibabel
    /tmp/slv/bin/python benchmarks/check_slicer_scenes.py OVERLAY_FOLDER

For every ``.mrb`` in the folder: Slicer's ``OpenSlicerDataBundle`` (what File > Load scene runs) must load it;
every volume must have image data whose IJK-to-RAS matrix equals the affine of the NIfTI file it was read from
(nibabel, within 1e-3 mm); every scalar volume display node must reference a colour node (built-in or a known
Slicer colour file); every segmentation must have at least one segment and build its closed-surface
representation (what the 3D view shows); every slice composite node must reference volumes that exist. Prints one
line per case and a summary; exits 1 when a case fails. Nothing here renders: Qt views are not part of the wheel.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import slicer
from vtkmodules.vtkCommonCore import vtkCollection
from vtkmodules.vtkCommonMath import vtkMatrix4x4

#: colour tables Slicer loads from its ColorFiles folder at start-up (absent from the core wheel's scene)
SLICER_COLOR_FILES = {"vtkMRMLColorTableNodeFile" + name + ".txt" for name in
                      ("Inferno", "Magma", "Plasma", "Viridis", "ColdToHotRainbow", "HotToColdRainbow")}


def new_scene():
    """A scene with the logics Slicer's application registers before it opens a scene."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.GetColorLogic().SetMRMLScene(scene)
    app.GetColorLogic().AddDefaultColorNodes()
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())
    logics = []
    for name, logic in (("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentation", slicer.vtkSlicerSegmentationsModuleLogic())):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        logics.append(logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return scene, app, logics


def nodes(scene, cls: str) -> list:
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()) if scene.GetNthNode(i).IsA(cls)]


def check_case(mrb: Path) -> tuple[list[str], str]:
    scene, app, _ = new_scene()
    problems = []
    if not app.OpenSlicerDataBundle(str(mrb), tempfile.mkdtemp(prefix="mrb-")):
        return ["OpenSlicerDataBundle failed"], ""
    volumes = nodes(scene, "vtkMRMLScalarVolumeNode")
    for volume in volumes:
        storage = volume.GetStorageNode()
        if volume.GetImageData() is None or storage is None:
            problems.append(f"{volume.GetName()}: no image data")
            continue
        matrix = vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        affine = nib.load(storage.GetFileName()).affine
        if not np.allclose(ijk_to_ras, affine, atol=1e-3):
            problems.append(f"{volume.GetName()}: IJK-to-RAS differs from the file's affine by "
                            f"{np.abs(ijk_to_ras - affine).max():.3g} mm")
        if tuple(volume.GetImageData().GetDimensions()) != nib.load(storage.GetFileName()).shape[:3]:
            problems.append(f"{volume.GetName()}: dimensions differ from the file's")
        display = volume.GetDisplayNode()
        color = display.GetColorNodeID() if display is not None else None
        if display is None or not (scene.GetNodeByID(color) or color in SLICER_COLOR_FILES):
            problems.append(f"{volume.GetName()}: display/colour node {color!r} missing")
    segmentations = nodes(scene, "vtkMRMLSegmentationNode")
    segments = 0
    for node in segmentations:
        segmentation = node.GetSegmentation()
        segments += segmentation.GetNumberOfSegments()
        if segmentation.GetNumberOfSegments() == 0:
            problems.append(f"{node.GetName()}: no segments")
        elif not node.CreateClosedSurfaceRepresentation():
            problems.append(f"{node.GetName()}: no closed surface for the 3D view")
    for composite in nodes(scene, "vtkMRMLSliceCompositeNode"):
        for role, volume_id in (("background", composite.GetBackgroundVolumeID()),
                                ("foreground", composite.GetForegroundVolumeID())):
            if volume_id and scene.GetNodeByID(volume_id) is None:
                problems.append(f"{composite.GetID()}: {role} {volume_id} not in the scene")
    if not volumes:
        problems.append("no volumes")
    return problems, f"{len(volumes)} volumes, {len(segmentations)} segmentation(s) with {segments} segment(s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a medimb explain / predict output folder")
    args = parser.parse_args(argv)
    scenes = sorted(args.folder.glob("*.mrb"))
    if not scenes:
        print(f"no .mrb files in {args.folder}", file=sys.stderr)
        return 2
    failed = 0
    t0 = time.perf_counter()
    for mrb in scenes:
        problems, summary = check_case(mrb)
        failed += bool(problems)
        print(f"{'FAIL' if problems else 'ok  '} {mrb.name}: {summary}" + "".join(f"\n     {p}" for p in problems))
    print(f"{len(scenes) - failed}/{len(scenes)} scenes load in 3D Slicer's MRML libraries "
          f"(slicer-core {importlib.metadata.version('slicer-core')}) in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
