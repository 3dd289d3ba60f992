"""The models a service serves: found once in a folder, loaded once, reloaded when replaced.

`ModelRegistry` serves one model folder, or every model folder of a results folder
(`RESULTS/models/<name>`) or of a plain folder of models. A save replaces a model folder
atomically (a new folder swapped in), so a new save shows as a new identity (device, inode,
size, mtime) of its config.json; the registry compares identities at most every
`check_interval` seconds when a model is asked for, loads the new save and swaps it in. Until the
new save has loaded, and when it cannot be loaded, the previous model keeps serving (the failure
is reported by `/v1/models` and logged). Names come from folder names; a client's name is only
ever looked up among them, never turned into a path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, PatchCoreError
from ..storage import CONFIG_FILE, is_model_folder, list_model_folders

log = logging.getLogger(__name__)

Identity = tuple[int, int, int, int]


class UnknownModel(PatchCoreError):
    """A client asked for a model name the service does not serve."""


def model_folders(source: str | os.PathLike) -> dict[str, Path]:
    """name -> folder of the models under `source`: a model folder (named after itself), a
    results folder with models/<name>, or a folder of model folders. ModelFileError if none."""
    source = Path(source)
    if is_model_folder(source):
        return {source.resolve().name: source}
    for parent in (source / "models", source):
        found = list_model_folders(parent)
        if found:
            return {p.name: p for p in found}
    raise ModelFileError(f"{source} holds no saved model: pass a model folder (config.json + "
                         "memory_bank.safetensors), a results folder with models/<name>, or a "
                         "folder of model folders")


def identity(folder: Path) -> Identity | None:
    """(device, inode, size, mtime_ns) of a model's config.json; None when it is missing."""
    try:
        st = os.stat(folder / CONFIG_FILE)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ServedModel:
    """One served model: its folder, the loaded estimator and its reload history."""

    name: str
    path: Path
    model: Any
    identity: Identity | None
    loaded_at: float = field(default_factory=time.time)
    reloads: int = 0
    reload_error: str | None = None
    checked: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def describe(self) -> dict[str, Any]:
        """What GET /v1/models says about this model (no file paths)."""
        m = self.model
        cal = m.calibration_
        info = m.fit_info_ or {}
        return {
            "name": self.name,
            "backbone": m.config.backbone,
            "layers": [list(mem.layers) for mem in m.members_],
            "imagesize": m.config.imagesize,
            "preprocess": m.config.preprocess,
            "calibrated": cal.calibrated,
            "image_threshold": cal.image_threshold,
            "pixel_threshold": cal.pixel_threshold,
            "threshold_rule": cal.image_threshold_rule or None,
            "training": {"train_images": info.get("train_images"),
                         "calibration_images": info.get("calibration_images"),
                         "bank_rows": [int(len(mem.bank)) for mem in m.members_]},
            "loaded_at": round(self.loaded_at, 3),
            "reloads": self.reloads,
            "reload_error": self.reload_error,
        }


class ModelRegistry:
    """Models by name, loaded with `loader(folder)`, reloaded when their folder is replaced."""

    def __init__(self, source: str | os.PathLike, loader: Callable[[Path], Any],
                 check_interval: float = 1.0) -> None:
        self.source = Path(source)
        self.loader = loader
        self.check_interval = check_interval
        self.entries: dict[str, ServedModel] = {}
        self.lock = threading.Lock()
        self.scanned = 0.0
        self.ready = False
        self.reload_count = 0

    def load_all(self) -> None:
        """Find and load every model; ModelFileError (or the loader's error) if one fails."""
        folders = model_folders(self.source)
        entries = {}
        for name, path in folders.items():
            before = identity(path)
            entries[name] = ServedModel(name, path, self.loader(path), before)
            log.info("serving model %s from %s", name, path)
        with self.lock:
            self.entries = entries
            self.scanned = time.monotonic()
        self.ready = True

    def names(self) -> list[str]:
        """Names of the served models (after a rescan when one is due)."""
        self.rescan()
        return sorted(self.entries)

    def get(self, name: str) -> ServedModel:
        """The served model `name`, reloaded first when its folder was replaced."""
        entry = self.entries.get(name)
        if entry is None:
            self.rescan()
            entry = self.entries.get(name)
        if entry is None:
            shown = name if len(name) <= 80 and name.isprintable() else repr(name[:80])
            raise UnknownModel(f"no model named {shown!r}; served models: "
                               f"{', '.join(sorted(self.entries)) or 'none'}")
        if self.refresh(entry) is None:  # its folder is gone: a rescan drops it
            self.scanned = 0.0
            self.rescan()
            if name not in self.entries:
                raise UnknownModel(f"model {name!r} is no longer served (its folder is gone)")
        return entry

    def due(self, last: float) -> bool:
        return time.monotonic() - last >= self.check_interval

    def refresh(self, entry: ServedModel) -> Identity | None:
        """Load `entry`'s folder again when its config.json has a new identity; returns the
        identity seen (None: the folder is gone)."""
        if not self.due(entry.checked):
            return entry.identity
        with entry.lock:
            if not self.due(entry.checked):
                return entry.identity
            entry.checked = time.monotonic()
            now = identity(entry.path)
            if now is None or now == entry.identity:
                return now
            try:
                model = self.loader(entry.path)
            except (PatchCoreError, OSError) as exc:
                text = (str(exc).splitlines() or [repr(exc)])[0]
                entry.reload_error = text.replace(str(entry.path), entry.name)[:500]
                entry.identity = now  # do not retry the same broken save on every request
                log.warning("model %s was replaced but cannot be loaded; the previous one keeps "
                            "serving: %s", entry.name, entry.reload_error)
                return now
            if identity(entry.path) != now:  # replaced again while loading: next check
                entry.checked = 0.0
            entry.model, entry.identity = model, now
            entry.loaded_at, entry.reload_error = time.time(), None
            entry.reloads += 1
            self.reload_count += 1
            log.info("model %s reloaded from %s", entry.name, entry.path)
            return now

    def rescan(self) -> None:
        """Add model folders that appeared under the source and drop those that vanished."""
        if not self.ready or not self.due(self.scanned):
            return
        with self.lock:
            if not self.due(self.scanned):
                return
            self.scanned = time.monotonic()
            try:
                folders = model_folders(self.source)
            except ModelFileError:
                folders = {}
            current = dict(self.entries)
        for name in set(current) - set(folders):
            if identity(current[name].path) is not None:
                continue  # still there but unreadable (a damaged save): the old one serves on
            log.info("model %s is gone from %s; no longer served", name, self.source)
            current.pop(name)
        for name in set(folders) - set(current):
            try:
                current[name] = ServedModel(name, folders[name], self.loader(folders[name]),
                                            identity(folders[name]))
                log.info("serving new model %s from %s", name, folders[name])
            except (PatchCoreError, OSError) as exc:
                log.warning("new model folder %s cannot be loaded: %s", folders[name], exc)
        self.entries = current
