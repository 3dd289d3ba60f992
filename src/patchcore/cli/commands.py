"""The `patchcore` commands, each a thin call into the library (registered on `shell.app`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..config import PatchCoreConfig, RuntimeSettings
from ..errors import ConfigError, ModelFileError
from .options import (
    PATH,
    DataOptions,
    ReportOptions,
    TrackingOptions,
    data_options,
    hyperparameters,
    input_overrides,
    output_option,
    parse_cell,
    print_table,
    report_options,
    runtime_options,
    show_results,
    tracking_options,
    training_data_options,
)
from .shell import app, current_run, prepare_output, say, writing

RAY = click.option("--ray", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
                   help="Run on Ray (extra patchcore[ray]): the cluster at ADDRESS (\"auto\", "
                   "HOST:6379, ray://HOST:10001); alone: $RAY_ADDRESS or a local instance.")


@app.command()
@click.argument("data", type=PATH)
@output_option("results", "Results folder: models/<category>, results.csv, reports.")
@training_data_options
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Evaluate on the test set after fitting.")
@report_options
@tracking_options
@hyperparameters
@runtime_options
@RAY
def fit(data: Path, output: Path, data_opts: DataOptions, evaluate: bool, reports: ReportOptions,
        tracking: TrackingOptions, config: PatchCoreConfig, settings: RuntimeSettings,
        ray: str | None = None) -> None:
    """Fit one model per category of DATA (a dataset root or one category folder) and save it
    under OUTPUT/models/<category>."""
    from ..evaluation.runs import fit_categories

    if ray is not None:  # sharded fit on Ray, evaluation here (patchcore.distributed)
        from ..distributed import categories_runner
        fit_categories = categories_runner(ray)
    folders = data_opts.folders(data)
    out = tracking.folder(output)
    with tracking.start(out, "fit", {**config.to_dict(), **dataclasses.asdict(settings)}) as track:
        rows = fit_categories(
            folders, lambda folder: data_opts.load(folder, config.seed), config, settings, out,
            evaluate=evaluate, request=reports.request, normal=data_opts.normal, tracker=track,
            writing=writing, on_saved=current_run().kept.append, say=say)
        if rows:
            show_results(rows, out)


def _evaluation_jobs(results: Path, data: Path, categories: tuple[str, ...]
                     ) -> list[tuple[Path, Path]]:
    """(model folder, category folder) pairs: each model with its category under DATA, or, when
    DATA is one category folder, the model of that name (or the one model folder given)."""
    from ..storage import CONFIG_FILE, list_model_folders

    single = (results / CONFIG_FILE).is_file()
    models = [results] if single else (
        [results / "models" / c for c in categories] or list_model_folders(results / "models"))
    if not models:
        raise ModelFileError(f"no saved models under {results / 'models'}; run `patchcore fit` "
                             "first")
    if not (data / "train").is_dir():
        return [(m, data / m.resolve().name) for m in models]
    name = data.resolve().name
    if not single and not (models := [m for m in models if m.name == name]):
        raise ModelFileError(f"{results} has no model for the category {name!r} ({data})")
    return [(m, data) for m in models]


@app.command()
@click.argument("results", type=PATH)
@click.argument("data", type=PATH)
@output_option(None, "Where results.csv and reports go (default: RESULTS).")
@data_options
@input_overrides
@report_options
@tracking_options
@runtime_options
def evaluate(results: Path, data: Path, output: Path | None, data_opts: DataOptions,
             changes: dict[str, Any], reports: ReportOptions, tracking: TrackingOptions,
             settings: RuntimeSettings) -> None:
    """Evaluate the models of RESULTS (a `fit` results folder, or one model folder) on the test
    images of DATA (a dataset root or one category folder)."""
    from ..model import PatchCore

    jobs = _evaluation_jobs(results, data, data_opts.category)
    out = tracking.folder(output or results)
    rows: list[dict[str, Any]] = []
    with tracking.start(out, "evaluate", changes) as track:
        for model_dir, folder in jobs:
            model = PatchCore.load(model_dir, **dataclasses.asdict(settings))
            model.config = model.config.replace(**changes)
            reports.evaluate(rows, model, data_opts.load(folder), out, data_opts.normal, track)
        show_results(rows, out)


@app.command()
@click.argument("model_dir", metavar="MODEL", type=PATH)
@click.argument("images", nargs=-1, required=True)
@output_option("predictions", "Output folder: per image <name>_map.npy, <name>_map.png and "
               "<name>_overlay.png (names mirror the inputs' paths), predictions.csv/json.")
@click.option("--overwrite", is_flag=True, help="Replace the predictions of an earlier run in "
              "OUTPUT (only the files its predictions.json lists).")
@runtime_options
@RAY
def predict(model_dir: Path, images: tuple[str, ...], output: Path, overwrite: bool,
            settings: RuntimeSettings, ray: str | None = None) -> None:
    """Score IMAGES (files, folders or glob patterns) with the model folder MODEL: raw and
    calibrated score, label, anomaly map and overlay per image. MODEL may be an export folder
    (`patchcore export`): then the torch-free inferencer scores."""
    from ..inference import Inferencer, is_export_folder
    from ..model import PatchCore
    from ..reports.predictions import PredictionWriter, collect_images

    if ray is not None:  # batch scoring on Ray Data, predictions.parquet/csv (distributed/)
        from ..distributed import predict as ray_predict
        return say(ray_predict(model_dir, images, output, address=ray or None, settings=settings,
                               overwrite=overwrite).summary)
    files = collect_images(images)
    with PredictionWriter(output, files, overwrite=overwrite) as writer:
        model = (Inferencer(model_dir, batch_size=settings.batch_size)
                 if is_export_folder(model_dir)
                 else PatchCore.load(model_dir, **dataclasses.asdict(settings)))
        rows = writer.write(model.predict(files), model.calibration_)
    for r in rows:
        calibrated = "-" if r["calibrated_score"] is None else f"{r['calibrated_score']:.3f}"
        say(f"{r['label']:12s} {calibrated:>5s} (raw {r['score']:.3f})  {r['path']}")
    say(f"{len(rows)} images -> {output}")


@app.command()
@click.argument("model_dir", metavar="MODEL", type=PATH)
@click.argument("image", type=PATH)
@click.option("--patch", callback=parse_cell, metavar="ROW,COL",
              help="Patch on the feature grid (default: the most anomalous).")
@click.option("--gif", is_flag=True, help="Also animate over all patches.")
@click.option("--train-root", type=PATH, help="Folder that now holds the model's training "
              "images, when they moved since `fit`.")
@output_option("explanations", "Output folder.")
@runtime_options
def explain(model_dir: Path, image: Path, patch: tuple[int, int] | None, gif: bool,
            train_root: Path | None, output: Path, settings: RuntimeSettings) -> None:
    """Show a patch of IMAGE beside its nearest memory-bank patch and that patch's source."""
    from ..explain import explain_patch, save_explanation, save_explanation_gif
    from ..model import PatchCore

    prepare_output(output)
    model = PatchCore.load(model_dir, **dataclasses.asdict(settings))
    info = explain_patch(model, image, patch, train_root=train_root)
    figure = save_explanation(model, info, output / f"{image.stem}_explain.png",
                              train_root=train_root)
    (output / f"{image.stem}_explain.json").write_text(json.dumps(info, indent=2))
    say(f"patch {info['patch']} -> bank row {info['nearest_row']} from {info['source_path']} "
        f"at {info['source_position']}, {info['distance_metric']} distance "
        f"{info['distance']:.4f}: {figure}")
    if gif:
        say("animation: " + str(save_explanation_gif(
            model, image, output / f"{image.stem}_explain.gif", train_root=train_root)))


