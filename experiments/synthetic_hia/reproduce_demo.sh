#!/usr/bin/env bash
# Train and evaluate the embedded demo model end to end on CPU (one torch thread per process, two processes at
# most at a time):
#
#     bash experiments/synthetic_hia/reproduce_demo.sh runs/demo
#
# Every stage skips itself when its output exists and the long loops checkpoint, so rerunning resumes a killed run.
# Step counts and learning rates were fixed before looking at the test split (see results/analysis.md).
#
# TOWER: where the 112-px CLIP tower comes from. Default: the shipped demo model's tower (the `vision` stage's
# 2,500 steps on this seed's training split, then 600 steps in which every token also learns its own column; frozen
# ever since), of which only the lesion-map head is refitted for the controls; TOWER=scratch trains it here (about
# 25-40 min more on 2 shared cores).
# COMPARE_WITH: a previously shipped demo model folder, evaluated on the validation split next to the new one.
# FEATURE_RECORDS: cache HiA's high-resolution features for this many training records only (default all; runs A-F
# used 1000).
set -euo pipefail
RUN=${1:-runs/demo}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
TOWER=${TOWER:-$HERE/../../qilin_med_vl/demo_model}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$RUN/logs"
stage() { "$PY" "$HERE/demo_pipeline.py" "$@" --run "$RUN"; }
evaluate() {  # name, model, adapter (or ""), split
  local out="$RUN/eval/$1"; [ "$4" = test ] || out="$RUN/eval_$4/$1"
  [ -f "$out/scores.json" ] && return 0
  "$PY" -m qilin_med_vl.cli evaluate --model "$2" ${3:+--adapter "$3"} --data "$RUN/data/$4.jsonl" \
    --image-root "$RUN/data" --output-dir "$out" --batch-size 16 --max-new-tokens 96 --name "$1" \
    > "$RUN/logs/evaluate-$4-$1.log" 2>&1
}
# HiA trains with its own copies of what reads its last injection (decoder layer 3, the final norm, lm_head) at a
# tenth of its learning rate; the base's weights stay as they are (HiAConfig.modules_to_save). Normal knees are drawn
# 2x more again, so that an adapter that cannot see a flake (w/o HR) does not learn to guess one. ADAPTER_SEED
# (default 1: run K, shipped, chosen among seeds 0-2 on a comparative validation set; 0 gives run J) seeds the
# adapters' initialisation and batches.
hia() { stage hia --variants "$1" --steps 1200 --batch-size 12 --lr 1e-3 --flake-normal-weight 4 --normal-weight 2 \
  --feature-positions sincos --flake-pair-weight 3 --seed "${ADAPTER_SEED:-1}" \
  --modules-to-save language_model.layers.3 language_model.norm lm_head --modules-lr-scale 0.1 \
  > "$RUN/logs/hia-$1.log" 2>&1; }

# 1. data: rendered once, cached as uint8 views (seed 1: a fresh test split)
[ -n "${SKIP_DATA:-}" ] || [ -f "$RUN/data/cache/test.npz" ] || "$PY" "$HERE/data_cache.py" --output "$RUN/data" --seed 1 --train 2400 \
  --validation 200 --test 400 --workers 2 > "$RUN/logs/data.log" 2>&1
# 2. the 112-px tower (then the language model on it, frozen; each projected image token also learns the side of a
#    finding in its cell; normal knees drawn 3x, so that a knee that looks normal at 112 px is called normal)
#    ||  HiA's encoder at 672 px: its full-resolution stem first tells small-flake windows from the same windows of
#    normal knees (300 steps, about 10 s) and is kept as it is; then the rest of the encoder on 320-px crops on the
#    stride grid, normal images and finding-free crops as hard negatives, large-to-small flake curriculum; then
#    400 steps more in which a second head also regresses each flake's amount (log diameter x strength) on its
#    cells, so that how much flake a cell holds is in the features HiA reads
{ if [ "$TOWER" = scratch ]; then
    stage vision --steps 2500 --batch-size 32 --lr 1e-3 --output vision_low_plain.pt > "$RUN/logs/vision-plain.log" 2>&1
    stage vision --tower-from "$RUN/vision_low_plain.pt" --column-aux 1.0 --steps 600 --batch-size 32 --lr 3e-4 \
      > "$RUN/logs/vision.log" 2>&1
  else stage vision --tower-from "$TOWER" --steps 300 --batch-size 32 --lr 1e-2 > "$RUN/logs/vision.log" 2>&1; fi
  stage base --steps 1200 --batch-size 12 --lr 1e-3 --side-aux 0.5 --normal-weight 3 > "$RUN/logs/base.log" 2>&1; } &
{ stage hr-encoder --stem-warmup 300 --freeze-stem --steps 1200 --batch-size 16 --crop 320 --find-prob 0.5 \
    --curriculum 0.3 --pos-weight 10 --lr 1e-3 --eval-every 300 --output vision_high_detect.pt > "$RUN/logs/hr-encoder.log" 2>&1
  stage hr-encoder --encoder-from "$RUN/vision_high_detect.pt" --freeze-stem --steps 400 --batch-size 16 --crop 320 \
    --find-prob 0.5 --curriculum 0 --pos-weight 10 --lr 3e-4 --eval-every 100 --amount-aux 0.5 --amount-kinds flake \
    > "$RUN/logs/hr-encoder-amounts.log" 2>&1; } &
