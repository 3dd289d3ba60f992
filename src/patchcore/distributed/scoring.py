"""Batch scoring on Ray Data: `predict(model_dir, inputs, output)`.

Local files (paths, folders, globs) go to a fixed pool of scoring actors as a dataset of paths
that the actors read themselves; URIs that Ray Data reads (s3://, gs://, ...) are read as a
Ray Dataset of encoded bytes (`read_binary_files`), as is a user's own dataset of bytes.
The model folder is read and validated once on the driver and its plain `ModelState` (numpy
bank rows, config, calibration) is placed in the object store once; every actor builds its
model from that one object (a zero-copy read on its node), never from a per-batch copy.

Results stream back to the driver, which keeps the first row of every path (a task that Ray
retries after a worker died may deliver rows again: they are dropped, never duplicated), writes
maps as they arrive when asked, and writes predictions.parquet and predictions.csv last.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import RuntimeSettings
from ..errors import ConfigError, DataError, PatchCoreError
from ..reports.predictions import (
    OutputError,
    check_output_folder,
    collect_images,
    folder_lock,
    output_names,
    write_atomic,
)
from .cluster import cluster_cpus, quiet_ray_data, session

log = logging.getLogger(__name__)

PARQUET = "predictions.parquet"
TABLE = "predictions.csv"
MAPS = "maps"
COLUMNS = ("path", "score", "calibrated_score", "label", "error")
ERROR_LABEL = "error"
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

__all__ = ["DistributedPrediction", "ResultCollector", "Scorer", "predict"]


class Scorer:
    """Ray Data actor: one model per worker, built once from the state in the object store.

    `state_ref` is a one-element list holding the ObjectRef (a list, so that Ray hands the
    reference itself to the constructor and the state is fetched here, once).
    """

    def __init__(self, state_ref: list[Any], settings: RuntimeSettings, maps: bool,
                 threads: int) -> None:
        import ray
        import torch

        from ..model import PatchCore

        torch.set_num_threads(max(1, threads))
        self.model = PatchCore.from_state(ray.get(state_ref[0]),
                                          settings.replace(progress=False, num_workers=0))
        self.maps = maps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one batch of {"path"[, "bytes"]}: a row per image; a bad image is a row whose
        label is "error" (its message in `error`), not a failed batch."""
        paths = [str(p) for p in batch["path"]]
        # Encoded bytes where the dataset carries them (URIs, user datasets); local files are
        # read here, by predict itself (the same checks and decoding as a local run).
        data: list[bytes] | list[str] = ([bytes(b) for b in batch["bytes"]] if "bytes" in batch
                                         else paths)
        try:
            rows = self._rows(data)
        except PatchCoreError:  # one bad image: score the batch image by image
            rows = []
            for item, path in zip(data, paths, strict=True):
                try:
                    rows += self._rows([item])
                except PatchCoreError as exc:
                    rows.append((math.nan, math.nan, ERROR_LABEL, f"{path}: {exc}", b""))
        out = {"path": np.array(paths, dtype=object)}
        for k, name in enumerate(COLUMNS[1:]):
            out[name] = np.array([r[k] for r in rows],
                                 dtype=np.float64 if k < 2 else object)
        if self.maps:
            out["map"] = np.array([r[4] for r in rows], dtype=object)
        return out

    def _rows(self, data: list[bytes] | list[str]
              ) -> list[tuple[float, float, str, str, bytes]]:
        pred = self.model.predict(data)
        names = pred.label_names
        rows = []
        for i in range(len(data)):
            blob = b""
            if self.maps:
                buf = io.BytesIO()
                np.save(buf, pred.original_map(i).astype(np.float32), allow_pickle=False)
                blob = buf.getvalue()
            rows.append((float(pred.scores[i]), float(pred.calibrated[i]), names[i], "", blob))
        return rows


