"""The `patchcore` command line: a thin shell over the library.

Hyperparameter and runtime options are generated from the fields of `PatchCoreConfig` and
`RuntimeSettings` (name, short name, help, default, range, choices), so each exists once, in
config.py, and every value is checked there before any work starts. A user mistake, a refused
output folder or an OS error (disk full, permission denied) is one line on stderr and exit code
2; Ctrl-C is one line saying what was kept, exit code 130; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import PatchCoreConfig, RuntimeSettings, check_value
from .data.layouts import LAYOUTS
from .errors import ConfigError, ModelFileError, PatchCoreError

PATH = click.Path(path_type=Path)
Spec = tuple[tuple[str, ...], dict[str, Any]]  # click.option(*decls, **attrs); last decl: name


# -- one invocation and its failures -----------------------------------------------------------

@dataclass
class _Run:
    """One command's -q flag, finished outputs, the output being written, folders it made."""

    quiet: bool = False
    kept: list[Path] = field(default_factory=list)
    writing: Path | None = None
    created: list[Path] = field(default_factory=list)

    def interrupted(self) -> str:
        """The line printed on Ctrl-C."""
        parts = [f"kept {', '.join(map(str, self.kept))}"] if self.kept else []
        parts += [f"{self.writing} may be incomplete"] if self.writing else []
        return "interrupted; " + ("; ".join(parts) or "nothing was written")


