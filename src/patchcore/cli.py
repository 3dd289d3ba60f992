"""The `patchcore` command line: thin commands over the library."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from . import __version__
from .config import PatchCoreConfig, RuntimeSettings, split_overrides
from .errors import PatchCoreError

app = typer.Typer(
    help="PatchCore anomaly detection: fit on normal images, evaluate, predict.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
log = logging.getLogger("patchcore")


class State:
    quiet = False


# -- shared options ---------------------------------------------------------------------------

Backbone = Annotated[list[str], typer.Option("-b", "--backbone", help="Backbone name; repeat for an ensemble.")]
Layer = Annotated[list[str], typer.Option("-le", "--layer", help="Layer to take features from; repeat. Ensembles: 0.layer2.")]
Categories = Annotated[list[str], typer.Option("-d", "--category", help="Category folder under DATA; repeat. Default: all.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Layout = Annotated[str, typer.Option("--layout", help="auto, mvtec, val or folder.")]
SaveReports = Annotated[bool, typer.Option(
    "--save-reports",
    help="Plots, Bad_predictions.xlsx, index.html per category in OUT/reports/<category>.")]
SaveSegmentation = Annotated[bool, typer.Option(
    "--save-segmentation-images",
    help="image | mask | overlay PNGs under OUT/segmentation/<category>.")]
SaveScores = Annotated[bool, typer.Option(
    "--save-anomaly-scores", help="CSV of path, group, label, score: OUT/scores/<category>.csv.")]
LogProject = Annotated[str | None, typer.Option(
    "--log-project", help="Write results under OUT/<project>/<group>.")]
LogGroup = Annotated[str | None, typer.Option(
    "--log-group", help="Run group under the project folder.")]
Tracker = Annotated[str | None, typer.Option(
    "--tracker", help="Also log to mlflow or wandb (if installed; local/offline store).")]


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    State.quiet = quiet


@app.callback()
def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """PatchCore anomaly detection."""
    _setup_logging(quiet, verbose)


def _echo(text: str) -> None:
    if not State.quiet:
        typer.echo(text)


def _config(**values: Any) -> tuple[PatchCoreConfig, RuntimeSettings]:
    backbones = values.pop("backbone") or ["efficientnet_lite2"]
    layers = values.pop("layer") or None
    from .engine.pipeline import parse_members

    hyper, runtime = split_overrides(values)
    config = PatchCoreConfig(
        backbone=backbones[0] if len(backbones) == 1 else tuple(backbones),
        layers=tuple(layers) if layers else None, **hyper,
    )
    parse_members(config.backbone, config.layers)  # unknown backbones fail before any work
    return config, RuntimeSettings(**runtime, progress=not State.quiet)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from .evaluation.evaluate import mean_row

    cols = ["category", "image_auroc", "pixel_auroc", "pro", "f1_max", "f1_at_threshold",
            "predict_ms_per_image"]
    table = rows + ([mean_row(rows)] if len(rows) > 1 else [])
    widths = [max(len(c), 10) for c in cols]
    widths[0] = max([len(str(r.get("category"))) for r in table] + [8])
    typer.echo("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in table:
        cells = []
        for c, w in zip(cols, widths, strict=True):
            v = r.get(c, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else ""))
                         .ljust(w))
        typer.echo("  ".join(cells))


# -- commands ---------------------------------------------------------------------------------

@app.command()
def fit(
    data: Annotated[Path, typer.Argument(help="Dataset root (category folders) or one category.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Results folder.")] = Path("results"),
    category: Categories = None,
    layout: Layout = "auto",
    normal: Annotated[str, typer.Option(help="Name of the normal-images folder.")] = "good",
    train_val_split: Annotated[float, typer.Option(help="Keep this share of train, rest is validation.")] = 1.0,
    backbone: Backbone = None,
    layer: Layer = None,
    weights: Annotated[str | None, typer.Option(help="Local weights file or folder.")] = None,
    random_weights: Annotated[bool, typer.Option(help="Random backbone weights (tests, speed).")] = False,
    pretrain_embed_dimension: Annotated[int, typer.Option()] = 1024,
    target_embed_dimension: Annotated[int, typer.Option()] = 1024,
    anomaly_scorer_num_nn: Annotated[int, typer.Option()] = 1,
    patchsize: Annotated[int, typer.Option()] = 3,
    patchstride: Annotated[int, typer.Option()] = 1,
    percentage: Annotated[float, typer.Option("-p", "--percentage", help="Coreset share.")] = 0.1,
    sampler: Annotated[str, typer.Option(help="approx_greedy_coreset, greedy_coreset, random, identity.")] = "approx_greedy_coreset",
    distance: Annotated[str, typer.Option(help="euclidean or cosine.")] = "euclidean",
    reweight: Annotated[bool, typer.Option(help="Image score reweighting (paper Eq. 7).")] = False,
    resize: Annotated[int, typer.Option()] = 256,
    imagesize: Annotated[int, typer.Option()] = 224,
    index: Annotated[str, typer.Option(help="faiss index: flat, ivf or hnsw.")] = "flat",
    bank_dtype: Annotated[str, typer.Option(help="float32 or float16.")] = "float32",
    backbone_dtype: Annotated[str, typer.Option(help="Backbone precision: float32, float16 or bfloat16 (large models; bfloat16 on CPU).")] = "float32",
    max_memory: Annotated[float | None, typer.Option(help="MB of RAM for training features before spilling to disk.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option()] = 8,
    num_workers: Annotated[int, typer.Option(help="Image decoding worker processes.")] = 0,
    evaluate: Annotated[bool, typer.Option(help="Evaluate on the test set after fitting.")] = True,
    max_train: Annotated[int | None, typer.Option(
        help="Use only the first N training images.")] = None,
    threshold_fpr: Annotated[float | None, typer.Option(
        help="Image threshold at this false-positive rate of normal validation scores.")] = None,
    threshold_percentile: Annotated[float | None, typer.Option(
        help="Image threshold at this percentile (0-100) of normal validation scores.")] = None,
    save_reports: SaveReports = False,
    save_segmentation_images: SaveSegmentation = False,
    save_anomaly_scores: SaveScores = False,
    log_project: LogProject = None,
    log_group: LogGroup = None,
    tracker: Tracker = None,
) -> None:
    """Fit one model per category and save it under OUTPUT/models/<category>."""
    from .data.layouts import category_folders, load_dataset
    from .evaluation.evaluate import evaluate_split, write_results
    from .model import PatchCore

    config, settings = _config(
        backbone=backbone, layer=layer, weights=weights, pretrained=not random_weights,
        pretrain_embed_dimension=pretrain_embed_dimension,
        target_embed_dimension=target_embed_dimension,
        anomaly_scorer_num_nn=anomaly_scorer_num_nn, patchsize=patchsize, patchstride=patchstride,
        percentage=percentage, sampler=sampler, distance=distance, reweight=reweight,
        resize=resize, imagesize=imagesize, index=index, bank_dtype=bank_dtype,
        backbone_dtype=backbone_dtype,
        max_memory_mb=max_memory, seed=seed, device=device, batch_size=batch_size,
        num_workers=num_workers,
        threshold_fpr=threshold_fpr, threshold_percentile=threshold_percentile,
    )
    from .reports.tracking import Tracker as _Tracker
    from .reports.tracking import run_folder

    output = run_folder(output, log_project, log_group)
    track = _Tracker(tracker, output, log_project, log_group, "fit")
    track.log_params({**config.to_dict(), **dataclasses.asdict(settings)})
    rows = []
    for folder in category_folders(data, category):
        split = load_dataset(folder, layout, normal, train_val_split, seed)
        if max_train is not None:
            split.train = split.train[:max_train]
        model = PatchCore(config, settings)
        t0 = time.perf_counter()
        model.fit(split)
        fit_s = time.perf_counter() - t0
        path = model.save(output / "models" / split.name)
        _echo(f"{split.name}: fitted in {fit_s:.1f}s on {len(split.train)} images -> {path}")
        if evaluate and split.test:
            row, pred = evaluate_split(model, split)
            row["fit_seconds"] = round(fit_s, 2)
            rows.append(row)
            _save_outputs(model, split, pred, row, output, normal, save_reports,
                          save_segmentation_images, save_anomaly_scores)
            track.log_metrics(row, prefix=f"{split.name}/")
    if rows:
        csv_path = write_results(rows, output)
        _print_table(rows)
        _echo(f"results: {csv_path}")
    track.finish()


def _save_outputs(
    model: Any, split: Any, pred: Any, row: dict[str, Any], output: Path, normal: str,
    reports: bool, segmentation: bool, scores: bool,
) -> None:
    """The optional per-category outputs of fit/evaluate (--save-reports etc.)."""
    from .reports import save_anomaly_scores, save_segmentation_images, write_category_report

    if reports:
        files = write_category_report(model, split, pred, row, output / "reports" / split.name,
                                      normal=normal)
        _echo(f"{split.name}: report {files['index']}")
    if segmentation:
        save_segmentation_images(model, split.test, pred, output / "segmentation" / split.name)
    if scores:
        save_anomaly_scores(pred, output / "scores" / f"{split.name}.csv")


@app.command()
def evaluate(
    results: Annotated[Path, typer.Argument(help="Results folder of `fit` (with models/), or one model folder.")],
    data: Annotated[Path, typer.Argument(help="Dataset root or category folder.")],
    category: Categories = None,
    layout: Layout = "auto",
    normal: Annotated[str, typer.Option(help="Name of the normal-images folder.")] = "good",
    resize: Annotated[int | None, typer.Option(help="Evaluate at another resize than training.")] = None,
    imagesize: Annotated[int | None, typer.Option(help="Evaluate at another crop size.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where results.csv goes (default RESULTS).")] = None,
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option()] = None,
    save_reports: SaveReports = False,
    save_segmentation_images: SaveSegmentation = False,
    save_anomaly_scores: SaveScores = False,
    log_project: LogProject = None,
    log_group: LogGroup = None,
    tracker: Tracker = None,
) -> None:
    """Load saved models and evaluate them on their categories' test sets."""
    from .data.layouts import load_dataset
    from .evaluation.evaluate import evaluate_split, write_results
    from .model import PatchCore
    from .reports.tracking import Tracker as _Tracker
    from .reports.tracking import run_folder

    models = _model_folders(results, category)
    out = run_folder(output or results, log_project, log_group)
    track = _Tracker(tracker, out, log_project, log_group, "evaluate")
    rows = []
    for name, model_dir in models:
        model = PatchCore.load(model_dir, device=device, progress=not State.quiet)
        changes = {k: v for k, v in (("resize", resize), ("imagesize", imagesize)) if v is not None}
        if changes:
            model.config = model.config.replace(**changes)
        if batch_size:
            model.settings = model.settings.replace(batch_size=batch_size)
        folder = data / name if (data / name).is_dir() else data
        split = load_dataset(folder, layout, normal)
        row, pred = evaluate_split(model, split)
        rows.append(row)
        _save_outputs(model, split, pred, row, out, normal, save_reports,
                      save_segmentation_images, save_anomaly_scores)
        track.log_metrics(row, prefix=f"{name}/")
    csv_path = write_results(rows, out)
    _print_table(rows)
    _echo(f"results: {csv_path}")
    track.finish()


