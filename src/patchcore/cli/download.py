"""`patchcore download`: fetch a benchmark dataset into our layout (datasets/download.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .options import PATH
from .shell import app, current_run, say


@app.command()
@click.argument("dataset", type=click.Choice(["mvtec", "visa"]))
@click.argument("categories", nargs=-1)
@click.option("--root", type=PATH, required=True,
              help="Dataset folder: categories go to ROOT/<category>; an archive already "
                   "saved in ROOT under its published name is used instead of downloading.")
@click.option("--accept-license", "accept", is_flag=True,
              help="Accept the dataset's licence (printed before the first download).")
@click.option("--mirror", metavar="URL", help="Base URL serving the same archive names "
              "(default: $PATCHCORE_DATASETS_MIRROR, else the publisher's address).")
@click.option("--remove-archive", is_flag=True, help="Delete each archive once unpacked.")
@click.option("--retries", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Resumed attempts after a dropped connection.")
def download(dataset: str, categories: tuple[str, ...], root: Path, accept: bool,
             mirror: str | None, remove_archive: bool, retries: int) -> None:
    """Download DATASET (mvtec or visa), all or some CATEGORIES, verify its SHA-256 and unpack
    it into ROOT in the MVTec layout, ready for `patchcore fit ROOT`."""
    from ..datasets import DATASETS, download_dataset, licence_accepted

    info = DATASETS[dataset]
    if not (root.is_dir() and licence_accepted(dataset, root)):
        click.echo(f"{info.title} licence:\n  {info.licence}\n", err=True)
        if not accept and sys.stdin.isatty():
            accept = click.confirm("Do you accept this licence?", default=False, err=True)
    folders = download_dataset(dataset, root, categories, accept_licence=accept, mirror=mirror,
                               keep_archive=not remove_archive,
                               progress=not current_run().quiet, retries=retries, say=say)
    current_run().kept.extend(folders)
    say(f"{len(folders)} categories in {root}: patchcore fit {root}")
