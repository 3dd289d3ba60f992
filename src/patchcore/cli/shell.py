"""One invocation of the `patchcore` command and its failures.

A user mistake, a refused output folder or an OS error (disk full, permission denied) is one
line on stderr and exit code 2; Ctrl-C is one line saying what was kept, exit code 130; anything
else is a bug and keeps its traceback. The commands register themselves on `app` (commands.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import PatchCoreError


@dataclass
class Run:
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


def current_run() -> Run:
    """The running command's state (a fresh one outside a command)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.find_object(Run) if ctx else None) or Run()


def say(text: str) -> None:
    """Print unless -q."""
    if not current_run().quiet:
        click.echo(text)


def prepare_output(folder: Path) -> Path:
    """Create the output folder if needed and prove it writable, before any expensive work."""
    from ..reports.predictions import check_output_folder

    current_run().created += check_output_folder(folder)
    return folder


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Mark `path` as being written; once the block finishes it counts as kept."""
    current_run().writing = path
    yield path
    current_run().writing = None
    current_run().kept.append(path)


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
        from ..reports.predictions import remove_empty_folders

        try:
            return super().invoke(ctx)
        except PatchCoreError as exc:
            message, code = f"error: {_one_line(str(exc))}", 2
        except OSError as exc:
            where = exc.filename if exc.filename is not None else current_run().writing
            reason = exc.strerror.rstrip(".").lower() if exc.strerror else str(exc)
            message, code = _one_line(f"error: {reason}" + (f": {where}" if where else "")), 2
        except KeyboardInterrupt:
            message, code = current_run().interrupted(), 130
        remove_empty_folders(current_run().created)
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
    ctx.obj = Run(quiet=quiet)


def main() -> None:
    """Entry point of the `patchcore` command."""
    app.main(prog_name="patchcore")
