#!/usr/bin/env bash
# Reproduce the shipped model (models/fracatlas) from the committed recipe, end to end:
#   train (pipelines/recipes/fracatlas_cpu.yaml) -> ship (float16 bundle + model index)
#   -> evaluate the shipped bundle on the valid split -> shift table -> the model card.
# Usage: bash scripts/fracatlas_shipped_model.sh <folder containing FracAtlas/> <run folder> [seed]
# On a 2-core CPU with avx512_bf16 the training takes about 30 minutes (docs/results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: $0 <folder containing FracAtlas/> <run folder> [seed]}
run=${2:?usage: $0 <folder containing FracAtlas/> <run folder> [seed]}
seed=${3:-0}
out=${SHIP_TO:-models/fracatlas}
py=.venv/bin/python
train=(pipelines/train_all.py --config pipelines/recipes/fracatlas_cpu.yaml --dataset fracatlas --data "$data"
       --output "$run" --seed "$seed")
start=$(date +%s)
"$py" "${train[@]}"
echo "training: $(( $(date +%s) - start )) s" | tee "$run/wall_time.txt"
"$py" pipelines/ship_model.py --bundle "$run/models/fracture_all" --output "$out"
"$py" pipelines/evaluate.py --models "$out" --dataset fracatlas --data "$data" --split valid \
    --output "$run/eval-shipped" > "$run/eval-shipped.json"
"$py" pipelines/shift_eval.py --models "$out" --dataset fracatlas --data "$data" --split valid \
    --output "$run/shift"
"$py" pipelines/ship_model.py --bundle "$run/models/fracture_all" --output "$out" \
    --evaluation "$run/eval-shipped" --shift "$run/shift" \
    --command "bash scripts/fracatlas_shipped_model.sh $data $run $seed  (python ${train[*]})"
echo "Shipped to $out: see $out/MODEL_CARD.md"
