#!/usr/bin/env bash
# The README's FracAtlas ablation runs, one train_all command each, then the table.
# Usage: bash scripts/fracatlas_ablations.sh [DATA] [OUT] [ROW ...]
#   DATA: the folder containing FracAtlas/ (default ../shared/data/fracatlas)
#   OUT:  where the runs go (default runs/ablations); a run whose bundle exists is not redone
#   ROW:  which rows to run (default: all, in the order below)
# Each row runs for minutes to an hour on a 2-core CPU: see README "Finding the fracture".
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/fracatlas}
OUT=${2:-runs/ablations}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$OUT"
RECIPE=pipelines/recipes/fracatlas_cpu.yaml
# The papers' preprocessing and transfer recipes share one cheaper budget (224 px, 2 epochs, no
# fracture map) so that they can all run; "papers-baseline" is their reference row.
PAPERS="--image-size 224 --epochs 2 --no-localization --no-tta-flip"
declare -A ROWS=(
  [recipe]=""
  [recipe-seed1]="--seed 1"
  [recipe-no-map]="--no-localization"
  [recipe-no-tta]="--no-tta-flip"
  [recipe-224]="--image-size 224"
  [papers-baseline]="$PAPERS"
  [papers-sobel]="$PAPERS --enhancement sobel"
  [papers-prewitt]="$PAPERS --enhancement prewitt"
  [papers-roberts]="$PAPERS --enhancement roberts"
  [papers-canny]="$PAPERS --enhancement canny"
  [papers-laplacian1.5]="$PAPERS --enhancement laplacian_sharpen --sharpen-factor 1.5"
  [papers-laplacian3.0]="$PAPERS --enhancement laplacian_sharpen --sharpen-factor 3.0"
  [papers-per-image]="$PAPERS --normalization per_image"
  [papers-last20-bn-frozen]="$PAPERS --strategy last20_bn_frozen"
  [papers-last60-dense3]="$PAPERS --strategy last60 --head dense3"
  [papers-hardware-free]="$PAPERS --exclude-hardware"
)
ORDER=(recipe recipe-no-map papers-baseline papers-laplacian1.5 papers-sobel papers-per-image
       papers-last20-bn-frozen papers-last60-dense3 papers-laplacian3.0 papers-canny papers-prewitt papers-roberts
       papers-hardware-free recipe-seed1 recipe-no-tta recipe-224)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  [ -n "${ROWS[$row]+x}" ] || { echo "unknown row $row; rows: ${!ROWS[*]}" >&2; exit 2; }
  if [ -f "$OUT/$row/models/fracture_all/bundle.json" ]; then echo "[$row] done already"; continue; fi
  echo "[$row] $(date -u +%H:%M) train_all.py --config $RECIPE ${ROWS[$row]}"
  # shellcheck disable=SC2086
  .venv/bin/python pipelines/train_all.py --config "$RECIPE" --dataset fracatlas --data "$DATA" \
      --output "$OUT/$row" ${ROWS[$row]} > "$OUT/$row.log" 2>&1 || echo "[$row] FAILED: see $OUT/$row.log"
done
.venv/bin/python pipelines/ablation_table.py $(for row in "${ORDER[@]}"; do
  [ -f "$OUT/$row/models/fracture_all/bundle.json" ] && echo "$OUT/$row"; done)
