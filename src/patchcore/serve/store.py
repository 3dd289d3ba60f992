"""Review verdicts in SQLite: recorded predictions, a reviewer's verdict on each, and exports.

A recorded prediction keeps the uploaded image (as sent), its overlay PNG, score, label and
threshold. A reviewer marks it "correct" or "wrong" (or, for an uncalibrated model, states the
true label), which fixes its true label: good or anomalous (with a defect name). Exports: a CSV
of the reviewed rows, and the reviewed images in the `folder` dataset layout
(`<model>/train/good/...`, `<model>/test/<defect>/...`) ready for the next `patchcore fit`.
Client-given file names are reduced to a safe base name and only ever used inside that layout.
Unreviewed rows beyond `max_records` are dropped, oldest first; reviewed rows are kept.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sqlite3
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError

VERDICTS = ("correct", "wrong")
TRUE_LABELS = ("good", "anomalous")
DEFAULT_DEFECT = "defect"
SORTS = {"score": "score", "created": "id", "calibrated": "calibrated"}
CSV_COLUMNS = ("id", "model", "filename", "created", "score", "calibrated_score", "label",
               "threshold", "verdict", "true_label", "defect", "reviewed")
ROW_COLUMNS = ("id", "model", "filename", "created", "score", "calibrated", "label",
               "threshold", "verdict", "true_label", "defect", "reviewed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    filename TEXT NOT NULL,
    score REAL NOT NULL,
    calibrated REAL,
    label TEXT NOT NULL,
    threshold REAL,
    image BLOB NOT NULL,
    suffix TEXT NOT NULL,
    overlay BLOB,
    verdict TEXT,
    true_label TEXT,
    defect TEXT,
    reviewed REAL
);
CREATE INDEX IF NOT EXISTS predictions_reviewed ON predictions (reviewed);
"""

_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def image_suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes, from their signature (".png" when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return next((s for magic, s in _MAGIC if data.startswith(magic)), ".png")


def safe_stem(filename: str | None) -> str:
    """A client's file name reduced to a harmless stem: base name only, [A-Za-z0-9._-]."""
    base = re.split(r"[\\/]", filename or "")[-1]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", base.rsplit(".", 1)[0] if "." in base else base)
    stem = stem.strip("._")[:80]
    return stem or "image"


def check_defect(name: str | None) -> str:
    """A defect name usable as a folder: letters, digits, '_' and '-', not 'good'."""
    name = (name or DEFAULT_DEFECT).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}", name) or name == "good":
        raise DataError(f"defect name {name[:50]!r} is not usable as a folder name: use 1-40 "
                        "letters, digits, '_' or '-' (not 'good')")
    return name


