"""The export folder format: `export.json` (what to run and how to score) beside the graphs
and bank files it names, each with its size and SHA-256.

An export folder holds, per ensemble member, one graph (`member_<i>.onnx`, or `.xml` + `.bin`
for OpenVINO) taking raw [0, 1] RGB views (B x 3 x S x S, float32) to patch features
(B x h x w x D, float32), and one bank file (`bank_<i>.safetensors`, tensor `rows`). The JSON
records the model's hyperparameters (preprocessing, k, Eq. 7, blur), its calibration and each
member's ensemble norm. Reading it needs only the standard library and numpy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PatchCoreConfig
from ..engine.calibration import Calibration
from ..errors import ConfigError, ModelFileError

MANIFEST = "export.json"
FORMAT = "patchcore-export"
FORMAT_VERSION = 1
GRAPH_FORMATS = ("onnx", "openvino")
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBERS = 16


@dataclass(frozen=True)
class MemberEntry:
    """One ensemble member of an export: its graph, bank file and shapes."""

    backbone: str
    layers: tuple[str, ...]
    graph: str  # file name of the graph (.onnx or OpenVINO .xml)
    bank: str  # file name of the safetensors bank (tensor "rows")
    rows: int
    dim: int
    grid: tuple[int, int]
    norm: tuple[float, float] | None  # ensemble (mean, std) of bank self-distances


@dataclass(frozen=True)
class Manifest:
    """The validated content of an export folder's export.json."""

    folder: Path
    graph_format: str
    config: PatchCoreConfig
    calibration: Calibration
    members: tuple[MemberEntry, ...]
    files: dict[str, dict[str, Any]]
    patchcore_version: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (paths relative to the folder)."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "patchcore_version": self.patchcore_version, "graph_format": self.graph_format,
            "input": {"name": "images", "layout": "NCHW", "values": "RGB in [0, 1]",
                      "size": self.config.imagesize},
            "config": self.config.to_dict(), "calibration": self.calibration.to_dict(),
            "members": [{"backbone": m.backbone, "layers": list(m.layers), "graph": m.graph,
                         "bank": m.bank, "rows": m.rows, "dim": m.dim, "grid": list(m.grid),
                         "norm": None if m.norm is None else list(m.norm)}
                        for m in self.members],
            "files": self.files,
        }


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(manifest: Manifest) -> Path:
    """Hash every named file and write export.json into the manifest's folder."""
    files = {name: file_digest(manifest.folder / name) for name in sorted(manifest.files)}
    doc = {**manifest.to_dict(), "files": files}
    path = manifest.folder / MANIFEST
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def is_export_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a folder with an export.json (without validating it)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def _check(ok: bool, where: Path, message: str) -> None:
    if not ok:
        raise ModelFileError(f"{where}: {message}")


def _safe_name(name: Any, where: Path) -> str:
    _check(isinstance(name, str) and 0 < len(name) < 200 and Path(name).name == name
           and not name.startswith("."), where, f"bad file name {str(name)[:80]!r} in the "
           "manifest (plain names inside the export folder only)")
    return name


def _member(entry: Any, k: int, where: Path) -> MemberEntry:
    _check(isinstance(entry, dict), where, f"member {k} must be a JSON object")
    try:
        grid = tuple(int(v) for v in entry["grid"])
        norm = entry["norm"]
        member = MemberEntry(
            backbone=str(entry["backbone"]), layers=tuple(str(x) for x in entry["layers"]),
            graph=_safe_name(entry["graph"], where), bank=_safe_name(entry["bank"], where),
            rows=int(entry["rows"]), dim=int(entry["dim"]), grid=(grid[0], grid[1]),
            norm=None if norm is None else (float(norm[0]), float(norm[1])))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ModelFileError(f"{where}: member {k} is incomplete or malformed ({exc!r:.80})"
                             ) from None
    _check(member.rows > 0 and member.dim > 0 and min(member.grid) > 0 and len(grid) == 2,
           where, f"member {k} has empty shapes")
    _check(member.norm is None or (all(math.isfinite(v) for v in member.norm)
                                   and member.norm[1] > 0), where,
           f"member {k} has an invalid ensemble norm")
    return member


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The validated manifest of an export folder; ModelFileError (one line) for a missing,
    foreign, newer or malformed one. File digests are checked by `verify_files`."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ModelFileError(f"{folder} is not a folder; pass the folder written by "
                             "`patchcore export`")
    if not path.is_file():
        raise ModelFileError(f"{folder} has no {MANIFEST}: not an export folder (write one with "
                             "`patchcore export MODEL -o DIR`)")
    _check(path.stat().st_size <= MAX_MANIFEST_BYTES, path, "too large to be a manifest")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from None
    _check(isinstance(doc, dict) and doc.get("format") == FORMAT, path,
           f"not a patchcore export (no \"format\": \"{FORMAT}\")")
    version = doc.get("format_version")
    _check(isinstance(version, int) and not isinstance(version, bool), path,
           "format_version must be an integer")
    _check(version <= FORMAT_VERSION, path, f"export format {version} is newer than this "
           f"patchcore reads ({FORMAT_VERSION}); upgrade patchcore")
    graph_format = doc.get("graph_format")
    _check(graph_format in GRAPH_FORMATS, path, f"unknown graph_format {graph_format!r}")
    try:
        config = PatchCoreConfig.from_dict(doc["config"])
        calibration = Calibration.from_dict(doc["calibration"])
    except KeyError as exc:
        raise ModelFileError(f"{path}: missing entry {exc}") from None
    except ConfigError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    members = doc.get("members")
    _check(isinstance(members, list) and 0 < len(members) <= MAX_MEMBERS, path,
           "members must be a list of 1 to 16 entries")
    entries = tuple(_member(m, k, path) for k, m in enumerate(members))
    _check(len(entries) == 1 or all(m.norm is not None for m in entries), path,
           "an ensemble needs every member's norm")
    files = doc.get("files")
    _check(isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()), path,
           "files must map names to digests")
    for name in files:
        _safe_name(name, path)
    for m in entries:
        _check(m.graph in files and m.bank in files, path,
               f"{m.graph} or {m.bank} has no digest in files")
    return Manifest(folder, graph_format, config, calibration, entries, files,
                    str(doc.get("patchcore_version", "?")))


def verify_files(manifest: Manifest) -> None:
    """ModelFileError when a file the manifest names is missing or changed (size, SHA-256)."""
    for name, expected in manifest.files.items():
        path = manifest.folder / name
        if not path.is_file():
            raise ModelFileError(f"{path} is missing; copy the whole export folder")
        if path.stat().st_size != expected.get("bytes"):
            raise ModelFileError(f"{path} has {path.stat().st_size} bytes, the manifest says "
                                 f"{expected.get('bytes')}: the export is truncated or changed")
        if file_digest(path)["sha256"] != expected.get("sha256"):
            raise ModelFileError(f"{path} does not match its SHA-256 in {MANIFEST}: the file is "
                                 "corrupted or was replaced; export again")
