"""The commands' options: generated from the config dataclasses, and the shared groups.

Hyperparameter and runtime options are generated from the fields of `PatchCoreConfig` and
`RuntimeSettings` (name, short name, help, default, range, choices), so each exists once, in
config.py, and every value is checked there before any work starts. The data, report, tracking
and output options are shared by several commands; each group reaches its command as one object.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..config import PatchCoreConfig, RuntimeSettings, check_value
from ..data.layouts import LAYOUTS
from ..errors import ConfigError
from .shell import current_run, prepare_output, say, writing

PATH = click.Path(path_type=Path)
Spec = tuple[tuple[str, ...], dict[str, Any]]  # click.option(*decls, **attrs); last decl: name


# -- options from dataclass fields -------------------------------------------------------------

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
    from ..engine.pipeline import parse_members

    config = PatchCoreConfig(**{k: v for k, v in values.items() if v != ()})
    parse_members(config.backbone, config.layers)  # unknown backbones fail before any work
    return config


hyperparameters = _grouped("config", _field_specs(PatchCoreConfig), _make_config)
runtime_options = _grouped("settings", _field_specs(RuntimeSettings),
                           lambda v: RuntimeSettings(**v, progress=not current_run().quiet))
input_overrides = _grouped(  # evaluate at another input size than the model was fitted with
    "changes", _field_specs(PatchCoreConfig, ("resize", "imagesize"), keep_model=True),
    lambda v: {k: x for k, x in v.items() if x is not None})


# -- shared option groups ----------------------------------------------------------------------

def output_option(default: str | None, help: str) -> Callable[..., Any]:
    """The -o/--output option of a command."""
    return click.option("-o", "--output", type=PATH, default=default, show_default=True,
                        help=help)


def parse_cell(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """--patch ROW,COL as a (row, col) tuple."""
    parts = (value or "").split(",")
    if value is not None and (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)):
        raise click.BadParameter(f"must look like ROW,COL, got {value!r}", ctx, param)
    return None if value is None else (int(parts[0]), int(parts[1]))


@dataclass
class DataOptions:
    """Which categories of DATA to use and how to read them."""

    category: tuple[str, ...]
    layout: str
    normal: str
    train_val_split: float = 1.0
    max_train: int | None = None

    def folders(self, data: Path) -> list[Path]:
        """The category folders (checked to exist)."""
        from ..data.layouts import category_folders

        return category_folders(data, list(self.category) or None)

    def load(self, folder: Path, seed: int = 0) -> Any:
        """One category's DatasetSplit, its training images cut to --max-train."""
        from ..data.layouts import load_dataset

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
data_options = _grouped("data_opts", _DATA, lambda v: DataOptions(**v))
training_data_options = _grouped("data_opts", _DATA + _TRAINING, lambda v: DataOptions(**v))


@dataclass
class TrackingOptions:
    """--log-project / --log-group folders and optional MLflow / W&B logging."""

    log_project: str | None
    log_group: str | None
    tracker: str | None

    def folder(self, output: Path) -> Path:
        """OUT/<project>/<group>, or OUT; created and checked writable."""
        from ..reports.tracking import run_folder

        return prepare_output(run_folder(output, self.log_project, self.log_group))

    @contextmanager
    def start(self, folder: Path, name: str, params: dict[str, Any]) -> Iterator[Any]:
        """A tracker run, finished however the block ends."""
        from ..reports.tracking import Tracker

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
], lambda v: TrackingOptions(**v))


@dataclass
class ReportOptions:
    """The optional per-category outputs of fit and evaluate."""

    save_reports: bool
    save_segmentation_images: bool
    save_anomaly_scores: bool

    @property
    def request(self) -> Any:
        """The library's evaluation.runs.ReportRequest for these options."""
        from ..evaluation.runs import ReportRequest

        return ReportRequest(self.save_reports, self.save_segmentation_images,
                             self.save_anomaly_scores)

    def evaluate(self, rows: list[dict[str, Any]], model: Any, split: Any, out: Path,
                 normal: str, track: Any) -> dict[str, Any]:
        """Evaluate one category: its results row (appended to `rows`), the requested outputs
        under `out` and the tracked metrics."""
        from ..evaluation.runs import evaluate_category

        row, _ = evaluate_category(model, split, out, self.request, normal, track, writing, say)
        rows.append(row)
        return row


report_options = _grouped("reports", [
    (("--save-reports", "save_reports"), dict(is_flag=True, help=(
        "Plots, Bad_predictions.xlsx, index.html per category in OUT/reports/<category>."))),
    (("--save-segmentation-images", "save_segmentation_images"), dict(is_flag=True, help=(
        "image | mask | overlay PNGs under OUT/segmentation/<category>."))),
    (("--save-anomaly-scores", "save_anomaly_scores"), dict(is_flag=True, help=(
        "CSV of path, group, label, score: OUT/scores/<category>.csv."))),
], lambda v: ReportOptions(**v))


# -- results -----------------------------------------------------------------------------------

def print_table(rows: list[dict[str, Any]]) -> None:
    """Print the main metrics per category (and their mean)."""
    from ..evaluation.evaluate import mean_row

    cols = ["category", "image_auroc", "pixel_auroc", "pro", "f1_max", "f1_at_threshold",
            "predict_ms_per_image"]
    table = rows + ([mean_row(rows)] if len(rows) > 1 else [])
    widths = [max([len(str(r.get("category"))) for r in table] + [8])] + [10] * (len(cols) - 1)
    for cells in [cols] + [[r.get(c) for c in cols] for r in table]:
        click.echo("  ".join((f"{v:.4f}" if isinstance(v, float) else str(
            "" if v is None else v)).ljust(w) for v, w in zip(cells, widths, strict=True)))


def show_results(rows: list[dict[str, Any]], out: Path) -> None:
    """Write results.csv/json into `out` and print the table."""
    from ..evaluation.evaluate import write_results

    with writing(out / "results.csv"):
        path = write_results(rows, out)
    print_table(rows)
    say(f"results: {path}")