class ReviewStore:
    """Recorded predictions and verdicts in one SQLite file (safe across threads)."""

    def __init__(self, path: str | os.PathLike, max_records: int = 2000) -> None:
        self.path = Path(path)
        self.max_records = max_records
        self.lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), check_same_thread=False,
                                      isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise DataError(f"review database {self.path} cannot be opened: {exc}; choose "
                            "another file with --db") from None

    def close(self) -> None:
        """Close the database."""
        with self.lock:
            self.db.close()

    def add(self, model: str, filename: str | None, score: float, calibrated: float | None,
            label: str, threshold: float | None, image: bytes, overlay: bytes | None) -> int:
        """Record one prediction; returns its id. Prunes old unreviewed rows."""
        with self.lock:
            cur = self.db.execute(
                "INSERT INTO predictions (created, model, filename, score, calibrated, label, "
                "threshold, image, suffix, overlay) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), model, safe_stem(filename), float(score), calibrated, label,
                 threshold, sqlite3.Binary(image), image_suffix(image),
                 None if overlay is None else sqlite3.Binary(overlay)))
            row_id = int(cur.lastrowid or 0)
            self.db.execute(
                "DELETE FROM predictions WHERE reviewed IS NULL AND id NOT IN (SELECT id FROM "
                "predictions WHERE reviewed IS NULL ORDER BY id DESC LIMIT ?)",
                (self.max_records,))
        return row_id

    def rows(self, sort: str = "created", descending: bool = True, limit: int = 200,
             reviewed: bool | None = None) -> list[dict[str, Any]]:
        """Recorded predictions without their images, sorted by `sort` (score, created,
        calibrated)."""
        if sort not in SORTS:
            raise DataError(f"cannot sort by {sort[:40]!r}; use one of {', '.join(SORTS)}")
        where = "" if reviewed is None else (
            "WHERE reviewed IS NOT NULL" if reviewed else "WHERE reviewed IS NULL")
        order = "DESC" if descending else "ASC"
        with self.lock:
            cur = self.db.execute(
                f"SELECT {', '.join(ROW_COLUMNS)} FROM predictions {where} "
                f"ORDER BY {SORTS[sort]} {order}, id {order} LIMIT ?", (int(limit),))
            return [dict(zip(ROW_COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def row(self, row_id: int) -> dict[str, Any] | None:
        """One recorded prediction (without images), or None."""
        with self.lock:
            r = self.db.execute(f"SELECT {', '.join(ROW_COLUMNS)} FROM predictions WHERE id = ?",
                                (row_id,)).fetchone()
        return None if r is None else dict(zip(ROW_COLUMNS, r, strict=True))

    def blob(self, row_id: int, which: str) -> tuple[bytes, str] | None:
        """(bytes, suffix) of a row's `image` or `overlay` (".png"), or None."""
        column = {"image": "image, suffix", "overlay": "overlay, '.png'"}[which]
        with self.lock:
            r = self.db.execute(f"SELECT {column} FROM predictions WHERE id = ?",
                                (row_id,)).fetchone()
        if r is None or r[0] is None:
            return None
        return bytes(r[0]), r[1]

    def review(self, row_id: int, verdict: str | None = None, true_label: str | None = None,
               defect: str | None = None) -> dict[str, Any]:
        """Store a verdict ("correct"/"wrong") or a true label ("good"/"anomalous").

        DataError when neither or both are given, the value is unknown, a verdict is given on
        an uncalibrated prediction, or the defect name is unusable; KeyError for an unknown id.
        """
        current = self.row(row_id)
        if current is None:
            raise KeyError(row_id)
        if (verdict is None) == (true_label is None):
            raise DataError('send either "verdict" ("correct" or "wrong") or "true_label" '
                            '("good" or "anomalous")')
        if verdict is not None:
            if verdict not in VERDICTS:
                raise DataError(f"verdict must be 'correct' or 'wrong', not {str(verdict)[:40]!r}")
            if current["label"] not in TRUE_LABELS:
                raise DataError("this prediction is uncalibrated (no label to confirm); send "
                                '"true_label" ("good" or "anomalous") instead of a verdict')
            predicted = current["label"]
            true_label = predicted if verdict == "correct" else (
                "good" if predicted == "anomalous" else "anomalous")
        elif true_label not in TRUE_LABELS:
            raise DataError(f"true_label must be 'good' or 'anomalous', not "
                            f"{str(true_label)[:40]!r}")
        defect_name = check_defect(defect) if true_label == "anomalous" else None
        with self.lock:
            updated = self.db.execute(
                "UPDATE predictions SET verdict = ?, true_label = ?, defect = ?, reviewed = ? "
                "WHERE id = ?", (verdict, true_label, defect_name, time.time(), row_id)).rowcount
        row = self.row(row_id)
        if not updated or row is None:  # pruned between the read and the update
            raise KeyError(row_id)
        return row

    def export_csv(self) -> str:
        """The reviewed predictions as CSV (CSV_COLUMNS), oldest first."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in self.rows(sort="created", descending=False, limit=-1, reviewed=True):
            writer.writerow([r["id"], r["model"], r["filename"], f"{r['created']:.3f}",
                             f"{r['score']:.6g}", "" if r["calibrated"] is None
                             else f"{r['calibrated']:.6g}", r["label"],
                             "" if r["threshold"] is None else f"{r['threshold']:.6g}",
                             r["verdict"] or "", r["true_label"], r["defect"] or "",
                             f"{r['reviewed']:.3f}"])
        return buf.getvalue()

    def layout_entries(self) -> Iterator[tuple[str, bytes]]:
        """(relative path, image bytes) of every reviewed image in the `folder` layout."""
        with self.lock:
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM predictions WHERE reviewed IS NOT NULL ORDER BY id").fetchall()]
        for row_id in ids:
            with self.lock:
                r = self.db.execute("SELECT model, filename, true_label, defect, image, suffix "
                                    "FROM predictions WHERE id = ?", (row_id,)).fetchone()
            if r is None:
                continue
            model, stem, true_label, defect, image, suffix = r
            group = "train/good" if true_label == "good" else f"test/{defect or DEFAULT_DEFECT}"
            yield f"{safe_stem(model)}/{group}/{row_id:06d}_{stem}{suffix}", bytes(image)

    def export_zip(self, target: io.BufferedIOBase | Any) -> int:
        """Write the reviewed images in the dataset layout into a zip; returns the count."""
        n = 0
        with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in self.layout_entries():
                zf.writestr(name, data)
                n += 1
        return n

    def export_layout(self, folder: str | os.PathLike) -> int:
        """Write the reviewed images in the dataset layout under `folder` (chosen by the
        operator, never by a client); existing files are replaced. Returns the count."""
        folder = Path(folder)
        n = 0
        for name, data in self.layout_entries():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            n += 1
        return n
