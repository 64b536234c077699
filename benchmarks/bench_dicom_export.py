"""Time ``medimb export-dicom`` and its push (STOW-RS, C-STORE) on a synthetic archive against a local Orthanc.

    .venv/bin/python benchmarks/bench_dicom_export.py --cases 4 --matrix 256 --slices 64 --work /tmp/bench_export

Steps (each a real CLI call): ``medimb-prep synth`` -> ``convert --link-table`` -> ``datalist`` -> ``medimb explain``
with a tiny untrained checkpoint (COAM; the maps' content does not matter for the timing) -> ``medimb export-dicom``
(timed), a re-run (timed: every result unchanged, skipped), then the push of the written files to a throw-away
Orthanc on loopback (tests/helpers/orthanc.py) by STOW-RS and by C-STORE (timed; the source studies are not
uploaded, Orthanc stores results without them). Prints one JSON line with the timings and sizes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from synth_bench_args import fresh_synth_archive, synth_archive_parser  # noqa: E402


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    code = fn(*args)
    if code not in (0, None):
        raise SystemExit(f"step failed with status {code}: {args}")
    return round(time.perf_counter() - start, 2)


def main() -> None:
    args = synth_archive_parser(__doc__).parse_args()

    import torch

    from data_prep.cli import main as prep
    from data_prep.pacs.push import push_files
    from data_prep.pacs.server import parse_server
    from helpers.orthanc import find_orthanc, start_orthanc
    from medimb.cli import main as medimb
    from medimb.data.transforms import Preprocessing
    from medimb.networks import create_model, save_checkpoint

    w = args.work
    times = {}
    _, times["synth"] = fresh_synth_archive(args, "--positive-fraction", "0.5")
    times["convert"] = _timed(prep, ["convert", str(w / "syn" / "archive"), str(w / "converted"), "--link-table",
                                     str(w / "links.csv"), "--no-progress"])
    prep(["datalist", str(w / "converted"), "-o", str(w / "converted" / "datalist.json")])
    torch.manual_seed(0)
    model = create_model("cpunet", in_channels=3, num_classes=2, head="cmsl", widths=(4, 8), depths=(1, 1))
    pre = dict(Preprocessing(spatial_size=(64, 64, 32), pixdim=(2.0, 2.0, 3.0), intensity="zscore").to_dict(),
               in_channels=3)
    save_checkpoint(w / "model.pt", model, preprocessing=pre, class_names=["benign", "malignant"], method="bench",
                    epoch=0)
    times["explain"] = _timed(medimb, ["explain", "--checkpoint", str(w / "model.pt"), "--data",
                                       str(w / "converted" / "datalist.json"), "--out", str(w / "overlays"),
                                       "--methods", "coam", "--no-previews", "--no-progress"])
    export = ["export-dicom", "--overlays", str(w / "overlays"), "--archive", str(w / "syn" / "archive"),
              "--link-table", str(w / "links.csv"), "--out", str(w / "results"), "--no-progress"]
    times["export"] = _timed(medimb, export)
    times["export_rerun"] = _timed(medimb, export)
    files = sorted((w / "results").rglob("*.dcm"))
    sizes = {kind: sum(p.stat().st_size for p in files if p.name.endswith(f"_{kind}.dcm")) for kind in ("map", "region")}
    binary, plugin, why = find_orthanc()
    if binary is None or plugin is None:
        raise SystemExit(why)
    server = start_orthanc(binary, plugin)
    try:
        pushes = {"push_stow": parse_server(server.dicomweb_server, server.credentials),
                  "push_cstore": parse_server(server.dimse_server())}
        for name, spec in pushes.items():
            start = time.perf_counter()
            push_files(spec, files)
            times[name] = round(time.perf_counter() - start, 2)
        stored = len(server.rest("GET", "/instances").json())
    finally:
        server.stop()
    print(json.dumps({"cases": args.cases, "matrix": args.matrix, "slices": args.slices, "files": len(files),
                      "bytes": sizes, "orthanc_instances_after_two_pushes": stored, "seconds": times}))


if __name__ == "__main__":
    main()