@app.command()
@click.argument("data", type=PATH)
@output_option("tune", "Tuning folder (one subfolder per category when there are several).")
@training_data_options
@click.option("--grid", default="percentage=0.01,0.1", show_default=True, help=(
    'Search grid, e.g. "percentage=0.01,0.1;anomaly_scorer_num_nn=1,3;distance=euclidean,'
    'cosine" (layers as layer2+layer3); the other hyperparameters come from their options.'))
@click.option("--random", "random_points", type=click.IntRange(min=1),
              help="Evaluate N random points of the grid instead of all.")
@tracking_options
@hyperparameters
@runtime_options
def tune(data: Path, output: Path, data_opts: DataOptions, grid: str, random_points: int | None,
         tracking: TrackingOptions, config: PatchCoreConfig, settings: RuntimeSettings) -> None:
    """Grid or random search; features cached per feature setting; reruns resume."""
    from ..evaluation.tuning import parse_grid
    from ..evaluation.tuning import tune as run_tune

    try:
        search = parse_grid(grid)
    except ValueError as exc:  # a value that is not a number
        raise ConfigError(f"--grid {grid!r}: {exc}") from None
    folders = data_opts.folders(data)
    root = tracking.folder(output)
    for folder in folders:
        split = data_opts.load(folder, config.seed)
        out = root if len(folders) == 1 else root / split.name
        with tracking.start(out, f"tune-{split.name}", {"grid": grid, **config.to_dict()}) as t:
            result = run_tune(split, out, search, config, random_points, settings, t)
        say(f"{split.name}: evaluated {result.evaluated} points, skipped {result.skipped} "
            f"finished ones -> {out / 'tune_results.csv'}")
        if (best := result.best) is not None:
            click.echo(f"{split.name} best: {json.dumps(best['params'])}  " + "  ".join(
                f"{k} {best[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pro")))


