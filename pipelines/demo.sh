#!/usr/bin/env bash
# The demo chain on the embedded synthetic dataset: render videos, extract C3D features,
# train the fc7 baseline and ASTAR (soft), evaluate both, print the results table.
# Rerunning resumes: each step skips work that is already complete.
# Sizes are environment variables so a quick run is one line:
#   DEMO_TRAIN=24 DEMO_VAL=8 DEMO_TEST=8 DEMO_EPOCHS=1 bash pipelines/demo.sh
set -euo pipefail
OUT=${DEMO_OUT:-out/demo}
TRAIN=${DEMO_TRAIN:-96}
VAL=${DEMO_VAL:-16}
TEST=${DEMO_TEST:-32}
EPOCHS=${DEMO_EPOCHS:-3}
VARIANTS=${DEMO_VARIANTS:-fc7 soft}
BEAM=${DEMO_BEAM:-5}
mkdir -p "$OUT"
start=$(date +%s)

if [ ! -f "$OUT/dataset/summary.json" ]; then
  make-demo-dataset --out "$OUT/dataset" --seed 0 --n-train "$TRAIN" --n-val "$VAL" --n-test "$TEST" --score
fi
extract-features "$OUT/dataset/video_files.csv" --out "$OUT/features" --backbone c3d-small --workers 1
inspect-store "$OUT/features"

runs=()
for variant in $VARIANTS; do
  run="$OUT/runs/$variant"
  if [ ! -f "$run/done" ]; then
    resume=()
    [ -f "$run/last.pt" ] && resume=(--resume)
    train-captioner --store "$OUT/features" --dataset "$OUT/dataset" --variant "$variant" \
      --preset small --epochs "$EPOCHS" --out "$run" "${resume[@]}"
    touch "$run/done"
  fi
  evaluate-captioner --checkpoint "$run/best.pt" --store "$OUT/features" \
    --dataset "$OUT/dataset" --split test --beam "$BEAM" --out "$OUT/eval/$variant" --figures 3 -q
  runs+=("$OUT/eval/$variant")
done
report "${runs[@]}" --reference "$OUT/dataset/reference_scores.json" --out "$OUT/report"
echo "demo finished in $(( $(date +%s) - start )) s; table in $OUT/report/report.md"
