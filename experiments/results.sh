#!/usr/bin/env bash
# Reproduces docs/results.md for the current recipe: the full recipe (`make run-full`'s knobs over
# params.yaml), the warm start alone, the compute-matched warm start, the two reward controls and the
# base-model baselines, then the table, the paired comparisons, learning curves and samples.
#
#   bash experiments/results.sh            # ~4 h on 2 CPU cores (each GRPO run ~34 min, each evaluation ~10)
#
# The recipe and the controls are DVC experiments (`dvc exp show` lists them); each one's reports are
# also copied to results/<name>/ (git-ignored) for `fingrpo results`. Controls are registered in MLflow
# like any run but never promoted (register.min_improvement=1). Every comparison is on the held-out
# records params.yaml evaluates (data.eval_sets: FinQA dev's random 200 + the TAT-QA dev split, pooled).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
BASELINE_RECORDS=${BASELINE_RECORDS:-100}   # records per held-out set per extra baseline prompt format
BASELINES=${BASELINES:-"gold:1"}     # context mode:worked examples (also: gold:2 full:0 retrieved:0, ~3-6 min each)
# the full recipe's knobs, from the Makefile (one place): params.yaml is its quick profile
read -r -a FULL <<< "$(sed -n 's/^FULL_RECIPE := //p' Makefile)"
# the compute-matched warm start: supervised on GRPO's own pool (train.train_sources) from the base model,
# for about as long as warm start + GRPO ran (3 passes over 440 records ~ 2,500 s at ~15 s per step of 8;
# the recipe: warm start ~900 s + GRPO ~2,000 s)
MATCHED_POOL='data.train_sources=[{name: finqa, path: null}, {name: tatqa, path: prepared/tatqa_train.json, max_records: 330}]'
MATCHED_EPOCHS=${MATCHED_EPOCHS:-3}

keep() {  # copy the workspace's reports of the run just finished to $OUT/$1
  mkdir -p "$OUT/$1"
  for f in eval.json predictions.jsonl train_metrics.csv sft_metrics.csv train.json sft.json; do
    if [ -f "reports/$f" ]; then cp "reports/$f" "$OUT/$1/"; fi
  done
}
evaluate() {  # $1 adapter, $2 name: the held-out sets, served context (+ gold facts), no base model
  fingrpo evaluate --adapter "$1" --set evaluate.compare_base=false --set tracking.enabled=false \
    --set evaluate.output_path="$OUT/$2/eval.json" --set evaluate.predictions_path="$OUT/$2/predictions.jsonl"
}

# 1. the recipe: supervised warm start + GRPO on the verifiable rewards (params.yaml + FULL_RECIPE)
git checkout -- params.yaml   # each experiment starts from the committed params (exp run leaves its own)
dvc exp run -n recipe "${FULL[@]}"
keep recipe

# 2. the warm start alone (no GRPO), on the held-out sets
evaluate models/sft sft-only
cp reports/sft_metrics.csv reports/sft.json "$OUT/sft-only/"

# 3. the compute-matched warm start: more supervision instead of GRPO, on GRPO's prompts
fingrpo sft --set "$MATCHED_POOL" --set sft.epochs="$MATCHED_EPOCHS" --set tracking.enabled=false \
  --set sft.output_dir="$OUT/compute-matched/adapter" --set sft.metrics_path="$OUT/compute-matched/sft_metrics.csv" \
  --set sft.summary_path="$OUT/compute-matched/sft.json"
evaluate "$OUT/compute-matched/adapter" compute-matched

# 4. controls: the same recipe (same warm start, steps, G, lr, flags), only the training reward differs
ZERO=(-S rewards.weights.program_execution=0 -S rewards.weights.format=0
      -S rewards.weights.numbers_from_context=0 -S rewards.weights.operation=0)
CONTROL=(-S evaluate.compare_base=false -S register.min_improvement=1)
git checkout -- params.yaml
dvc exp run -n control-random "${FULL[@]}" "${ZERO[@]}" -S rewards.weights.random=1 "${CONTROL[@]}"
keep control-random
git checkout -- params.yaml
dvc exp run -n control-heuristic "${FULL[@]}" "${ZERO[@]}" -S rewards.weights.financial_qa=1 "${CONTROL[@]}"
keep control-heuristic
git checkout -- params.yaml

# 5. the base model with the other prompt formats (the recipe's eval.json holds base, gold, 0-shot)
for spec in $BASELINES; do
  mode=${spec%%:*}; shots=${spec##*:}
  name="baseline-$mode-${shots}shot"
  fingrpo evaluate --base-only --set prompt.context_mode="$mode" --set prompt.few_shot="$shots" \
    --set evaluate.max_records="$BASELINE_RECORDS" \
    --set evaluate.output_path="$OUT/$name/eval.json" --set evaluate.predictions_path="$OUT/$name/predictions.jsonl"
done

dvc exp show --only-changed --md > "$OUT/experiments.md" || true
fingrpo results "$OUT"/recipe "$OUT"/sft-only "$OUT"/compute-matched "$OUT"/control-random "$OUT"/control-heuristic "$OUT"/baseline-* \
  --output docs/results