@app.command()
def backbones() -> None:
    """List the registered backbones and whether their weights are on this machine."""
    from .. import list_backbones

    rows = list_backbones()
    name_w = max((len(r["name"]) for r in rows), default=0)
    source_w = max((len(r["source"]) for r in rows), default=0)
    for row in rows:
        mark = "yes" if row["weights_available"] else "no"
        click.echo(f"{row['name']:{name_w}s}  {row['source']:{source_w}s}  weights here: "
                   f"{mark:3s}  layers: {'+'.join(row['layers'])}  ({row['weights']})")


@app.command()
@output_option("patchcore_demo", "Where the demo writes data/, results/ and predictions/.")
@click.option("--n-train", type=click.IntRange(min=4), default=24, show_default=True,
              help="Generated training images.")
@hyperparameters
@runtime_options
def demo(output: Path, n_train: int, config: PatchCoreConfig, settings: RuntimeSettings) -> None:
    """Generate a small textured dataset with defects, then fit, evaluate and predict."""
    from ..demo import run_demo

    with writing(prepare_output(output)):
        r = run_demo(output, config, settings, n_train=n_train, say=say)
    print_table([r.metrics])
    click.echo(f"\ndemo finished in {r.seconds:.0f}s\n  data:        {r.data}\n  model:       "
               f"{r.model}\n  metrics:     {r.results}\n  report:      {r.report}\n  "
               f"predictions: {r.predictions} (overlays, maps, predictions.csv)")


@app.command()
def version() -> None:
    """Print the package version."""
    click.echo(__version__)


@app.command()
@click.argument("source", metavar="MODEL_OR_RESULTS", type=PATH)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--api-key", envvar="PATCHCORE_API_KEY", help="Key clients must send "
              "(X-API-Key or Authorization: Bearer); default: $PATCHCORE_API_KEY.")
@click.option("--db", type=PATH, help="Review database (SQLite; default: beside the models).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Images scored together at most (1: no micro-batching).")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10_000), default=5.0,
              show_default=True, help="How long a micro-batch waits for more images.")
@click.option("--queue-size", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Images admitted at once; beyond it requests get 503 + Retry-After.")
@click.option("--max-request-bytes", type=click.IntRange(1), default=32 * 2**20,
              show_default=True, help="Largest request body (413 beyond).")
@click.option("--max-images", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Images per request at most (413 beyond).")
@runtime_options
def serve(source: Path, host: str, port: int, api_key: str | None, db: Path | None,
          max_batch: int, batch_wait_ms: float, queue_size: int, max_request_bytes: int,
          max_images: int, settings: RuntimeSettings) -> None:
    """Serve the model(s) of MODEL_OR_RESULTS over HTTP, with the review page at /."""
    try:
        from ..serve import ServeOptions, default_db
        from ..serve import serve as run_service
    except ImportError as exc:
        raise ConfigError(f"patchcore serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'patchcore[serve]'") from None
    run_service(source, host, port, ServeOptions(
        max_batch=max_batch, batch_wait_ms=batch_wait_ms, queue_size=queue_size,
        max_request_bytes=max_request_bytes, max_images=max_images, api_key=api_key or None,
        db=db or default_db(source)), settings)