@dataclass
class ResultCollector:
    """Rows gathered on the driver, one per path: the first delivery wins, repeats (retried
    tasks) are counted and dropped. Maps are written to `maps_dir` as they arrive."""

    order: dict[str, int] = field(default_factory=dict)  # path -> input position, when known
    names: dict[str, str] = field(default_factory=dict)  # path -> output name, when known
    maps_dir: Path | None = None
    columns: dict[str, list[Any]] = field(default_factory=lambda: {c: [] for c in COLUMNS})
    duplicates: int = 0
    seen: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.columns["path"])

    def add(self, batch: dict[str, Any]) -> int:
        """Take the new rows of one result batch; returns how many were new."""
        seen = self.seen
        new = 0
        for i, path in enumerate(batch["path"]):
            path = str(path)
            if path in seen:
                self.duplicates += 1
                continue
            seen.add(path)
            new += 1
            for c in COLUMNS[1:]:
                value = batch[c][i]
                self.columns[c].append(float(value) if c in ("score", "calibrated_score")
                                       else str(value))
            self.columns["path"].append(path)
            if self.maps_dir is not None and "map" in batch and len(batch["map"][i]):
                target = self.maps_dir / (self.name(path) + "_map.npy")
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, bytes(batch["map"][i]))
        if new < len(batch["path"]):
            log.debug("dropped %d repeated rows (retried tasks)", len(batch["path"]) - new)
        return new

    def name(self, path: str) -> str:
        """The output name of `path` (its mirrored relative name; for a URI, the URI's path)."""
        if path in self.names:
            return self.names[path]
        parts = [p for p in re.sub(URI, "", path).replace("\\", "/").split("/")
                 if p not in ("", ".", "..")]
        return str(Path(*parts).with_suffix("").as_posix()) if parts else "image"

    def rows(self) -> dict[str, list[Any]]:
        """The columns, in input order where it is known (otherwise sorted by path)."""
        paths = self.columns["path"]
        key = ((lambda i: self.order.get(paths[i], len(self.order))) if self.order
               else (lambda i: paths[i]))
        perm = sorted(range(len(paths)), key=key)
        return {c: [v[i] for i in perm] for c, v in self.columns.items()}


@dataclass
class DistributedPrediction:
    """What `predict` wrote: the table (pyarrow), its files, timing and repeats dropped."""

    table: Any  # pyarrow.Table with COLUMNS
    files: dict[str, Path]
    seconds: float
    workers: int
    duplicates: int = 0

    @property
    def images_per_second(self) -> float:
        """Images scored per second of the whole run (reading, scoring and collecting)."""
        return self.table.num_rows / max(self.seconds, 1e-9)

    @property
    def summary(self) -> str:
        """One line for the terminal."""
        errors = sum(1 for v in self.table.column("label").to_pylist() if v == ERROR_LABEL)
        return (f"{self.table.num_rows} images scored on Ray by {self.workers} workers in "
                f"{self.seconds:.1f}s ({self.images_per_second:.1f} img/s"
                + (f", {errors} unreadable" if errors else "") + f") -> {self.files['csv']}")


