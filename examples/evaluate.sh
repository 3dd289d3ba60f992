#!/usr/bin/env bash
# Evaluate the saved models of a `patchcore fit` results folder on a dataset's test images, with
# every optional output: reports, image | mask | overlay strips, and a CSV of scores.
# Kept working by tests/test_notebooks.py, which runs it on tiny generated data.
set -euo pipefail

usage="usage: examples/evaluate.sh [RESULTS] [DATA] [patchcore evaluate options...]

  RESULTS  a \`patchcore fit\` results folder (models/<category>) or one model folder;
           default results/mvtec
  DATA     dataset root or one category folder; default data/mvtec
  Further options go to \`patchcore evaluate\`, e.g. -d bottle, --imagesize 320 --resize 366."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then echo "$usage"; exit 0; fi

results=${1:-results/mvtec}
data=${2:-data/mvtec}
shift $(( $# < 2 ? $# : 2 ))
if [[ ! -d "$data" ]]; then
    echo "error: no dataset at $data; fetch MVTec AD with: patchcore download mvtec --root $data" >&2
    exit 2
fi

patchcore evaluate "$results" "$data" --save-reports --save-segmentation-images \
    --save-anomaly-scores "$@"
echo "results: $results/results.csv, reports: $results/reports, images: $results/segmentation"
