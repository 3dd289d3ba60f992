#!/usr/bin/env bash
# The one install procedure shared by `make install` (CI), the Dockerfiles and the light-venv
# test, so that a broken install step fails CI even where no Docker daemon runs.
#
#   scripts/install.sh full  VENV [EXTRAS]   torch 2.14.1 (CPU or CUDA wheel), then patchcore[EXTRAS]
#                                            (default extras: dev)
#   scripts/install.sh light VENV            patchcore without its dependencies + numpy, Pillow,
#                                            safetensors, onnxruntime: the torch-free inferencer
#
# VENV is created with $PYTHON (default python3) unless it exists; "-" installs into $PYTHON's
# environment instead (Docker images). PATCHCORE_EDITABLE=0 installs a copy instead of an
# editable install; TORCH_INDEX_URL picks a torch wheel index (e.g. the CPU-only one).
set -euo pipefail
mode=${1:?usage: scripts/install.sh full|light VENV [EXTRAS]}
venv=${2:?usage: scripts/install.sh full|light VENV [EXTRAS]}
extras=${3:-dev}
root=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
LIGHT_REQUIREMENTS="numpy>=1.24 pillow>=10 safetensors>=0.4 onnxruntime>=1.17"

if [ "$venv" = "-" ]; then
  py=$PYTHON
else
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  py=$venv/bin/python
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)
if [ "${PATCHCORE_EDITABLE:-1}" = "1" ]; then target=(-e "$root"); else target=("$root"); fi

"${pip[@]}" --upgrade pip
case "$mode" in
  full)
    # shellcheck disable=SC2086
    "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} $TORCH_PINS
    if [ "${PATCHCORE_EDITABLE:-1}" = "1" ]; then
      "${pip[@]}" -e "$root[$extras]"
    else
      "${pip[@]}" "$root[$extras]"
    fi
    ;;
  light)
    # shellcheck disable=SC2086
    "${pip[@]}" $LIGHT_REQUIREMENTS
    "${pip[@]}" --no-deps "${target[@]}"
    if "$py" -c "import torch" 2>/dev/null; then
      echo "install.sh light: torch is importable in $venv; the light install must not have it" >&2
      exit 1
    fi
    ;;
  *)
    echo "install.sh: unknown mode $mode (full or light)" >&2
    exit 2
    ;;
esac
