#!/usr/bin/env python
"""Mutation check: plant plausible one-line bugs in a copy of src/ and see whether tests notice.

For each mutant in MUTANTS the source tree is copied to a temporary folder, exactly one snippet
is replaced there, and the mutant's test files run with that copy first on PYTHONPATH
(`pytest -x -q`). The working tree is never modified. A mutant is *caught* when the tests fail
and *NOT CAUGHT* when they pass; the script exits 1 if any mutant survives.

Keeping the list current: every mutant names its file (or a list of candidate files: the first
one containing the snippet is used), the exact original text `find` and its `replace`ment. A
snippet that is no longer found, or found more than once, is reported as STALE and makes the
script exit 2 (after running the rest), so a refactor cannot silently retire a mutant. Before
the mutants run, the union of their test files must pass on the unmutated copy (baseline).

    .venv/bin/python scripts/mutation_check.py              # all mutants, working-tree src/
    .venv/bin/python scripts/mutation_check.py --list       # list mutants and snippet status
    .venv/bin/python scripts/mutation_check.py --only fpr   # mutants whose name contains "fpr"
    .venv/bin/python scripts/mutation_check.py --rev HEAD   # src/ as committed at a revision
    .venv/bin/python scripts/mutation_check.py --all-failures  # count every failing test

Exit status: 0 all caught; 1 a mutant survived; 2 stale snippets or a failing baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

SAMPLING = "src/patchcore/engine/sampling.py"
SCORING = "src/patchcore/engine/scoring.py"
INDEX = "src/patchcore/engine/index.py"
FEATURES = "src/patchcore/engine/features.py"
PREPROCESS = "src/patchcore/data/preprocess.py"
METRICS = "src/patchcore/evaluation/metrics.py"
# Calibration and the ensemble / bank code moved out of model.py during the refactor: candidates
# are tried in order.
CALIBRATION = ["src/patchcore/engine/calibration.py", "src/patchcore/model.py"]
PIPELINE = ["src/patchcore/engine/pipeline.py", "src/patchcore/model.py"]
BANK = ["src/patchcore/engine/bank.py", "src/patchcore/model.py"]

T_SAMPLING = ["tests/test_sampling.py"]
T_SCORING = ["tests/test_index_scoring.py"]
T_FEATURES = ["tests/test_features.py"]
T_GEOMETRY = ["tests/test_net_geometry.py"]
T_METRICS = ["tests/test_net_metrics.py"]
T_MODEL = ["tests/test_regressions.py"]
T_VIEWS = ["tests/test_preprocess.py", "tests/test_calibration.py"]

# name: short id; file: path or candidate paths; find: exact original text (must occur once);
# replace: the bug; tests: test files that must catch it; why: what the bug means.
MUTANTS: list[dict[str, Any]] = [
    # -- the nine the issue found uncaught --------------------------------------------------
    dict(name="coreset-start-no-sqrt", file=SAMPLING,
         find="mean += np.sqrt(_sq_dist_to(x, sq, s))",
         replace="mean += _sq_dist_to(x, sq, s)",
         tests=T_SAMPLING, why="approximate coreset start distances averaged without the root"),
    dict(name="coreset-chunk-norm-slice", file=SAMPLING,
         find="part += sq[s : s + chunk]",
         replace="part += sq[: len(part)]",
         tests=T_SAMPLING, why="chunked update adds the first chunk's norms to every chunk"),
    dict(name="patch-score-kth-not-mean", file=SCORING,
         find="return dist.mean(axis=1).reshape(b, h, w)",
         replace="return dist[:, -1].reshape(b, h, w)",
         tests=T_SCORING, why="patch score = k-th distance instead of the mean of k nearest"),
    dict(name="map-upsample-align-corners", file=SCORING,
         find='size=(imagesize, imagesize), mode="bilinear", align_corners=False)',
         replace='size=(imagesize, imagesize), mode="bilinear", align_corners=True)',
         tests=T_SCORING, why="anomaly maps upsampled with align_corners=True"),
    dict(name="feature-resize-align-corners", file=FEATURES,
         find='y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)',
         replace='y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)',
         tests=T_FEATURES, why="deeper layers resized with align_corners=True"),
    dict(name="to-original-ignores-crop", file=PREPROCESS,
         find='padded = np.pad(maps[0], ((top, rh - bottom), (left, rw - right)), mode="edge")',
         replace="padded = maps[0]  # the crop is stretched over the whole image",
         tests=T_GEOMETRY, why="map back-projection ignores the centre crop"),
    dict(name="fpr-allowed-ceil", file=METRICS,
         find="allowed = math.floor(fpr * s.size + 1e-9)",
         replace="allowed = math.ceil(fpr * s.size + 1e-9)",
         tests=T_METRICS + T_MODEL, why="threshold_at_fpr rounds the allowed count up"),
    dict(name="calibrate-fpr-round-down", file=CALIBRATION,
         find="float(np.nextafter(t32, np.float32(np.inf)) if float(t32) < thr else t32)",
         replace="float(t32)",
         tests=T_MODEL, why="FPR threshold rounded to nearest float32 (can flag a normal score)"),
    dict(name="calibrate-no-3-sigma", file=CALIBRATION,
         find="+ 3 * scores.std()",
         replace="+ 0 * scores.std()",
         tests=T_MODEL, why="normal-only calibration without the mean + 3 std margin"),
    dict(name="ensemble-not-normalised", file=PIPELINE,
         find="ps, img = (ps - mu) / sd, (img - mu) / sd",
         replace="ps, img = ps, img",
         tests=T_MODEL, why="ensemble members averaged on their raw distance scales"),
    # -- further plausible bugs -------------------------------------------------------------
    dict(name="ensemble-norm-self-distance", file=CALIBRATION,
         find="d = dist[:, -1]",
         replace="d = dist[:, 0]",
         tests=T_MODEL, why="member norm from each row's distance to itself (always 0)"),
    dict(name="image-score-mean", file=SCORING,
         find="s_star = flat[np.arange(b), best]",
         replace="s_star = flat.mean(axis=1)",
         tests=T_SCORING, why="image score = mean instead of max of patch scores"),
    dict(name="cosine-distance-sign", file=INDEX,
         find="dist = 1.0 - scores",
         replace="dist = 1.0 + scores",
         tests=T_SCORING, why="cosine distance with the similarity's sign flipped"),
    dict(name="eq7-weight-sign", file=SCORING,
         find="np.exp(dists - s_star[:, None])",
         replace="np.exp(s_star[:, None] - dists)",
         tests=T_SCORING, why="Eq. 7 reweighting with the exponent's sign flipped"),
    dict(name="nearest-row-kth", file=SCORING,
         find="idx[:, 0].reshape(b, h, w)",
         replace="idx[:, -1].reshape(b, h, w)",
         tests=T_SCORING, why="nearest bank row = k-th neighbour when k > 1"),
    dict(name="provenance-row-col-swapped", file=BANK,
         find="np.stack([(idx % per_image) // w, idx % w], axis=1)",
         replace="np.stack([idx % w, (idx % per_image) // w], axis=1)",
         tests=T_MODEL, why="bank provenance position stored as (col, row)"),
    dict(name="greedy-round-no-update", file=SAMPLING,
         find="values = torch.minimum(values, pair[j])",
         replace="values = values.clone()",
         tests=T_SAMPLING, why="batched greedy forgets to lower candidates after a pick"),
    dict(name="fpr-tie-flagged", file=METRICS,
         find="return float(np.nextafter(s[s.size - 1 - allowed], np.inf))",
         replace="return float(s[s.size - 1 - allowed])",
         tests=T_METRICS, why="FPR threshold at a normal score (flags it and its ties)"),
    dict(name="fpr-no-epsilon", file=METRICS,
         find="allowed = math.floor(fpr * s.size + 1e-9)",
         replace="allowed = math.floor(fpr * s.size)",
         tests=T_METRICS, why="0.29 * 100 = 28.999... allows 28 false positives"),
    dict(name="to-original-align-corners", file="src/patchcore/data/resample.py",
         find="* scale - np.float32(0.5)",
         replace="* scale - np.float32(0.0)",
         tests=T_GEOMETRY, why="map back-projection resized without the half-pixel offset"),
    # -- whole-image views and leave-one-image-out calibration ------------------------------
    dict(name="loo-keeps-own-rows", file=PIPELINE,
         find="int(np.searchsorted(views, exclude_views[1])))",
         replace="int(np.searchsorted(views, exclude_views[0])))",
         tests=T_VIEWS, why="leave-one-out scores still see the image's own bank rows"),
    dict(name="views-mean-not-max", file=SCORING,
         find="return np.maximum.reduceat(",
         replace="return np.add.reduceat(",
         tests=T_VIEWS, why="an image's score sums its views' scores instead of the max"),
    dict(name="stitch-no-average", file=PREPROCESS,
         find="return (total / np.maximum(count, 1)).astype(np.float32)",
         replace="return total.astype(np.float32)",
         tests=T_VIEWS, why="overlapping views are summed, not averaged, in whole-image maps"),
    dict(name="aspect-no-overlap", file=PREPROCESS,
         find=("step = stride if stride is not None else window * (1.0 - MIN_OVERLAP)\n"
               "    n = math.ceil"),
         replace="step = stride if stride is not None else window\n    n = math.ceil",
         tests=T_VIEWS, why="aspect views tile the image edge to edge without overlap"),
    # -- the torch-free inferencer (issue 13) ------------------------------------------------
    dict(name="export-search-offset-sign", file="src/patchcore/inference/search.py",
         find="sim -= offset[ba:bb][None, :]", replace="sim += offset[ba:bb][None, :]",
         tests=["tests/test_export.py"], why="blocked search ranks by q.b + |b|^2 / 2"),
    dict(name="export-no-ensemble-norm", file="src/patchcore/inference/search.py",
         find="ps, img = (ps - mu) / sd, (img - mu) / sd", replace="ps, img = ps - mu, img - mu",
         tests=["tests/test_export.py"], why="exported ensembles skip the std of the z-score"),
    dict(name="eq7-softmax-not-one-minus", file=SCORING,
         find="weight = 1.0 - 1.0 / np.exp(", replace="weight = 1.0 / np.exp(",
         tests=T_SCORING, why="Eq. 7 (shared by the exported inferencer) uses the softmax "
         "weight, not 1 - it"),
    dict(name="blur-truncate", file="src/patchcore/data/resample.py",
         find="TRUNCATE = 4.0", replace="TRUNCATE = 3.0",
         tests=["tests/test_export.py"], why="numpy blur kernel cut at 3 sigma, scipy's at 4"),
]


@dataclass
class Outcome:
    name: str
    file: str
    status: str  # caught / NOT CAUGHT / STALE / ...
    detail: str
    seconds: float


def _candidates(mutant: dict[str, Any]) -> list[str]:
    files = mutant["file"]
    return [files] if isinstance(files, str) else list(files)


def locate(mutant: dict[str, Any], src_root: Path) -> tuple[str | None, str]:
    """(file, "") for the file holding the snippet exactly once, else (None, why not)."""
    problems = []
    for rel in _candidates(mutant):
        path = src_root / rel
        if not path.is_file():
            problems.append(f"{rel}: no such file")
            continue
        count = path.read_text(encoding="utf-8").count(mutant["find"])
        if count == 1:
            return rel, ""
        problems.append(f"{rel}: snippet found {count} times" if count else
                        f"{rel}: snippet not found")
    return None, "; ".join(problems)


def copy_source(origin: Path, rev: str | None, dest: Path) -> Path:
    """Copy src/ (working tree, or `rev` via git archive) into dest; returns dest."""
    if rev is None:
        shutil.copytree(origin / "src", dest / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    else:
        archive = subprocess.run(["git", "-C", str(origin), "archive", rev, "src"],
                                 capture_output=True, check=True).stdout
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def environment(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into the working tree's tests/
    env.setdefault("PATCHCORE_OFFLINE", "1")
    return env


def check_import_location(src: Path) -> None:
    """The copy, not the installed (editable) package, must be what the tests import."""
    out = subprocess.run([sys.executable, "-c", "import patchcore; print(patchcore.__file__)"],
                         env=environment(src), cwd=REPO, capture_output=True, text=True)
    where = out.stdout.strip()
    if out.returncode or not Path(where).resolve().is_relative_to(src.resolve()):
        sys.exit(f"mutation_check: the tests would import patchcore from {where or out.stderr!r},"
                 f" not from the copy in {src}; aborting")


def run_tests(src: Path, tests: list[str], timeout: float, stop_first: bool = True
              ) -> tuple[int | None, str]:
    cmd = [sys.executable, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p",
           "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, env=environment(src), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    found = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)
    if found:
        more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
        return found[0].split("/")[-1] + more
    lines = [x for x in output.strip().splitlines() if x.strip()]
    return lines[-1][:90] if lines else "(no output)"


def print_table(outcomes: list[Outcome]) -> None:
    w_name = max(len(o.name) for o in outcomes)
    w_status = max(len(o.status) for o in outcomes)
    print()
    print(f"{'mutant':<{w_name}}  {'result':<{w_status}}  {'time':>6}  detail")
    print(f"{'-' * w_name}  {'-' * w_status}  {'-' * 6}  {'-' * 40}")
    for o in outcomes:
        print(f"{o.name:<{w_name}}  {o.status:<{w_status}}  {o.seconds:5.1f}s  {o.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[],
                        help="run mutants whose name contains this text (repeatable)")
    parser.add_argument("--list", action="store_true", help="list mutants and snippet status")
    parser.add_argument("--rev", help="take src/ from this git revision instead of the working"
                        " tree (read with git archive; nothing is checked out)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    parser.add_argument("--all-failures", action="store_true",
                        help="run every test of a mutant (no -x) and count all that fail")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first check that the tests pass on the unmutated code")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or any(o in m["name"] for o in args.only)]
    if not mutants:
        print("no mutant matches --only", file=sys.stderr)
        return 2
    names = [m["name"] for m in MUTANTS]
    if len(set(names)) != len(names):
        print("duplicate mutant names in MUTANTS", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="patchcore-mutants-") as tmp:
        pristine = copy_source(REPO, args.rev, Path(tmp) / "pristine") / "src"
        located = [(m, *locate(m, pristine.parent)) for m in mutants]
        if args.list:
            for m, rel, why in located:
                state = f"ok in {rel}" if rel else f"STALE: {why}"
                print(f"{m['name']:<30} {state:<45} tests: {' '.join(m['tests'])}")
            return 0 if all(rel for _, rel, _ in located) else 2

        check_import_location(pristine)
        if not args.skip_baseline:
            files = sorted({t for m, rel, _ in located if rel for t in m["tests"]})
            print(f"baseline: {' '.join(files)} on the unmutated source ...", flush=True)
            t0 = time.perf_counter()
            rc, out = run_tests(pristine, files, args.timeout)
            if rc != 0:
                print(out[-4000:])
                print(f"baseline FAILED ({first_failure(out)}): fix the tests or the code "
                      "first; a mutation check on failing tests means nothing", file=sys.stderr)
                return 2
            print(f"baseline passed in {time.perf_counter() - t0:.0f}s", flush=True)

        outcomes: list[Outcome] = []
        for i, (m, rel, why) in enumerate(located, 1):
            if rel is None:
                outcomes.append(Outcome(m["name"], "/".join(_candidates(m)), "STALE",
                                        f"snippet no longer applies: {why}", 0.0))
                print(f"[{i}/{len(located)}] {m['name']}: STALE ({why})", flush=True)
                continue
            work = Path(tmp) / f"m{i:02d}"
            shutil.copytree(pristine, work / "src")
            target = work / "src" / Path(rel).relative_to("src")
            text = target.read_text(encoding="utf-8")
            target.write_text(text.replace(m["find"], m["replace"], 1), encoding="utf-8")
            t0 = time.perf_counter()
            rc, out = run_tests(work / "src", m["tests"], args.timeout,
                                stop_first=not args.all_failures)
            seconds = time.perf_counter() - t0
            if rc == 0:
                status, detail = "NOT CAUGHT", f"{rel}: {m['why']}"
            elif rc == 1:
                status, detail = "caught", f"by {first_failure(out)}"
            elif rc is None:
                status, detail = "caught (timeout)", out
            else:
                status, detail = f"caught (pytest rc {rc})", first_failure(out)
            outcomes.append(Outcome(m["name"], rel, status, detail, seconds))
            print(f"[{i}/{len(located)}] {m['name']}: {status} ({seconds:.0f}s)", flush=True)
            shutil.rmtree(work, ignore_errors=True)

    print_table(outcomes)
    survived = [o for o in outcomes if o.status == "NOT CAUGHT"]
    stale = [o for o in outcomes if o.status == "STALE"]
    caught = len(outcomes) - len(survived) - len(stale)
    print(f"\n{caught} caught, {len(survived)} NOT CAUGHT, {len(stale)} stale, "
          f"of {len(outcomes)} mutants")
    if survived:
        return 1
    return 2 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