def _inputs(inputs: Any) -> tuple[list[Path], list[str]]:
    """(local image files, URIs) of paths, folders, globs and URIs."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    uris = [str(i) for i in items if URI.match(str(i)) and not str(i).startswith("file://")]
    local = [i if not str(i).startswith("file://") else str(i)[7:] for i in items
             if str(i) not in uris]
    return (collect_images(local) if local else []), uris


def _check_output(folder: Path, maps: bool, overwrite: bool) -> None:
    if not overwrite and any((folder / n).exists() for n in (PARQUET, TABLE)):
        raise OutputError(f"{folder} already holds predictions; pass --overwrite to replace "
                          "them, or choose another --output")
    if maps and (folder / MAPS).exists() and not (folder / MAPS).is_dir():
        raise OutputError(f"{folder / MAPS} is a file; move it away or choose another --output")


def _write_tables(folder: Path, rows: dict[str, list[Any]], maps: bool,
                  collector: ResultCollector) -> tuple[Any, dict[str, Path]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "path": pa.array(rows["path"], pa.string()),
        "score": pa.array(rows["score"], pa.float32()),
        "calibrated_score": pa.array([None if math.isnan(v) else v
                                      for v in rows["calibrated_score"]], pa.float32()),
        "label": pa.array(rows["label"], pa.string()),
        "error": pa.array([e or None for e in rows["error"]], pa.string()),
    })
    if maps:
        table = table.append_column("map", pa.array(
            [f"{MAPS}/{collector.name(p)}_map.npy" if lab != ERROR_LABEL else None
             for p, lab in zip(rows["path"], rows["label"], strict=True)], pa.string()))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    files = {"parquet": folder / PARQUET, "csv": folder / TABLE}
    write_atomic(files["parquet"], sink.getvalue().to_pybytes())
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(table.column_names)
    for row in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
        writer.writerow("" if v is None else v for v in row)
    write_atomic(files["csv"], text.getvalue().encode("utf-8"))
    return table, files


def predict(
    model_dir: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | Any,
    output: str | os.PathLike,
    *,
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    settings: RuntimeSettings | None = None,
    maps: bool = False,
    overwrite: bool = False,
    on_rows: Callable[[int], Any] | None = None,
) -> DistributedPrediction:
    """Score images on Ray with the model folder `model_dir`; write OUTPUT/predictions.parquet
    and predictions.csv (path, score, calibrated_score, label, error) and, with `maps`,
    OUTPUT/maps/<name>_map.npy at each image's own size.

    `inputs`: files, folders, glob patterns, URIs that Ray Data reads (s3://...), or a
    `ray.data.Dataset` with "path" and "bytes" columns (`read_binary_files(...,
    include_paths=True)`). `address`: a running cluster ("auto", "HOST:6379", "ray://...");
    None starts a local instance (or uses the Ray this process already runs). `workers`:
    scoring actors (default: the cluster's CPUs / `cpus_per_worker`); `settings`: batch size,
    device and progress bar. `on_rows(n)` is called with the rows collected so far after each
    result batch. Scores equal `PatchCore.load(model_dir).predict(files)`.
    """
    from ..storage import load_state

    settings = settings or RuntimeSettings()
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise ConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
    state = load_state(Path(model_dir))  # validated before any cluster work
    dataset = inputs if hasattr(inputs, "map_batches") else None
    files, uris = ([], []) if dataset is not None else _inputs(inputs)
    if dataset is None and not files and not uris:
        raise DataError("no images to score; pass files, folders, glob patterns or URIs")
    folder = Path(output)
    check_output_folder(folder)
    t0 = time.perf_counter()
    with folder_lock(folder):
        _check_output(folder, maps, overwrite)
        collector = ResultCollector(
            order={str(p): i for i, p in enumerate(files)},
            names=dict(zip(map(str, files), output_names(files), strict=True)) if files else {},
            maps_dir=folder / MAPS if maps else None)
        with session(address, settings.progress) as ray:
            quiet_ray_data(settings.progress)
            n = workers or max(1, int(cluster_cpus(ray) // cpus_per_worker))
            if dataset is None and not uris:
                # Local files: a list of paths that the scoring actors read themselves. Read
                # tasks would each start a worker process importing pyarrow (2 s of a 2-core
                # node's CPU at the first read of a session).
                dataset = ray.data.from_items([{"path": str(p)} for p in files])
            elif dataset is None:
                # Reading is I/O: it takes no CPU slot from the scoring actors. Without a
                # concurrency cap, zero-CPU reads all start at once, each in a new worker
                # process (18 processes for 592 files on 2 cores: the import CPU of those
                # processes halved 2 actors' throughput); one read task per actor keeps up.
                dataset = ray.data.read_binary_files([str(p) for p in files] + uris,
                                                     include_paths=True, num_cpus=0,
                                                     concurrency=n)
            ref = ray.put(state)  # once; actors read it from the object store
            scored = dataset.map_batches(
                Scorer, fn_constructor_args=([ref], settings, maps, round(cpus_per_worker)),
                batch_size=settings.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=n), num_cpus=cpus_per_worker,
                num_gpus=gpus_per_worker or None)  # Ray Data restarts dead actors, retries
            with tqdm(total=len(files) + len(uris) if not uris else None, desc="ray predict",
                      unit="img", disable=not settings.progress) as bar:
                for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
                    bar.update(collector.add(batch))
                    if on_rows is not None:
                        on_rows(len(collector))
        rows = collector.rows()
        if files and len(rows["path"]) != len(files):
            lost = sorted(set(map(str, files)) - set(rows["path"]))
            raise DataError(f"{len(lost)} images came back without a result (first: "
                            f"{lost[0] if lost else '?'}); rerun with --overwrite") from None
        table, written = _write_tables(folder, rows, maps, collector)
    result = DistributedPrediction(table, written, time.perf_counter() - t0, n,
                                   collector.duplicates)
    log.info("%s", result.summary)
    return result