def _model_folders(results: Path, categories: list[str] | None) -> list[tuple[str, Path]]:
    from .errors import ModelFileError
    from .storage import CONFIG_FILE

    if (results / CONFIG_FILE).is_file():
        return [(results.name, results)]
    root = results / "models"
    if categories:
        found = [(c, root / c) for c in categories]
    else:
        found = sorted((p.name, p) for p in root.glob("*") if (p / CONFIG_FILE).is_file())
    if not found:
        raise ModelFileError(f"no saved models under {root}; run `patchcore fit` first")
    return found


@app.command()
def predict(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL", help="A saved model folder.")],
    paths: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path("predictions"),
    device: Device = "auto",
    batch_size: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Score images: per image a raw and calibrated score, label, anomaly map and overlay."""
    from .data.images import load_image
    from .data.layouts import list_images
    from .engine.calibration import normalise
    from .model import PatchCore
    from .reports.overlay import overlay, save_map_png

    files = _expand(paths, list_images)
    model = PatchCore.load(model_dir, device=device, progress=not State.quiet)
    if batch_size:
        model.settings = model.settings.replace(batch_size=batch_size)
    pred = model.predict(files)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    stems: dict[str, int] = {}
    for i, path in enumerate(pred.paths):
        stem = path.stem if path.stem not in stems else f"{path.stem}_{stems[path.stem]}"
        stems[path.stem] = stems.get(path.stem, 0) + 1
        raw = pred.original_map(i)
        np.save(output / f"{stem}_map.npy", raw.astype(np.float32))
        scaled = normalise(raw, model.calibration_, "pixel")
        if np.isnan(scaled).any():
            lo, hi = float(pred.maps.min()), float(pred.maps.max())
            scaled = (raw - lo) / max(hi - lo, 1e-12)
        save_map_png(scaled, output / f"{stem}_map.png")
        overlay(load_image(path), scaled).save(output / f"{stem}_overlay.png")
        rows.append({"path": str(path), "score": float(pred.scores[i]),
                     "calibrated_score": float(pred.calibrated[i]),
                     "label": pred.label_names[i],
                     "map": f"{stem}_map.npy", "overlay": f"{stem}_overlay.png"})
    with open(output / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output / "predictions.json").write_text(json.dumps(rows, indent=2))
    for r in rows:
        _echo(f"{r['label']:9s} {r['calibrated_score']:.3f} (raw {r['score']:.3f})  {r['path']}")
    _echo(f"{len(rows)} images -> {output}")


def _expand(paths: list[str], list_images) -> list[Path]:
    from .errors import DataError

    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            found = list_images(p, recursive=True)
            if not found:
                raise DataError(f"folder {p} contains no images")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching images")
            files += matches
    return files


@app.command()
def explain(
    model_dir: Annotated[Path, typer.Argument(metavar="MODEL", help="A saved model folder.")],
    image: Annotated[Path, typer.Argument(help="The image to explain.")],
    patch: Annotated[str | None, typer.Option(
        help="ROW,COL of the patch on the feature grid (default: the most anomalous).")] = None,
    gif: Annotated[bool, typer.Option("--gif", help="Also animate over all patches.")] = False,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder.")] = Path(
        "explanations"),
    device: Device = "auto",
) -> None:
    """Show a patch of IMAGE beside its nearest memory-bank patch and that patch's source."""
    from .errors import ConfigError
    from .explain import explain_patch, save_explanation, save_explanation_gif
    from .model import PatchCore

    cell = None
    if patch:
        try:
            cell = tuple(int(v) for v in patch.split(","))
            assert len(cell) == 2
        except (ValueError, AssertionError):
            raise ConfigError(f"--patch must look like ROW,COL, got {patch!r}") from None
    model = PatchCore.load(model_dir, device=device, progress=not State.quiet)
    info = explain_patch(model, image, cell)
    figure = save_explanation(model, info, output / f"{image.stem}_explain.png")
    (output / f"{image.stem}_explain.json").write_text(json.dumps(info, indent=2))
    _echo(f"patch {info['patch']} -> bank row {info['nearest_row']} from {info['source_path']} "
          f"at {info['source_position']}, {info['distance_metric']} distance "
          f"{info['distance']:.4f}: {figure}")
    if gif:
        path = save_explanation_gif(model, image, output / f"{image.stem}_explain.gif")
        _echo(f"animation: {path}")


@app.command()
def tune(
    data: Annotated[Path, typer.Argument(help="Dataset root (category folders) or one category.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Tuning folder.")] = Path("tune"),
    category: Categories = None,
    grid: Annotated[str, typer.Option(
        help='Search grid, e.g. "percentage=0.01,0.1;anomaly_scorer_num_nn=1,3;'
             'distance=euclidean,cosine" (layers as layer2+layer3).')] = "percentage=0.01,0.1",
    random_points: Annotated[int | None, typer.Option(
        "--random", help="Evaluate N random points of the grid instead of all.")] = None,
    layout: Layout = "auto",
    normal: Annotated[str, typer.Option(help="Name of the normal-images folder.")] = "good",
    backbone: Backbone = None,
    layer: Layer = None,
    random_weights: Annotated[bool, typer.Option(help="Random backbone weights.")] = False,
    resize: Annotated[int, typer.Option()] = 256,
    imagesize: Annotated[int, typer.Option()] = 224,
    max_train: Annotated[int | None, typer.Option(
        help="Use only the first N training images.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option()] = 8,
    log_project: LogProject = None,
    log_group: LogGroup = None,
    tracker: Tracker = None,
) -> None:
    """Grid or random search; features cached per feature setting; reruns resume."""
    from .data.layouts import category_folders, load_dataset
    from .evaluation.tuning import parse_grid
    from .evaluation.tuning import tune as run_tune
    from .reports.tracking import Tracker as _Tracker
    from .reports.tracking import run_folder

    config, settings = _config(backbone=backbone, layer=layer, pretrained=not random_weights,
                     resize=resize, imagesize=imagesize, seed=seed, device=device,
                     batch_size=batch_size)
    search = parse_grid(grid)
    output = run_folder(output, log_project, log_group)
    folders = category_folders(data, category)
    for folder in folders:
        split = load_dataset(folder, layout, normal, 1.0, seed)
        if max_train is not None:
            split.train = split.train[:max_train]
        out = output if len(folders) == 1 else output / split.name
        track = _Tracker(tracker, out, log_project, log_group, f"tune-{split.name}")
        track.log_params({"grid": grid, **config.to_dict()})
        result = run_tune(split, out, search, config, random_points, settings, track)
        track.finish()
        _echo(f"{split.name}: evaluated {result.evaluated} points, skipped {result.skipped} "
              f"finished ones -> {out / 'tune_results.csv'}")
        best = result.best
        if best is not None:
            typer.echo(f"{split.name} best: {json.dumps(best['params'])}  image_auroc "
                       f"{best['image_auroc']:.4f}  pixel_auroc {best['pixel_auroc']:.4f}  "
                       f"pro {best['pro']:.4f}")


@app.command()
def backbones() -> None:
    """List the registered backbones and whether their weights are on this machine."""
    from . import list_backbones

    for row in list_backbones():
        mark = "yes" if row["weights_available"] else "no"
        typer.echo(f"{row['name']:22s} {row['source']:20s} weights here: {mark:3s}  "
                   f"layers: {'+'.join(row['layers'])}  ({row['weights']})")


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the demo writes.")] = Path("patchcore_demo"),
    device: Device = "auto",
    n_train: Annotated[int, typer.Option(help="Generated training images.")] = 24,
) -> None:
    """Generate a small textured dataset with defects, then fit, evaluate and predict."""
    from .data.synthetic import make_synthetic_dataset

    t0 = time.perf_counter()
    data = output / "data"
    make_synthetic_dataset(data, categories=("carpet",), n_train=n_train, n_test_good=6,
                           n_test_defect=8, size=256, seed=0)
    _echo(f"generated a dataset with scratches and spots: {data}")
    results = output / "results"
    fit(data, output=results, category=None, layout="mvtec", normal="good", train_val_split=1.0,
        backbone=["efficientnet_lite2"], layer=None, weights=None, random_weights=False,
        pretrain_embed_dimension=1024, target_embed_dimension=1024, anomaly_scorer_num_nn=1,
        patchsize=3, patchstride=1, percentage=0.1, sampler="approx_greedy_coreset",
        distance="euclidean", reweight=False, resize=256, imagesize=224, index="flat",
        bank_dtype="float32", backbone_dtype="float32", max_memory=None, seed=0, device=device, batch_size=8,
        num_workers=0, evaluate=True, save_reports=True)
    test_dir = data / "carpet" / "test"
    predict(results / "models" / "carpet", [str(test_dir)], output=output / "predictions",
            device=device, batch_size=None)
    typer.echo(f"\ndemo finished in {time.perf_counter() - t0:.0f}s")
    typer.echo(f"  data:        {data}")
    typer.echo(f"  model:       {results / 'models' / 'carpet'}")
    typer.echo(f"  metrics:     {results / 'results.csv'}")
    typer.echo(f"  report:      {results / 'reports' / 'carpet' / 'index.html'}")
    typer.echo(f"  predictions: {output / 'predictions'} (overlays, maps, predictions.csv)")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)


def main() -> None:
    """Entry point: user mistakes become one readable line and exit code 2."""
    try:
        app()
    except PatchCoreError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
