#!/usr/bin/env bash
# `make demo`: the whole medimb pipeline on a synthetic breast DCE-MRI archive, run the way a user runs it:
#   medimb-prep synth -> convert -> datalist -> breast_dce_cmsl bundle: stage 1 (CMSL), stage 2 (cRT),
#   the operating point (threshold chosen on validation), evaluation of the test split (metrics with 95 %
#   intervals, predictions.csv, plots), inference with COAM and Grad-CAM overlays (NIfTI, label maps, PNGs,
#   index.html, 3D Slicer loader) scored against the synthetic truth masks -> a short summary.
#
# Usage: bash bundles/demo.sh OUT_DIR [N_CASES]   (default 100 cases, 30 % malignant, split 40/20/40 %:
# 40 test cases, 12 malignant, so the test figures mean something)
# Writes under OUT_DIR only. Restartable: finished steps are skipped (a step's marker in OUT_DIR/.done is
# written only when it succeeds); an interrupted step is redone. Epochs: DEMO_EPOCHS1 / DEMO_EPOCHS2.
set -euo pipefail

OUT_ARG=${1:?usage: bash bundles/demo.sh OUT_DIR [N_CASES]}
CASES=${2:-100}
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
step synth "$BIN/medimb-prep" synth "$OUT/synth" --cases "$CASES" --positive-fraction 0.3 --seed 0 --force
# 2. DICOM -> NIfTI + sidecars (resumable by itself)
step convert "$BIN/medimb-prep" convert "$OUT/synth/archive" "$OUT/converted" --workers 2
# 3. datalist: subject-grouped, stratified splits (40 % test); image = the DCE phases (pre first); the truth masks
step datalist "$BIN/medimb-prep" datalist "$OUT/converted" --labels "$OUT/synth/labels.csv" --key case \
  -o "$OUT/converted/datalist.json" --seed 0 --class-names benign,malignant --val 0.2 --test 0.4 \
  --masks "$OUT/synth/truth"
# 4. stage 1: CMSL head + loss, instance-balanced sampling
step train_stage1 bundle "['$CONFIGS/train.json']" --train#trainer#max_epochs "$EPOCHS1"
# 5. stage 2: frozen backbone, classifier re-training with class-balanced sampling (cRT)
step train_stage2 bundle "['$CONFIGS/train.json','$CONFIGS/train_stage2.json']" \
  --train#trainer#max_epochs "$EPOCHS2"
# 6. operating point: the decision threshold chosen on the validation split (balanced accuracy), stored in model.pt
step operating_point bundle "['$CONFIGS/train.json','$CONFIGS/evaluate.json']" --split validation \
  --choose_operating_point balanced_accuracy --eval_dir "$OUT/evaluation_validation"
# 7. evaluation on the test split at that threshold: metrics.json (95 % intervals), predictions.csv, plots/test/
step evaluate bundle "['$CONFIGS/train.json','$CONFIGS/evaluate.json']" --eval_dir "$OUT/evaluation"
# 8. inference on the test split: COAM, multi-scale COAM and Grad-CAM overlays in the source geometry, scored
# against the masks
step inference "$PY" -m monai.bundle run --config_file "$CONFIGS/inference.json" --dataset_dir "$OUT/converted" \
  --ckpt_dir "$OUT/models" --output_dir "$OUT/overlays" --overwrite true --explain_methods "['coam','coam_ms','gradcam']"

"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import json
import sys
from pathlib import Path

from medimb.evaluation.metrics import format_ci_summary

out, seconds = Path(sys.argv[1]), int(sys.argv[2])
m = json.loads((out / "evaluation" / "metrics.json").read_text())["test"]
splits = json.loads((out / "converted" / "datalist.json").read_text())
counts = {k: len(splits[k]) for k in ("training", "validation", "test")}
malignant = sum(1 for item in splits["test"] if item["label"] == 1)
explained = json.loads((out / "overlays" / "explain.json").read_text())
overlays = sorted(p for p in (out / "overlays").glob("*_coam_on-*.nii.gz") if "_label" not in p.name)
print()
print("=" * 78)
print(f"medimb demo finished in {seconds} s (this run; finished steps are skipped on a re-run)")
print(f"  data:        {counts} cases, {malignant} malignant in test, {out / 'converted'}")
print(f"  test ({m['num_samples']} cases, 95 % intervals):")
print(f"               {format_ci_summary(m)}")
print(f"  confusion matrix at threshold {m['threshold']:.3f} (rows true benign/malignant): {m['confusion_matrix']}")
# the maps explain malignancy: scored on the malignant lesions (label 1); the benign masses (label 0) beside them
print("  maps vs the truth masks (pointing game: the map's peak inside the lesion):")
for method, loc in explained.get("localization", {}).items():
    by_label = loc.get("by_label", {})
    mal, ben = by_label.get("1"), by_label.get("0")
    if mal:
        print(f"  {method + ':':<12} pointing game {mal['pointing_game']:.2f} ({mal['hits']}/{mal['cases']} malignant "
              f"lesions), map centre {mal['com_distance_mm_median']:.1f} mm from the lesion's (median)"
              + (f"; benign masses {ben['hits']}/{ben['cases']}" if ben else ""))
print(f"  evaluation:  {out / 'evaluation'} (metrics.json, predictions.csv, plots/test/)")
print(f"  checkpoints: {out / 'models' / 'model.pt'} (stage 2, with its operating point), model_stage1.pt")
print(f"  overlays:    {len(overlays)} COAM heatmaps (+ Grad-CAM, label maps) in {out / 'overlays'}")
print(f"  browse:      {out / 'overlays' / 'index.html'}")
print(f"  3D Slicer:   Slicer --python-script {out / 'overlays' / 'load_in_slicer.py'}")
print("=" * 78)
EOF