wait
# 3. controls table (its AUC view, and the comparative row's vision-only control), the flake-only diagnostic, cached
#    encoder features of every training record  ||  base evaluated
{ [ -f "$RUN/controls.json" ] || stage controls > "$RUN/logs/controls.log" 2>&1
  [ -f "$RUN/controls_auc.json" ] || stage controls-auc > "$RUN/logs/controls-auc.log" 2>&1
  [ -f "$RUN/controls_pairs.json" ] || stage controls-pairs > "$RUN/logs/controls-pairs.log" 2>&1
  [ -f "$RUN/tower_columns.json" ] || stage tower-columns > "$RUN/logs/tower-columns.log" 2>&1
  [ -f "$RUN/flake_focus.json" ] || "$PY" "$HERE/flake_focus.py" --run "$RUN" --steps 400 > "$RUN/logs/flake-focus.log" 2>&1
  stage features ${FEATURE_RECORDS:+--feature-records "$FEATURE_RECORDS"} > "$RUN/logs/features.log" 2>&1; } &
{ evaluate base "$RUN/base" "" test; evaluate base "$RUN/base" "" validation
  if [ -n "${COMPARE_WITH:-}" ]; then evaluate shipped_base "$COMPARE_WITH" "" validation
    evaluate shipped_HiA "$COMPARE_WITH" "$COMPARE_WITH/hia" validation; fi; } &
wait
# 4. HiA and its two ablations (same steps), each evaluated while the next one trains
hia HiA
hia HiA_wo_HR & { evaluate HiA "$RUN/base" "$RUN/HiA" test; evaluate HiA "$RUN/base" "$RUN/HiA" validation; } & wait
hia HiA_wo_IA & { evaluate HiA_wo_HR "$RUN/base" "$RUN/HiA_wo_HR" test
  [ -f "$RUN/pointing.json" ] || stage pointing > "$RUN/logs/pointing.log" 2>&1; } & wait
evaluate HiA_wo_IA "$RUN/base" "$RUN/HiA_wo_IA" test
# 5. diagnostic (12 min; DIAGNOSTICS=0 skips it): the flake-only fine-tune for 1,500 steps at lr 1e-3
[ "${DIAGNOSTICS:-1}" = 0 ] || [ -f "$RUN/flake_focus_1500.json" ] || "$PY" "$HERE/flake_focus.py" --run "$RUN" --steps 1500 \
  --lr 1e-3 --eval-every 250 --name flake_focus_1500 > "$RUN/logs/flake-focus-1500.log" 2>&1
# 6. tables: BLEU-4/METEOR per task, finding-level accuracy, controls, pointing game (test; validation for the choice)
"$PY" "$HERE/analyze.py" "$RUN" validation > "$RUN/logs/analyze-validation.log"
"$PY" "$HERE/analyze.py" "$RUN"
# 7. optional (SECOND_TEST=1, about 35 min more): a second, larger test set for the rows that the 400-record split
#    holds only 15-22 records of. The flake pairs, flake knees and normal knees of a seed-3 test split of 8,000
#    records (1,168 records, 364 small-flake pairs), rendered as that split would render them; nothing is chosen on it.
if [ "${SECOND_TEST:-0}" = 1 ]; then
  SECOND="$RUN/second_test"; mkdir -p "$SECOND/logs"
  "$PY" "$HERE/data_cache.py" --output "$SECOND/data" --seed 3 --train 0 --validation 0 --test 8000 \
    --only-task comparative disease --only-kind flake normal > "$SECOND/logs/data.log" 2>&1
  { RUN="$SECOND" evaluate base "$RUN/base" "" test; RUN="$SECOND" evaluate HiA "$RUN/base" "$RUN/HiA" test; } &
  { RUN="$SECOND" evaluate HiA_wo_HR "$RUN/base" "$RUN/HiA_wo_HR" test
    RUN="$SECOND" evaluate HiA_wo_IA "$RUN/base" "$RUN/HiA_wo_IA" test; } & wait
  "$PY" "$HERE/analyze.py" "$SECOND"
fi
