#!/usr/bin/env bash
# The paper's ensemble: one memory bank per backbone (WideResNet-101, ResNeXt-101, DenseNet-201),
# scores normalised and averaged. Layers name their member: 0.layer2 is layer2 of the first.
# Kept working by tests/test_notebooks.py, which runs it on tiny generated data.
set -euo pipefail

usage="usage: examples/ensemble.sh [DATA] [OUT] [patchcore fit options...]

  DATA  MVTec AD root or one category folder; default data/mvtec
  OUT   results folder; default results/ensemble
  Further options go to \`patchcore fit\`, e.g. -d bottle, --device cuda, --batch-size 4.
  BACKBONES and LAYERS (space-separated) in the environment replace the paper's members and
  their layers."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then echo "$usage"; exit 0; fi

data=${1:-data/mvtec}
out=${2:-results/ensemble}
shift $(( $# < 2 ? $# : 2 ))
if [[ ! -d "$data" ]]; then
    echo "error: no dataset at $data; fetch MVTec AD with: patchcore download mvtec --root $data" >&2
    exit 2
fi

members=()
for backbone in ${BACKBONES:-wide_resnet101_2 resnext101_32x8d densenet201}; do
    members+=(-b "$backbone")
done
for layer in ${LAYERS:-0.layer2 0.layer3 1.layer2 1.layer3 2.features.denseblock2 \
                       2.features.denseblock3}; do
    members+=(-le "$layer")
done
patchcore fit "$data" -o "$out" "${members[@]}" -p 0.01 --preprocess crop \
    --aggregation reference --resize 256 --imagesize 224 --save-reports "$@"
echo "results: $out/results.csv"
