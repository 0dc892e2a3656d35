#!/usr/bin/env bash
# Reproduces docs/results.md: the recipe (params.yaml as committed), the warm start alone, the two
# controls and the base-model baselines, then the table, learning curves and samples.
#
#   bash experiments/results.sh            # ~45 min on 2 CPU cores after `make run` (the recipe is cached)
#
# The recipe and the controls are DVC experiments (`dvc exp show` lists them); each one's reports are
# also copied to results/<name>/ (git-ignored) for `fingrpo results`. Controls are registered in MLflow
# like any run but never promoted (register.min_improvement=1).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results}
BASELINE_RECORDS=${BASELINE_RECORDS:-100}   # records per held-out set per extra baseline prompt format
BASELINES=${BASELINES:-"gold:1"}     # context mode:worked examples (also: gold:2 full:0 retrieved:0, ~3-6 min each)
# the held-out records the comparisons use: FinQA dev's random sample and the TAT-QA dev split (pooled)
HELD_OUT='data.eval_sets=[{name: finqa_random, split: dev, subset: random, pooled: true}, {name: tatqa, path: prepared/tatqa_dev.json, pooled: true}]'

keep() {  # copy the workspace's reports of the run just finished to $OUT/$1
  mkdir -p "$OUT/$1"
  for f in eval.json predictions.jsonl train_metrics.csv sft_metrics.csv train.json sft.json; do
    if [ -f "reports/$f" ]; then cp "reports/$f" "$OUT/$1/"; fi
  done
}

# 1. the recipe: supervised warm start + GRPO on the verifiable rewards (params.yaml)
git checkout -- params.yaml   # each experiment starts from the committed params (exp run leaves its own)
dvc exp run -n recipe
keep recipe

# 2. the warm start alone (no GRPO), on the held-out sets
fingrpo evaluate --adapter models/sft --set "$HELD_OUT" --set evaluate.compare_base=false \
  --set tracking.enabled=false --set evaluate.output_path="$OUT/sft-only/eval.json" \
  --set evaluate.predictions_path="$OUT/sft-only/predictions.jsonl"
cp reports/sft_metrics.csv "$OUT/sft-only/"

# 3. controls: the same recipe (same warm start, steps, G, lr), only the training reward differs
ZERO=(-S rewards.weights.program_execution=0 -S rewards.weights.format=0
      -S rewards.weights.numbers_from_context=0 -S rewards.weights.operation=0)
CONTROL=(-S "$HELD_OUT" -S evaluate.compare_base=false -S register.min_improvement=1)
git checkout -- params.yaml
dvc exp run -n control-random "${ZERO[@]}" -S rewards.weights.random=1 "${CONTROL[@]}"
keep control-random
git checkout -- params.yaml
dvc exp run -n control-heuristic "${ZERO[@]}" -S rewards.weights.financial_qa=1 "${CONTROL[@]}"
keep control-heuristic
git checkout -- params.yaml

# 4. the base model with the other prompt formats (the recipe's eval.json holds base, gold, 0-shot)
for spec in $BASELINES; do
  mode=${spec%%:*}; shots=${spec##*:}
  name="baseline-$mode-${shots}shot"
  fingrpo evaluate --base-only --set prompt.context_mode="$mode" --set prompt.few_shot="$shots" \
    --set "$HELD_OUT" --set evaluate.max_records="$BASELINE_RECORDS" \
    --set evaluate.output_path="$OUT/$name/eval.json" --set evaluate.predictions_path="$OUT/$name/predictions.jsonl"
done

dvc exp show --only-changed --md > "$OUT/experiments.md" || true
fingrpo results "$OUT"/recipe "$OUT"/sft-only "$OUT"/control-random "$OUT"/control-heuristic "$OUT"/baseline-* \
  --output docs/results
