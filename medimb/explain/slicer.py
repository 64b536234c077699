"""A ``load_in_slicer.py`` per output folder that steps through the cases' Slicer scenes.

``Slicer --python-script load_in_slicer.py`` (or pasted into Slicer's Python console) shows one case at a
time: it loads the case's self-contained scene ``<case>.mrb`` (:mod:`medimb.explain.scene`: background,
heatmaps with their colour table and threshold, regions and truth as a segmentation with 3D surfaces)
into the open scene, and before loading another case it removes every node the previous case's scene
added, so a heatmap is never drawn over another case's scan. ``next_case()``, ``previous_case()`` and
``show_case(name or number)`` step; a small "medimb cases" toolbar dock (Previous / case list / Next)
does the same in the Slicer window.

The script finds its folder without trusting ``__file__`` alone (a console keeps the ``__file__`` of an
earlier ``--python-script`` run): the output folder's absolute path is written into it when it is
rendered; when the folder has moved it tries the folder of ``__file__`` and then the working directory,
and accepts either only if it holds a ``load_in_slicer.py`` with this run's token and every case's scene.
"""

from __future__ import annotations

import hashlib
import json
import os
import pprint
from pathlib import Path

TEMPLATE = '''"""Step through medimb's per-case 3D Slicer scenes (written by medimb explain).

Run:  Slicer --python-script /path/to/load_in_slicer.py
or, in Slicer's Python console:  exec(open("/path/to/load_in_slicer.py").read())
Then: next_case(), previous_case(), show_case("<case>" or number), or the "medimb cases" dock.
Each case is its own scene (<case>.mrb in this folder; File > Add Data opens one by hand too); the
previous case's nodes are removed before the next case is loaded. Nodes you loaded yourself stay.
"""
import os

import slicer

FOLDER = __FOLDER__  # the output folder when the script was written
RUN = __RUN__  # this run's token: a moved folder is accepted only if its load_in_slicer.py has it
CASES = __CASES__
NO_SCENE = __NO_SCENE__  # cases without a scene: ITK, Slicer's reader, cannot read their geometry

_state = {"index": None, "nodes": [], "combo": None}


def _is_this_run(folder):
    try:
        with open(os.path.join(folder, "load_in_slicer.py"), encoding="utf-8") as script:
            if RUN not in script.read():
                return False
    except OSError:
        return False
    return all(os.path.isfile(os.path.join(folder, case["scene"])) for case in CASES)


def _folder():
    candidates = [FOLDER]
    if globals().get("__file__"):  # set by --python-script; may be stale in the console, hence the check
        candidates.append(os.path.dirname(os.path.abspath(globals()["__file__"])))
    candidates.append(os.getcwd())
    for folder in candidates:
        if _is_this_run(folder):
            return folder
    raise RuntimeError(
        "medimb: this run's scenes are not in %s (moved?). Run the script from its folder: "
        "Slicer --python-script /new/place/load_in_slicer.py, or in the console "
        "os.chdir('/new/place'); exec(open('load_in_slicer.py').read())" % FOLDER)


def _node_ids():
    scene = slicer.mrmlScene
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def unload_case():
    """Remove every node the shown case's scene added (its volumes, segmentation, display/storage nodes)."""
    for node_id in reversed(_state["nodes"]):
        node = slicer.mrmlScene.GetNodeByID(node_id)
        if node is not None:  # removing a node may already have removed its helpers
            slicer.mrmlScene.RemoveNode(node)
    _state["nodes"], _state["index"] = [], None


def _index(case):
    if isinstance(case, int):
        if not 0 <= case < len(CASES):
            raise IndexError("medimb: case number %d is not in 0..%d" % (case, len(CASES) - 1))
        return case
    names = [c["case"] for c in CASES]
    if case not in names:
        raise KeyError("medimb: no case %r here; cases: %s" % (case, ", ".join(names)))
    return names.index(case)


def _centre_on(peak):
    slicer.util.resetSliceViews()
    if peak is not None:  # slices through the first heatmap's peak, like the previews
        for node in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            node.JumpSliceByCentering(*peak)
    slicer.util.resetThreeDViews()


def show_case(case):
    """Show one case (its name, or its number in CASES): unload the shown case, load this one's scene."""
    index = _index(case)
    entry = CASES[index]
    path = os.path.join(_folder(), entry["scene"])
    unload_case()
    before = set(_node_ids())
    try:  # an .mrb is added to the open scene (it is not cleared); Slicer 5 raises when loading fails
        loaded = slicer.util.loadScene(path)
    finally:  # whatever was added, also by a failed load, is this case's to remove
        _state["nodes"] = [i for i in _node_ids() if i not in before]
        _state["index"] = index
    if loaded is False:  # older Slicer returns a status flag instead
        raise RuntimeError("medimb: Slicer could not load %s" % path)
    _centre_on(entry.get("peak_ras"))
    if _state["combo"] is not None:
        _state["combo"].setCurrentIndex(index)
    print("medimb: case %d/%d %s, predicted %s" % (index + 1, len(CASES), entry["case"], entry["prediction"]))
    return entry["case"]


def next_case():
    """The next case (stays on the last one)."""
    index = 0 if _state["index"] is None else min(_state["index"] + 1, len(CASES) - 1)
    if index == _state["index"]:
        print("medimb: %s is the last case" % CASES[index]["case"])
        return CASES[index]["case"]
    return show_case(index)


def previous_case():
    """The previous case (stays on the first one)."""
    index = 0 if _state["index"] is None else max(_state["index"] - 1, 0)
    if index == _state["index"]:
        print("medimb: %s is the first case" % CASES[index]["case"])
        return CASES[index]["case"]
    return show_case(index)


def _add_dock():
    """Previous / case list / Next in a dock at the top of the Slicer window (none without a window)."""
    try:
        import qt
    except ImportError:  # Slicer without its GUI
        return
    window = slicer.util.mainWindow()
    if window is None:
        return
    for old in slicer.util.findChildren(window, name="medimbCases"):  # the script was run before
        window.removeDockWidget(old)
        old.deleteLater()
    dock = qt.QDockWidget("medimb cases")
    dock.objectName = "medimbCases"
    panel = qt.QWidget()
    row = qt.QHBoxLayout(panel)
    previous_button, next_button = qt.QPushButton("< Previous"), qt.QPushButton("Next >")
    combo = qt.QComboBox()
    for entry in CASES:
        combo.addItem("%s  (%s)" % (entry["case"], entry["prediction"]))
    previous_button.connect("clicked()", previous_case)
    next_button.connect("clicked()", next_case)
    combo.connect("activated(int)", show_case)  # user picks only; setCurrentIndex does not re-trigger
    for widget in (previous_button, combo, next_button):
        row.addWidget(widget)
    dock.setWidget(panel)
    window.addDockWidget(qt.Qt.TopDockWidgetArea, dock)
    _state["combo"] = combo


if NO_SCENE:
    print("medimb: no scene for %d case(s), their geometry cannot be read: %s"
          % (len(NO_SCENE), ", ".join(NO_SCENE)))
_add_dock()
if CASES:
    show_case(0)
'''