def _run() -> _Run:
    """The running command's state (a fresh one outside a command)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.find_object(_Run) if ctx else None) or _Run()


def _echo(text: str) -> None:
    """Print unless -q."""
    if not _run().quiet:
        click.echo(text)


def _prepare(folder: Path) -> Path:
    """Create the output folder if needed and prove it writable, before any expensive work."""
    from .reports.predictions import check_output_folder

    _run().created += check_output_folder(folder)
    return folder


@contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """Mark `path` as being written; once the block finishes it counts as kept."""
    _run().writing = path
    yield path
    _run().writing = None
    _run().kept.append(path)


def _one_line(text: str) -> str:
    """`text` with its line breaks and runs of spaces made single spaces."""
    return " ".join(text.split())


class _App(click.Group):
    """The command group: every failure becomes one line (see the module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        """Run a command; usage errors become `error: ...` with exit code 2."""
        try:
            code = super().main(args, prog_name or "patchcore", complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())
            code = 0
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            code = 2
        except click.Abort:
            click.echo("interrupted; nothing was written", err=True)
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand; library and OS errors become one line, Ctrl-C says what was kept."""
        from .reports.predictions import remove_empty_folders

        try:
            return super().invoke(ctx)
        except PatchCoreError as exc:
            message, code = f"error: {_one_line(str(exc))}", 2
        except OSError as exc:
            where = exc.filename if exc.filename is not None else _run().writing
            reason = exc.strerror.rstrip(".").lower() if exc.strerror else str(exc)
            message, code = _one_line(f"error: {reason}" + (f": {where}" if where else "")), 2
        except KeyboardInterrupt:
            message, code = _run().interrupted(), 130
        remove_empty_folders(_run().created)
        click.echo(message, err=True)
        raise click.exceptions.Exit(code)


@click.group(cls=_App, no_args_is_help=True,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def app(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """PatchCore anomaly detection: fit on normal images, evaluate, predict."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    ctx.obj = _Run(quiet=quiet)


# -- options from dataclass fields, and option groups ------------------------------------------

def _help(meta: Any) -> str:
    """The field's help text with its range, e.g. "Coreset share. [0<x<=1]"."""
    def num(v: float) -> str:
        """1.0 -> "1", 0.5 -> "0.5"."""
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    lo, hi = meta.get("min"), meta.get("max")
    if lo is None and hi is None:
        return meta.get("help", "")
    low = "x" if lo is None else f"{num(lo)}{'<' if meta.get('open_lo') else '<='}x"
    return f"{meta.get('help', '')} [{low}{'' if hi is None else f'<={num(hi)}'}]"


def _field_specs(cls: type, names: tuple[str, ...] | None = None, *,
                 keep_model: bool = False) -> list[Spec]:
    """Options for the fields of `cls` (all but `progress`, or `names`) from their metadata:
    --kebab-name unless `cli` says otherwise, `short`, help with choices and range, the field's
    default (None with `keep_model`: the saved model's value), bools as --x/--no-x, tuple
    fields repeatable; each value checked by config.check_value."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name == "progress" or (names is not None and f.name not in names):
            continue
        meta, hint = f.metadata, hints[f.name]
        kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
        multiple = any(typing.get_origin(k) is tuple for k in kinds)
        flag = meta.get("cli") or "--" + f.name.replace("_", "-")
        if kinds[0] is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        default = None if keep_model else f.default
        if multiple:
            default = () if default is None else tuple(
                [default] if isinstance(default, str) else default)

        def check(ctx: click.Context, param: click.Parameter, value: Any,
                  name: str = f.name, hint: Any = hint, meta: Any = meta) -> Any:
            """The value checked against the field's type and range (config.check_value)."""
            try:
                return value if value in (None, ()) else check_value(
                    name, tuple(value) if param.multiple else value, hint, meta)
            except ConfigError as exc:
                raise click.BadParameter(str(exc), ctx, param) from None

        attrs: dict[str, Any] = dict(
            help=_help(meta) + (" (default: the model's)" if keep_model else ""),
            default=default, show_default=default not in (None, ()), callback=check)
        if multiple:
            attrs["multiple"] = True
        elif kinds[0] is not bool:
            attrs["type"] = {int: click.INT, float: click.FLOAT}.get(kinds[0], click.STRING)
        if meta.get("choices"):
            attrs["metavar"] = "[" + "|".join(meta["choices"]) + "]"
        specs.append(((*filter(None, (meta.get("short"), flag)), f.name), attrs))
    return specs


def _grouped(into: str, specs: list[Spec], build: Callable[[dict[str, Any]], Any]
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding the options `specs`; the command receives their values as one object,
    `build(values)`, in its parameter `into` (built, and so checked, before the command runs)."""
    names = [decls[-1] for decls, _ in specs]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            kwargs[into] = build({n: kwargs.pop(n) for n in names})
            return func(**kwargs)

        for decls, attrs in reversed(specs):
            wrapper = click.option(*decls, **attrs)(wrapper)
        return wrapper
    return decorate


def _make_config(values: dict[str, Any]) -> PatchCoreConfig:
    """The checked config of the hyperparameter options (unset repeatable ones: defaults)."""
    from .engine.pipeline import parse_members

    config = PatchCoreConfig(**{k: v for k, v in values.items() if v != ()})
    parse_members(config.backbone, config.layers)  # unknown backbones fail before any work
    return config


hyperparameters = _grouped("config", _field_specs(PatchCoreConfig), _make_config)
runtime_options = _grouped("settings", _field_specs(RuntimeSettings),
                           lambda v: RuntimeSettings(**v, progress=not _run().quiet))
input_overrides = _grouped(  # evaluate at another input size than the model was fitted with
    "changes", _field_specs(PatchCoreConfig, ("resize", "imagesize"), keep_model=True),
    lambda v: {k: x for k, x in v.items() if x is not None})


def _output(default: str | None, help: str) -> Callable[..., Any]:
    """The -o/--output option of a command."""
    return click.option("-o", "--output", type=PATH, default=default, show_default=True,
                        help=help)


@dataclass
class _Data:
    """Which categories of DATA to use and how to read them."""

    category: tuple[str, ...]
    layout: str
    normal: str
    train_val_split: float = 1.0
    max_train: int | None = None

    def folders(self, data: Path) -> list[Path]:
        """The category folders (checked to exist)."""
        from .data.layouts import category_folders

        return category_folders(data, list(self.category) or None)

    def load(self, folder: Path, seed: int = 0) -> Any:
        """One category's DatasetSplit, its training images cut to --max-train."""
        from .data.layouts import load_dataset

        split = load_dataset(folder, self.layout, self.normal, self.train_val_split, seed)
        split.train = split.train[: self.max_train]
        return split


_DATA: list[Spec] = [
    (("-d", "--category", "category"), dict(
        multiple=True, help="Category folder under DATA; repeat. Default: all.")),
    (("--layout", "layout"), dict(type=click.Choice(LAYOUTS), default="auto", show_default=True,
                                  help="Dataset layout (auto: detected).")),
    (("--normal", "normal"), dict(default="good", show_default=True,
                                  help="Name of the normal-images folder.")),
]
_TRAINING: list[Spec] = [
    (("--train-val-split", "train_val_split"), dict(
        type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
        help="Keep this share of train; the rest becomes validation images.")),
    (("--max-train", "max_train"), dict(type=click.IntRange(min=1),
                                        help="Use only the first N training images.")),
]
data_options = _grouped("data_opts", _DATA, lambda v: _Data(**v))
training_data_options = _grouped("data_opts", _DATA + _TRAINING, lambda v: _Data(**v))


@dataclass
class _Tracking:
    """--log-project / --log-group folders and optional MLflow / W&B logging."""

    log_project: str | None
    log_group: str | None
    tracker: str | None

    def folder(self, output: Path) -> Path:
        """OUT/<project>/<group>, or OUT; created and checked writable."""
        from .reports.tracking import run_folder

        return _prepare(run_folder(output, self.log_project, self.log_group))

    @contextmanager
    def start(self, folder: Path, name: str, params: dict[str, Any]) -> Iterator[Any]:
        """A tracker run, finished however the block ends."""
        from .reports.tracking import Tracker

        track = Tracker(self.tracker, folder, self.log_project, self.log_group, name)
        try:
            track.log_params(params)
            yield track
        finally:
            track.finish()


tracking_options = _grouped("tracking", [
    (("--log-project", "log_project"), dict(help="Write results under OUT/<project>/<group>.")),
    (("--log-group", "log_group"), dict(help="Run group under the project folder.")),
    (("--tracker", "tracker"), dict(type=click.Choice(("mlflow", "wandb")), help=(
        "Also log to mlflow or wandb (if installed; local/offline store)."))),
], lambda v: _Tracking(**v))


@dataclass
class _Reports:
    """The optional per-category outputs of fit and evaluate."""

    save_reports: bool
    save_segmentation_images: bool
    save_anomaly_scores: bool

    def evaluate(self, rows: list[dict[str, Any]], model: Any, split: Any, out: Path,
                 normal: str, track: Any) -> dict[str, Any]:
        """Evaluate one category: its results row (appended to `rows`), the requested outputs
        under `out` and the tracked metrics."""
        from .evaluation.evaluate import evaluate_split
        from .reports import save_anomaly_scores, save_segmentation_images, write_category_report

        row, pred = evaluate_split(model, split)
        rows.append(row)
        track.log_metrics(row, prefix=f"{split.name}/")
        if self.save_reports:
            with _writing(out / "reports" / split.name) as folder:
                files = write_category_report(model, split, pred, row, folder, normal=normal)
            _echo(f"{split.name}: report {files['index']}")
        if self.save_segmentation_images:
            with _writing(out / "segmentation" / split.name) as folder:
                save_segmentation_images(model, split.test, pred, folder)
        if self.save_anomaly_scores:
            with _writing(out / "scores" / f"{split.name}.csv") as path:
                save_anomaly_scores(pred, path)
        return row


report_options = _grouped("reports", [
    (("--save-reports", "save_reports"), dict(is_flag=True, help=(
        "Plots, Bad_predictions.xlsx, index.html per category in OUT/reports/<category>."))),
    (("--save-segmentation-images", "save_segmentation_images"), dict(is_flag=True, help=(
        "image | mask | overlay PNGs under OUT/segmentation/<category>."))),
    (("--save-anomaly-scores", "save_anomaly_scores"), dict(is_flag=True, help=(
        "CSV of path, group, label, score: OUT/scores/<category>.csv."))),
], lambda v: _Reports(**v))


def _print_table(rows: list[dict[str, Any]]) -> None:
    """Print the main metrics per category (and their mean)."""
    from .evaluation.evaluate import mean_row

    cols = ["category", "image_auroc", "pixel_auroc", "pro", "f1_max", "f1_at_threshold",
            "predict_ms_per_image"]
    table = rows + ([mean_row(rows)] if len(rows) > 1 else [])
    widths = [max([len(str(r.get("category"))) for r in table] + [8])] + [10] * (len(cols) - 1)
    for cells in [cols] + [[r.get(c) for c in cols] for r in table]:
        click.echo("  ".join((f"{v:.4f}" if isinstance(v, float) else str(
            "" if v is None else v)).ljust(w) for v, w in zip(cells, widths, strict=True)))


def _results(rows: list[dict[str, Any]], out: Path) -> None:
    """Write results.csv/json into `out` and print the table."""
    from .evaluation.evaluate import write_results

    with _writing(out / "results.csv"):
        path = write_results(rows, out)
    _print_table(rows)
    _echo(f"results: {path}")


# -- commands ----------------------------------------------------------------------------------

@app.command()
@click.argument("data", type=PATH)
@_output("results", "Results folder: models/<category>, results.csv, reports.")
@training_data_options
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Evaluate on the test set after fitting.")
@report_options
@tracking_options
@hyperparameters
@runtime_options
def fit(data: Path, output: Path, data_opts: _Data, evaluate: bool, reports: _Reports,
        tracking: _Tracking, config: PatchCoreConfig, settings: RuntimeSettings) -> None:
    """Fit one model per category of DATA (a dataset root or one category folder) and save it
    under OUTPUT/models/<category>."""
    from .model import PatchCore

    folders = data_opts.folders(data)
    out = tracking.folder(output)
    rows: list[dict[str, Any]] = []
    with tracking.start(out, "fit", {**config.to_dict(), **dataclasses.asdict(settings)}) as track:
        for folder in folders:
            split = data_opts.load(folder, config.seed)
            t0 = time.perf_counter()
            model = PatchCore(config, settings).fit(split)
            fit_s = time.perf_counter() - t0
            path = model.save(out / "models" / split.name)
            _run().kept.append(path)
            _echo(f"{split.name}: fitted in {fit_s:.1f}s on {len(split.train)} images -> {path}")
            if evaluate and split.test:
                reports.evaluate(rows, model, split, out, data_opts.normal, track)
                rows[-1]["fit_seconds"] = round(fit_s, 2)
        if rows:
            _results(rows, out)


def _evaluation_jobs(results: Path, data: Path, categories: tuple[str, ...]
                     ) -> list[tuple[Path, Path]]:
    """(model folder, category folder) pairs: each model with its category under DATA, or, when
    DATA is one category folder, the model of that name (or the one model folder given)."""
    from .storage import CONFIG_FILE, list_model_folders

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
@_output(None, "Where results.csv and reports go (default: RESULTS).")
@data_options
@input_overrides
@report_options
@tracking_options
@runtime_options
def evaluate(results: Path, data: Path, output: Path | None, data_opts: _Data,
             changes: dict[str, Any], reports: _Reports, tracking: _Tracking,
             settings: RuntimeSettings) -> None:
    """Evaluate the models of RESULTS (a `fit` results folder, or one model folder) on the test
    images of DATA (a dataset root or one category folder)."""
    from .model import PatchCore

    jobs = _evaluation_jobs(results, data, data_opts.category)
    out = tracking.folder(output or results)
    rows: list[dict[str, Any]] = []
    with tracking.start(out, "evaluate", changes) as track:
        for model_dir, folder in jobs:
            model = PatchCore.load(model_dir, **dataclasses.asdict(settings))
            model.config = model.config.replace(**changes)
            reports.evaluate(rows, model, data_opts.load(folder), out, data_opts.normal, track)
        _results(rows, out)


@app.command()
@click.argument("model_dir", metavar="MODEL", type=PATH)
@click.argument("images", nargs=-1, required=True)
@_output("predictions", "Output folder: per image <name>_map.npy, <name>_map.png and "
         "<name>_overlay.png (names mirror the inputs' paths), predictions.csv/json.")
@click.option("--overwrite", is_flag=True, help="Replace the predictions of an earlier run in "
              "OUTPUT (only the files its predictions.json lists).")
@runtime_options
def predict(model_dir: Path, images: tuple[str, ...], output: Path, overwrite: bool,
            settings: RuntimeSettings) -> None:
    """Score IMAGES (files, folders or glob patterns) with the model folder MODEL: raw and
    calibrated score, label, anomaly map and overlay per image."""
    from .model import PatchCore
    from .reports.predictions import PredictionWriter, collect_images

    files = collect_images(images)
    with PredictionWriter(output, files, overwrite=overwrite) as writer:
        model = PatchCore.load(model_dir, **dataclasses.asdict(settings))
        rows = writer.write(model.predict(files), model.calibration_)
    for r in rows:
        calibrated = "-" if r["calibrated_score"] is None else f"{r['calibrated_score']:.3f}"
        _echo(f"{r['label']:12s} {calibrated:>5s} (raw {r['score']:.3f})  {r['path']}")
    _echo(f"{len(rows)} images -> {output}")


def _cell(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--patch ROW,COL as a (row, col) tuple."""
    parts = (value or "").split(",")
    if value is not None and (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)):
        raise click.BadParameter(f"must look like ROW,COL, got {value!r}", ctx, param)
    return None if value is None else (int(parts[0]), int(parts[1]))


@app.command()
@click.argument("model_dir", metavar="MODEL", type=PATH)
@click.argument("image", type=PATH)
@click.option("--patch", callback=_cell, metavar="ROW,COL",
              help="Patch on the feature grid (default: the most anomalous).")
@click.option("--gif", is_flag=True, help="Also animate over all patches.")
@click.option("--train-root", type=PATH, help="Folder that now holds the model's training "
              "images, when they moved since `fit`.")
@_output("explanations", "Output folder.")
@runtime_options
def explain(model_dir: Path, image: Path, patch: tuple[int, int] | None, gif: bool,
            train_root: Path | None, output: Path, settings: RuntimeSettings) -> None:
    """Show a patch of IMAGE beside its nearest memory-bank patch and that patch's source."""
    from .explain import explain_patch, save_explanation, save_explanation_gif
    from .model import PatchCore

    _prepare(output)
    model = PatchCore.load(model_dir, **dataclasses.asdict(settings))
    info = explain_patch(model, image, patch, train_root=train_root)
    figure = save_explanation(model, info, output / f"{image.stem}_explain.png",
                              train_root=train_root)
    (output / f"{image.stem}_explain.json").write_text(json.dumps(info, indent=2))
    _echo(f"patch {info['patch']} -> bank row {info['nearest_row']} from {info['source_path']} "
          f"at {info['source_position']}, {info['distance_metric']} distance "
          f"{info['distance']:.4f}: {figure}")
    if gif:
        _echo("animation: " + str(save_explanation_gif(
            model, image, output / f"{image.stem}_explain.gif", train_root=train_root)))


@app.command()
@click.argument("data", type=PATH)
@_output("tune", "Tuning folder (one subfolder per category when there are several).")
@training_data_options
@click.option("--grid", default="percentage=0.01,0.1", show_default=True, help=(
    'Search grid, e.g. "percentage=0.01,0.1;anomaly_scorer_num_nn=1,3;distance=euclidean,'
    'cosine" (layers as layer2+layer3); the other hyperparameters come from their options.'))
@click.option("--random", "random_points", type=click.IntRange(min=1),
              help="Evaluate N random points of the grid instead of all.")
@tracking_options
@hyperparameters
@runtime_options
def tune(data: Path, output: Path, data_opts: _Data, grid: str, random_points: int | None,
         tracking: _Tracking, config: PatchCoreConfig, settings: RuntimeSettings) -> None:
    """Grid or random search; features cached per feature setting; reruns resume."""
    from .evaluation.tuning import parse_grid
    from .evaluation.tuning import tune as run_tune

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
        _echo(f"{split.name}: evaluated {result.evaluated} points, skipped {result.skipped} "
              f"finished ones -> {out / 'tune_results.csv'}")
        if (best := result.best) is not None:
            click.echo(f"{split.name} best: {json.dumps(best['params'])}  " + "  ".join(
                f"{k} {best[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pro")))


@app.command()
def backbones() -> None:
    """List the registered backbones and whether their weights are on this machine."""
    from . import list_backbones

    for row in list_backbones():
        mark = "yes" if row["weights_available"] else "no"
        click.echo(f"{row['name']:22s} {row['source']:20s} weights here: {mark:3s}  "
                   f"layers: {'+'.join(row['layers'])}  ({row['weights']})")


@app.command()
@_output("patchcore_demo", "Where the demo writes data/, results/ and predictions/.")
@click.option("--n-train", type=click.IntRange(min=4), default=24, show_default=True,
              help="Generated training images.")
@hyperparameters
@runtime_options
def demo(output: Path, n_train: int, config: PatchCoreConfig, settings: RuntimeSettings) -> None:
    """Generate a small textured dataset with defects, then fit, evaluate and predict."""
    from .demo import run_demo

    with _writing(_prepare(output)):
        r = run_demo(output, config, settings, n_train=n_train, say=_echo)
    _print_table([r.metrics])
    click.echo(f"\ndemo finished in {r.seconds:.0f}s\n  data:        {r.data}\n  model:       "
               f"{r.model}\n  metrics:     {r.results}\n  report:      {r.report}\n  "
               f"predictions: {r.predictions} (overlays, maps, predictions.csv)")


@app.command()
def version() -> None:
    """Print the package version."""
    click.echo(__version__)


def main() -> None:
    """Entry point of the `patchcore` command."""
    app.main(prog_name="patchcore")


if __name__ == "__main__":
    main()
