"""The `patchcore` command line: a thin shell over the library.

shell.py runs one invocation and turns its failures into one line (`app`, `main`); options.py
generates the options from the config dataclasses and holds the shared option groups;
commands.py holds the commands, each a thin call into the library (importing it registers them
on `app`).
"""

from . import commands  # noqa: F401  (registers the commands on `app`)
from .download import download as download_command  # noqa: F401  (`patchcore download`)
from .export import export as export_command  # noqa: F401  (`patchcore export`)
from .interop import import_pci as import_pci_command  # noqa: F401  (`patchcore import-pci`)
from .shell import app, main

__all__ = ["app", "main"]