def run_token(entries: list[dict], folder: str) -> str:
    """A token for one rendered loader: its folder and cases (a stale script elsewhere has another one)."""
    payload = json.dumps({"folder": folder, "cases": entries}, sort_keys=True).encode("utf-8")
    return "medimb-" + hashlib.sha256(payload).hexdigest()[:16]


def render_loader(cases: list[dict], final_dir: str | os.PathLike) -> str:
    """The loader script's text.

    Args:
        cases: rows of :func:`medimb.explain.pipeline.write_case`, each with ``"scene"`` (the entry
            :func:`medimb.explain.scene.write_case_scene` returned: ``case``, ``scene`` file name,
            ``prediction``, ``peak_ras``, ``segments``); a case without a scene (``"scene": None``) is
            listed in the script's ``NO_SCENE`` instead.
        final_dir: the output folder where the script and the scenes will live (after the staging folder
            is moved into place); its absolute path is written into the script.
    """
    folder = str(Path(final_dir).resolve())
    keys = ("case", "scene", "prediction", "peak_ras", "segments")
    entries = [{key: c["scene"][key] for key in keys} for c in cases if c["scene"]["scene"]]
    skipped = [c["scene"]["case"] for c in cases if not c["scene"]["scene"]]
    text = TEMPLATE
    for key, value in {
        "__FOLDER__": repr(folder),
        "__RUN__": repr(run_token(entries, folder)),
        "__CASES__": pprint.pformat(entries, indent=1, width=110, sort_dicts=False),
        "__NO_SCENE__": repr(skipped),
    }.items():
        text = text.replace(key, value)
    return text
