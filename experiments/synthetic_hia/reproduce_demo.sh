#!/usr/bin/env bash
# Train and evaluate the embedded demo model end to end on CPU (one torch thread per process, two processes at
# most at a time):
#
#     bash experiments/synthetic_hia/reproduce_demo.sh runs/demo
#
# Every stage skips itself when its output exists and the long loops checkpoint, so rerunning resumes a killed run.
# Step counts and learning rates were fixed before looking at the test split (see results/analysis.md).
set -euo pipefail
RUN=${1:-runs/demo}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$RUN/logs"
stage() { "$PY" "$HERE/demo_pipeline.py" "$@" --run "$RUN"; }
evaluate() {  # name, adapter (or "")
  [ -f "$RUN/eval/$1/scores.json" ] && return 0
  "$PY" -m qilin_med_vl.cli evaluate --model "$RUN/base" ${2:+--adapter "$2"} --data "$RUN/data/test.jsonl" \
    --image-root "$RUN/data" --output-dir "$RUN/eval/$1" --batch-size 16 --max-new-tokens 96 --name "$1" \
    > "$RUN/logs/evaluate-$1.log" 2>&1
}

# 1. data: rendered once, cached as uint8 views (seed 1: a fresh test split)
[ -n "${SKIP_DATA:-}" ] || [ -f "$RUN/data/cache/test.npz" ] || "$PY" "$HERE/data_cache.py" --output "$RUN/data" --seed 1 --train 2400 \
  --validation 200 --test 400 --workers 2 > "$RUN/logs/data.log" 2>&1
# 2. vision warm-up: CLIP tower at 112 px and HiA's encoder at 672 px, in parallel
stage vision --steps 2500 --batch-size 32 --lr 1e-3 > "$RUN/logs/vision.log" 2>&1 &
stage hr-encoder --steps 400 --batch-size 16 --crop 160 --lr 1e-3 > "$RUN/logs/hr-encoder.log" 2>&1 &
wait
# 3. language model on the frozen warmed tower  ||  controls table, then cached encoder features
stage base --steps 400 --batch-size 12 --lr 1e-3 > "$RUN/logs/base.log" 2>&1 &
{ stage controls > "$RUN/logs/controls.log" 2>&1; stage controls-auc > "$RUN/logs/controls-auc.log" 2>&1
  stage features > "$RUN/logs/features.log" 2>&1; } &
wait
# 4. HiA and its two ablations (same steps), each evaluated as soon as it is trained
evaluate base "" &
stage hia --variants HiA --steps 200 --batch-size 12 --lr 1e-3 > "$RUN/logs/hia.log" 2>&1
wait
evaluate HiA "$RUN/HiA" &
stage hia --variants HiA_wo_IA HiA_wo_HR --steps 200 --batch-size 12 --lr 1e-3 > "$RUN/logs/hia-ablations.log" 2>&1
wait
evaluate HiA_wo_IA "$RUN/HiA_wo_IA" &
{ evaluate HiA_wo_HR "$RUN/HiA_wo_HR"; [ -f "$RUN/pointing.json" ] || stage pointing > "$RUN/logs/pointing.log" 2>&1; }
wait
# 5. tables: BLEU-4/METEOR per task, finding-level accuracy, controls, pointing game
"$PY" "$HERE/analyze.py" "$RUN"
