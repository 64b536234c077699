#!/usr/bin/env bash
# `make demo`: the whole medimb pipeline on a synthetic breast DCE-MRI archive, run the way a user runs it:
#   medimb-prep synth -> convert -> datalist -> breast_dce_cmsl bundle: stage 1 (CMSL), stage 2 (cRT),
#   evaluation (metrics.json, plots), inference with COAM overlays (NIfTI, label maps, PNGs, index.html,
#   3D Slicer loader) -> a short summary.
#
# Usage: bash bundles/demo.sh OUT_DIR [N_CASES]
# Writes under OUT_DIR only. Restartable: finished steps are skipped (a step's marker in OUT_DIR/.done is
# written only when it succeeds); an interrupted step is redone. Epochs: DEMO_EPOCHS1 / DEMO_EPOCHS2.
set -euo pipefail

OUT_ARG=${1:?usage: bash bundles/demo.sh OUT_DIR [N_CASES]}
CASES=${2:-40}
EPOCHS1=${DEMO_EPOCHS1:-25}
EPOCHS2=${DEMO_EPOCHS2:-8}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN="$ROOT/.venv/bin"
PY="$BIN/python"
CONFIGS="$ROOT/bundles/breast_dce_cmsl/configs"
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
DONE="$OUT/.done"
LOGS="$OUT/logs"
mkdir -p "$DONE" "$LOGS"
export PYTHONWARNINGS=ignore  # MONAI/torch deprecation noise; errors still show
START=$(date +%s)

step() {  # step NAME COMMAND...: run unless done; log to OUT/logs/NAME.log; marker on success
  local name=$1
  shift
  if [[ -e "$DONE/$name" ]]; then
    echo "[demo] $name: already done (delete $DONE/$name to redo)"
    return 0
  fi
  local t0=$(date +%s)
  echo "[demo] $name ..."
  if ! "$@" >"$LOGS/$name.log" 2>&1; then
    echo "[demo] $name FAILED; last lines of $LOGS/$name.log:" >&2
    tail -n 15 "$LOGS/$name.log" >&2
    exit 1
  fi
  echo "[demo] $name: done in $(( $(date +%s) - t0 )) s"
  touch "$DONE/$name"
}

bundle() {  # bundle CONFIG_LIST OVERRIDES...: a MONAI bundle command of breast_dce_cmsl
  local configs=$1
  shift
  "$PY" -m monai.bundle run --config_file "$configs" --dataset_dir "$OUT/converted" --ckpt_dir "$OUT/models" \
    --output_dir "$LOGS/tensorboard" "$@"
}

# 1. synthetic DICOM archive (a failed earlier attempt is replaced: --force)
step synth "$BIN/medimb-prep" synth "$OUT/synth" --cases "$CASES" --seed 0 --force
# 2. DICOM -> NIfTI + sidecars (resumable by itself)
step convert "$BIN/medimb-prep" convert "$OUT/synth/archive" "$OUT/converted" --workers 2
# 3. datalist: subject-grouped, stratified splits; image = the DCE phases (pre first)
step datalist "$BIN/medimb-prep" datalist "$OUT/converted" --labels "$OUT/synth/labels.csv" --key case \
  -o "$OUT/converted/datalist.json" --seed 0 --class-names benign,malignant
# 4. stage 1: CMSL head + loss, instance-balanced sampling
step train_stage1 bundle "['$CONFIGS/train.json']" --train#trainer#max_epochs "$EPOCHS1"
# 5. stage 2: frozen backbone, classifier re-training with class-balanced sampling (cRT)
step train_stage2 bundle "['$CONFIGS/train.json','$CONFIGS/train_stage2.json']" \
  --train#trainer#max_epochs "$EPOCHS2"
# 6. evaluation on the test split: metrics.json, predictions.csv, ROC/PR/confusion-matrix plots
step evaluate bundle "['$CONFIGS/train.json','$CONFIGS/evaluate.json']" --eval_dir "$OUT/evaluation"
# 7. inference with COAM overlays in the source geometry
step inference "$PY" -m monai.bundle run --config_file "$CONFIGS/inference.json" --dataset_dir "$OUT/converted" \
  --ckpt_dir "$OUT/models" --output_dir "$OUT/overlays"

"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import csv
import json
import sys
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
m = json.loads((out / "evaluation" / "metrics.json").read_text())["test"]
splits = json.loads((out / "converted" / "datalist.json").read_text())
counts = {k: len(splits[k]) for k in ("training", "validation", "test")}
rows = list(csv.DictReader((out / "overlays" / "predictions.csv").open()))
overlays = sorted(p for p in (out / "overlays").glob("*_coam_on-*.nii.gz") if "_label" not in p.name)
pngs = sorted((out / "overlays" / "previews").glob("*.png"))
fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
print()
print("=" * 72)
print(f"medimb demo finished in {seconds} s (this run; finished steps are skipped on a re-run)")
print(f"  data:        {counts} cases (train/val/test), {out / 'converted'}")
print(f"  test ({m['num_samples']} cases): balanced accuracy {fmt(m['balanced_accuracy'])}, AUC {fmt(m['auc'])}, "
      f"accuracy {fmt(m['accuracy'])}, macro-F1 {fmt(m['macro_f1'])}")
print(f"  confusion matrix (rows true benign/malignant): {m['confusion_matrix']}")
print(f"  evaluation:  {out / 'evaluation'} (metrics.json, predictions.csv, plots/test/)")
print(f"  checkpoints: {out / 'models' / 'model.pt'} (stage 2), model_stage1.pt")
print(f"  overlays:    {len(overlays)} COAM heatmaps + label maps in {out / 'overlays'}")
print(f"  PNGs:        {len(pngs)} previews in {out / 'overlays' / 'previews'}")
print(f"  browse:      {out / 'overlays' / 'index.html'}")
print(f"  predictions: {out / 'overlays' / 'predictions.csv'} ({len(rows)} cases)")
print(f"  3D Slicer:   Slicer --python-script {out / 'overlays' / 'load_in_slicer.py'}")
print("=" * 72)
EOF
