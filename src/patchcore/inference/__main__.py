"""`python -m patchcore.inference DIR IMAGE...`: score images with an export folder, one JSON
line per image (path, score, calibrated score, label), without torch or click."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence

from ..errors import PatchCoreError
from .inferencer import Inferencer
from .runtime import PRECISIONS, RUNTIMES


def main(argv: Sequence[str] | None = None) -> int:
    """Run the light command line; returns the exit code (2 with one line on bad input)."""
    parser = argparse.ArgumentParser(prog="python -m patchcore.inference",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="folder written by `patchcore export`")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        inferencer = Inferencer(args.export, runtime=args.runtime, batch_size=args.batch_size,
                                threads=args.threads, precision=args.precision)
        pred = inferencer.predict(args.images)
    except PatchCoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, path in enumerate(pred.paths):
        calibrated = float(pred.calibrated[i])
        print(json.dumps({"path": str(path), "score": float(pred.scores[i]),
                          "calibrated_score": None if math.isnan(calibrated) else calibrated,
                          "label": pred.label_names[i]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
