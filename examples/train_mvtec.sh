#!/usr/bin/env bash
# Fit and evaluate PatchCore on every MVTec AD category the way the paper does (WideResNet-50,
# layer2 + layer3, 10% coreset, resize 256 + centre crop 224), with a report per category.
# Kept working by tests/test_notebooks.py, which runs it on tiny generated data.
set -euo pipefail

usage="usage: examples/train_mvtec.sh [DATA] [OUT] [patchcore fit options...]

  DATA  MVTec AD root (category folders with train/good, test/, ground_truth/); default data/mvtec
  OUT   results folder: models/<category>, reports/<category>, results.csv; default results/mvtec
  Further options go to \`patchcore fit\` (a repeated option wins over the script's), e.g.
  -d bottle -d cable, --device cuda. -b and -le add up instead: set BACKBONE and LAYERS
  (space-separated) in the environment to replace wide_resnet50_2 and \"layer2 layer3\"."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then echo "$usage"; exit 0; fi

data=${1:-data/mvtec}
out=${2:-results/mvtec}
shift $(( $# < 2 ? $# : 2 ))
if [[ ! -d "$data" ]]; then
    echo "error: no dataset at $data; fetch MVTec AD with: patchcore download mvtec --root $data" >&2
    exit 2
fi

layers=()
for layer in ${LAYERS:-layer2 layer3}; do layers+=(-le "$layer"); done
patchcore fit "$data" -o "$out" -b "${BACKBONE:-wide_resnet50_2}" "${layers[@]}" -p 0.1 \
    --preprocess crop --aggregation reference --resize 256 --imagesize 224 --save-reports "$@"
echo "results: $out/results.csv, reports: $out/reports/<category>/index.html"
