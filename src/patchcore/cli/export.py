"""`patchcore export`: a model folder as ONNX or OpenVINO for the torch-free inferencer."""

from __future__ import annotations

from pathlib import Path

import click

from .options import PATH
from .shell import app, say


@app.command("export")
@click.argument("model_dir", metavar="MODEL", type=PATH)
@click.option("-o", "--output", type=PATH, required=True,
              help="Export folder (created; an existing export needs --overwrite).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "openvino"]), default="onnx",
              show_default=True, help="Graph format of the backbone + patch-feature step.")
@click.option("--exporter", type=click.Choice(["auto", "torchscript", "dynamo"]),
              default="auto", show_default=True,
              help="torch ONNX exporter (auto: TorchScript, then dynamo where it fails).")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
@click.option("--no-check", is_flag=True,
              help="Skip comparing the export's features and scores with the torch model.")
def export(model_dir: Path, output: Path, fmt: str, exporter: str, overwrite: bool,
           no_check: bool) -> None:
    """Export the model folder MODEL (every ensemble member) for `patchcore.inference` and
    `patchcore predict`: feature graphs, bank rows and export.json (docs/deploy.md)."""
    from ..export import export_model

    folder = export_model(model_dir, output, format=fmt, exporter=exporter,
                          overwrite=overwrite, check=not no_check)
    say(f"exported {model_dir} ({fmt}) -> {folder}")
