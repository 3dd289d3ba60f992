"""Model folders: config.json + memory_bank.safetensors <-> a plain `ModelState`.

Saving never loses anything: a model is written only to a new path, an empty folder or an
existing model folder that holds nothing but our two files; the new folder is written beside
the destination and swapped in with one atomic step, so the path always holds a complete
model, even under kill -9. Reads validate every entry before anything is built. No model code.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import platform
import re
import secrets
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import __version__
from .config import PatchCoreConfig
from .engine.bank import MemoryBank
from .engine.calibration import Calibration
from .errors import ConfigError, ModelFileError

log = logging.getLogger(__name__)

FORMAT = "patchcore-model"
FORMAT_VERSION = 2  # 2: train_root, runtime settings no longer saved; 1 still loads
CONFIG_FILE = "config.json"
BANK_FILE = "memory_bank.safetensors"
MODEL_FILES = frozenset({CONFIG_FILE, BANK_FILE})
MAX_CONFIG_BYTES = 64 * 2**20
MAX_CONFIG_DEPTH = 64  # a real config.json is 4 levels deep
MAX_INT_DIGITS = 30  # larger integers in config.json are damage, not settings
MAX_NAME_BYTES = 200  # room for the ".NAME.tmp-PID-TOKEN" siblings within NAME_MAX (255)

# Siblings a save creates next to the destination NAME: ".NAME.tmp-PID-TOKEN" (the new model
# while it is written; with the exchange it holds the old model after the swap) and
# ".NAME.old-PID-TOKEN" (the old model moved aside by the two-rename fallback).
_LEFTOVER = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{8})$")


@dataclass
class ModelState:
    """Everything a model folder holds, as plain data: no extractor, no index, no torch."""

    config: PatchCoreConfig
    banks: list[MemoryBank]
    feature_grid: tuple[int, int]
    calibration: Calibration
    train_paths: list[str]
    train_root: str | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)
    train_sizes: list[tuple[int, int]] = field(default_factory=list)  # (W, H) per image


def state_document(state: ModelState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json content and the safetensors tensors of a state."""
    tensors: dict[str, np.ndarray] = {}
    members = []
    for i, b in enumerate(state.banks):
        tensors[f"member{i}.bank"] = np.ascontiguousarray(b.features)
        tensors[f"member{i}.image_index"] = np.ascontiguousarray(b.image_index, dtype=np.int32)
        tensors[f"member{i}.position"] = np.ascontiguousarray(b.position, dtype=np.int16)
        members.append({"backbone": b.backbone, "layers": list(b.layers),
                        "bank_shape": list(b.features.shape), "bank_dtype": str(b.features.dtype),
                        "norm": list(b.norm)})
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "config": state.config.to_dict(),
        "members": members,
        "feature_grid": list(state.feature_grid),
        "calibration": state.calibration.to_dict(),
        "train_root": state.train_root,
        "train_paths": list(state.train_paths),
        "train_sizes": [list(s) for s in state.train_sizes],
        "fit_info": state.fit_info,
    }
    return document, tensors


def _reached(step: str) -> None:
    """Test hook, called after each step of a save; does nothing.

    tests/test_save_safety.py replaces it to kill the process (or raise) at every step.
    """


def save_state(state: ModelState, path: Path) -> Path:
    """Write a model folder so that `path` holds, at every instant, the complete old or new model.

    `path` must not exist, be an empty folder, or be a model folder holding only our files;
    anything else raises ModelFileError and nothing is touched. The new model is written to
    the sibling ".NAME.tmp-PID-TOKEN", fsynced, and swapped in atomically (see `_exchange`).
    Any OSError (disk full, permissions) removes the temporary folder, keeps the old model and
    raises a one-line ModelFileError. Folder and file modes follow the umask.
    """
    path = Path(path)
    _check_destination_name(path)
    document, tensors = state_document(state)
    config_text = json.dumps(document, indent=2, default=_json_default).encode("utf-8")
    parent = path.parent
    _make_parent(parent, path)
    try:
        _clean_leftovers(parent)
    except OSError as exc:
        log.warning("could not tidy leftovers of interrupted saves in %s: %s", parent, exc)
    kind = _destination_kind(path)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = parent / f".{path.name}.tmp-{token}"
    old = parent / f".{path.name}.old-{token}"
    doing = f"creating the temporary folder {tmp}"
    try:
        # mkdir and open apply the process umask (and default ACLs) themselves: folders
        # 0777 & ~umask, files 0666 & ~umask, with no umask read that could race other threads.
        os.mkdir(tmp, 0o777)
        _reached("created")
        doing = f"writing {tmp / BANK_FILE}"
        _write_file(tmp / BANK_FILE, functools.partial(_write_bank, tensors=tensors,
                                                       metadata={"format": FORMAT}))
        _reached("bank_written")
        doing = f"writing {tmp / CONFIG_FILE}"
        _write_file(tmp / CONFIG_FILE, lambda fh: fh.write(config_text))
        _reached("config_written")
        doing = f"syncing {tmp}"
        _fsync_dir(tmp, strict=True)
        _reached("synced")
        doing = f"moving {tmp} to {path}"
        if kind != "model":
            os.rename(tmp, path)  # a missing path, or an empty folder: replaced in one step
            _reached("installed")
            _fsync_dir(parent)
        elif _exchange(tmp, path):
            _reached("swapped")  # tmp now holds the old model
            _fsync_dir(parent)
            _discard(tmp, step="removing_old")
        else:
            os.rename(path, old)
            _reached("moved_aside")  # the one window with nothing at path; see _clean_leftovers
            os.rename(tmp, path)
            _reached("installed")
            _fsync_dir(parent)
            _discard(old, step="removing_old")
    except BaseException as exc:
        _roll_back(path, tmp, old)
        if isinstance(exc, OSError):
            raise ModelFileError(_os_error_message(exc, path, doing)) from None
        raise
    log.info("saved model to %s", path)
    return path


def _check_destination_name(path: Path) -> None:
    name = path.name
    if name in ("", ".", ".."):
        raise ModelFileError(f"cannot save a model to {str(path)!r}: give a folder name for "
                             "the model, e.g. models/carpet")
    if _LEFTOVER.match(name):
        raise ModelFileError(f"cannot save a model to {path}: names like {name!r} are reserved "
                             "for temporary folders of interrupted saves; choose another name")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise ModelFileError(f"cannot save a model to {path}: the name is longer than "
                             f"{MAX_NAME_BYTES} bytes; choose a shorter one")


def _make_parent(parent: Path, path: Path) -> None:
    existed = parent.is_dir()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"cannot save a model to {path}: cannot create {parent} "
                             f"({_reason(exc)}); choose a writable folder") from None
    if not existed:
        _fsync_dir(parent.parent)


def _destination_kind(path: Path) -> str:
    """'new', 'empty' or 'model'; ModelFileError for anything a save must not replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "new"
    except OSError as exc:
        raise ModelFileError(f"cannot save a model to {path}: {_reason(exc)}") from None
    refuse = f"refusing to replace {path} with a model"
    if stat.S_ISLNK(st.st_mode):
        raise ModelFileError(f"{refuse}: it is a symbolic link (to {os.readlink(path)}); save to "
                             "the folder it points to, or to a new path")
    if not stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{refuse}: it is a file, not a model folder; choose a new path "
                             "or remove the file")
    try:
        entries = sorted(os.listdir(path))
    except OSError as exc:
        raise ModelFileError(f"cannot save a model to {path}: {_reason(exc)}") from None
    if not entries:
        return "empty"
    extra = [e for e in entries if e not in MODEL_FILES]
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        what = "a model folder that also holds" if CONFIG_FILE in entries else "a folder holding"
        raise ModelFileError(f"{refuse}: it is {what} other files ({shown}); save to a new or "
                             f"empty folder, e.g. {path / 'model'}")
    if not (_only_regular_files(path, entries) and _has_marker(path / CONFIG_FILE)):
        raise ModelFileError(f"{refuse}: it is not a patchcore model folder ({CONFIG_FILE} "
                             "missing, damaged or not ours); remove it or choose a new path")
    return "model"


def _only_regular_files(folder: Path, names: list[str]) -> bool:
    try:
        return all(stat.S_ISREG(os.lstat(folder / n).st_mode) for n in names)
    except OSError:
        return False


def _write_file(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create `path` (it must not exist), fill it with `write`, and fsync it."""
    with open(path, "xb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64",
                       "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                       "bool": "BOOL"}


def _write_bank(fh: IO[bytes], tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Stream arrays in the safetensors layout (header length, JSON header, raw data).

    Written here rather than with safetensors.numpy.save_file, which creates its own hidden
    temporary file with mode 0600 next to the target and copies each array into memory.
    """
    arrays = []
    header: dict[str, Any] = {}
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype.name],
                        "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    fh.write(struct.pack("<Q", len(raw)) + raw)
    _reached("bank_partial")
    for array in arrays:
        if array.nbytes:
            fh.write(array.reshape(-1).view(np.uint8).data)


def _fsync_dir(path: Path, strict: bool = False) -> None:
    """fsync a folder (its entries); errors only matter when `strict` (our own temp folder).

    Windows cannot open folders; its renames are written through by NTFS itself.
    """
    strict = strict and os.name == "posix"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict and exc.errno not in (errno.EINVAL, errno.EBADF):  # not fsync-able: fine
            raise
    finally:
        os.close(fd)


# Replacing an existing model: Linux renameat2(RENAME_EXCHANGE) swaps the complete new folder
# and the old one in one atomic step, so the path never lacks a model, and the model stays a
# plain folder (cp -r, rsync, zip and older patchcore versions all work on it). A versioned
# folder behind a symlink would also switch atomically, but every copy tool and loader would
# have to follow the link and old versions pile up. Where the exchange is unsupported (other
# systems, some network filesystems) two renames are used: the old model is moved aside to
# ".NAME.old-PID-TOKEN" first; a crash between the renames is repaired by `_clean_leftovers`.
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


@functools.cache
def _renameat2() -> Callable[[bytes, bytes], int] | None:
    """libc renameat2 (glibc >= 2.28), else the raw system call; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    return lambda a, b: syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD),
                                ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b),
                                ctypes.c_uint(_RENAME_EXCHANGE))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the system cannot (caller falls back)."""
    fn = _renameat2()
    if fn is None:
        log.debug("atomic exchange unavailable on %s; using two renames", sys.platform)
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        log.debug("atomic exchange unsupported for %s (%s); using two renames", b,
                  os.strerror(err))
        return False
    raise OSError(err, os.strerror(err), str(b))


def _roll_back(path: Path, tmp: Path, old: Path) -> None:
    """After a failed or interrupted save: the old model back at `path`, temporaries gone."""
    if os.path.lexists(old):
        if os.path.lexists(path):
            _discard(old)  # the new model was already in place
        else:
            try:
                os.rename(old, path)
            except OSError as exc:
                log.error("could not move %s back to %s: %s", old, path, exc)
    _discard(tmp)


def _remove_model_folder(folder: Path, step: str | None = None) -> bool:
    """Delete a folder that holds only model files; False (nothing deleted) if it holds more.

    Deliberately not recursive: only config.json and the bank are unlinked, so a user's file
    can never be removed. config.json goes first, so a half-removed folder is no model.
    """
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return True
    if not set(entries) <= MODEL_FILES or not _only_regular_files(folder, entries):
        return False
    for name in sorted(entries):  # config.json sorts first
        os.unlink(folder / name)
        if step is not None:
            _reached(step)
    os.rmdir(folder)
    return True


def _discard(folder: Path, step: str | None = None) -> bool:
    """Best-effort `_remove_model_folder`: problems are logged, never raised."""
    try:
        removed = _remove_model_folder(folder, step)
    except OSError as exc:
        log.warning("could not remove the temporary folder %s: %s", folder, exc)
        return False
    if not removed:
        log.warning("left %s in place: it holds files that are not part of a model", folder)
    return removed


def _pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists here (its leftovers are stale)."""
    if pid <= 0 or pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) kills on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def _clean_leftovers(parent: Path, name: str | None = None) -> None:
    """Repair and remove what saves killed in `parent` left (only of model `name` if given).

    Only folders of dead processes are touched. If the two-rename fallback was killed between
    its renames (".NAME.old-X" and ".NAME.tmp-X" both there, NAME missing), the old model is
    renamed back into place. Everything else is removed if it holds only model files.
    """
    groups: dict[tuple[str, str, str], dict[str, Path]] = {}
    with os.scandir(parent) as entries:
        for entry in entries:
            match = _LEFTOVER.match(entry.name)
            if (match is None or (name is not None and match["name"] != name)
                    or not entry.is_dir(follow_symlinks=False)
                    or _pid_alive(int(match["pid"]))):
                continue
            key = (match["name"], match["pid"], match["token"])
            groups.setdefault(key, {})[match["kind"]] = Path(entry.path)
    for (model, _, _), found in sorted(groups.items()):
        dest = parent / model
        if "old" in found and "tmp" in found and not os.path.lexists(dest):
            os.rename(found.pop("old"), dest)
            log.warning("restored %s, which an interrupted save had moved aside", dest)
        for folder in found.values():
            if _discard(folder):
                log.info("removed %s, left by an interrupted save", folder)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower() if exc.errno else str(exc)


def _os_error_message(exc: OSError, path: Path, doing: str) -> str:
    hint = {errno.ENOSPC: "free some disk space and save again",
            errno.EDQUOT: "free some space within your disk quota and save again",
            errno.EACCES: f"check that {path.parent} is writable",
            errno.EPERM: f"check that {path.parent} is writable",
            errno.EROFS: "save to a writable filesystem"}.get(exc.errno or 0, "save again")
    return (f"could not save the model to {path}: {_reason(exc)} while {doing}; nothing at "
            f"{path} was changed; {hint}")


def is_model_folder(path: str | Path) -> bool:
    """True when `path` is a folder whose config.json carries the patchcore-model marker."""
    path = Path(path)
    return path.is_dir() and _has_marker(path / CONFIG_FILE)


def list_model_folders(parent: str | Path) -> list[Path]:
    """The model folders directly in `parent`, by name; hidden folders (including temporary
    folders of interrupted saves) are never listed. Empty when `parent` is not a folder."""
    try:
        with os.scandir(parent) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
    except OSError:
        return []
    return [Path(parent) / n for n in names if is_model_folder(Path(parent) / n)]


def _has_marker(cfg: Path) -> bool:
    try:
        document = _parse_config(cfg)
    except ModelFileError:
        return False
    return isinstance(document, dict) and document.get("format") == FORMAT


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text)} digits is out of range")
    return int(text)


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion; stops past the limit."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_CONFIG_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_config(cfg: Path) -> Any:
    """config.json parsed: a bounded read of a regular file; ModelFileError for anything odd."""
    try:
        fd = os.open(cfg, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # no hang on a FIFO
    except FileNotFoundError:
        raise ModelFileError(f"{cfg.parent} is not a patchcore model folder: {CONFIG_FILE} "
                             "is missing") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read {cfg}: {_reason(exc)}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{cfg} is not a regular file; not a patchcore model file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ModelFileError(f"{cfg} is implausibly large; not a patchcore model file")
        try:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ModelFileError(f"cannot read {cfg}: {_reason(exc)}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelFileError(f"{cfg} is implausibly large; not a patchcore model file")
    try:
        document = json.loads(raw.decode("utf-8"), parse_int=_bounded_int)
    except RecursionError:
        raise ModelFileError(f"{cfg} is nested implausibly deep; not a patchcore model file"
                             ) from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"{cfg} is corrupt or not JSON: {exc}") from None
    if _depth(document) > MAX_CONFIG_DEPTH:
        raise ModelFileError(f"{cfg} is nested implausibly deep; not a patchcore model file")
    return document


def _tidy(path: Path) -> None:
    """Before a load: repair an interrupted replacement of `path`, drop stale leftovers."""
    if path.name in ("", ".", ".."):
        return
    try:
        _clean_leftovers(path.parent, path.name)
    except OSError as exc:  # e.g. a read-only folder: loading must still work
        log.debug("could not tidy leftovers of %s: %s", path, exc)


def read_document(path: Path) -> dict[str, Any]:
    """The validated config.json of a model folder."""
    path = Path(path)
    _tidy(path)
    cfg = path / CONFIG_FILE
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise ModelFileError(f"model folder {path} {what} (expected a folder written by "
                             "`patchcore fit` or PatchCore.save)")
    document = _parse_config(cfg)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ModelFileError(f"{cfg} is not a patchcore model file (format field missing)")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ModelFileError(
            f"{cfg} has model format version {version!r:.40}; this patchcore {__version__} reads "
            f"version {FORMAT_VERSION}. Upgrade patchcore or refit the model."
        )
    for key in ("config", "members", "feature_grid", "calibration"):
        if key not in document:
            raise ModelFileError(f"{cfg} lacks the {key!r} entry; the file is damaged")
    return document


def _identity(path: Path) -> tuple[tuple[int, int, int, int] | None, ...]:
    out = []
    for name in (CONFIG_FILE, BANK_FILE):
        try:
            st = os.stat(path / name)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read_model_files(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json and the bank tensors, both from the same save.

    A save swaps in a whole new folder, so a load racing it could read config.json of one
    model and the bank of the next; the files' identities before and after tell, and the read
    is repeated.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    bank_file = path / BANK_FILE
    for _ in range(5):
        before = _identity(path)
        document = read_document(path)
        if not bank_file.is_file():
            raise ModelFileError(f"{bank_file} is missing; the model folder is incomplete")
        try:
            tensors = load_file(str(bank_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFileError(f"{bank_file} is corrupt or not a safetensors file: {exc}"
                                 ) from None
        if _identity(path) == before:
            return document, tensors
        log.debug("%s was replaced while it was read; reading it again", path)
    raise ModelFileError(f"{path} kept changing while it was read (another process saving to "
                         "it?); load it again when the save is done")


def _one_line(exc: Exception) -> str:
    """An error text quoting file content, with line breaks and control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))


def _check(ok: bool, cfg: Path, message: str) -> None:
    if not ok:
        raise ModelFileError(f"{cfg}: {message}; the file is damaged or not ours")


def load_state(path: Path) -> ModelState:
    """Read and validate a model folder: every tensor's name, dtype and shape, every value."""
    path = Path(path)
    document, tensors = _read_model_files(path)
    cfg = path / CONFIG_FILE
    bank_file = path / BANK_FILE
    try:
        config = PatchCoreConfig.from_dict(document["config"])
    except ConfigError as exc:
        raise ModelFileError(f"{cfg} has an invalid config: {_one_line(exc)}") from None
    grid = document["feature_grid"]
    _check(isinstance(grid, list) and len(grid) == 2 and all(
        isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 4096 for g in grid), cfg,
        f"feature_grid must be two integers in 1..4096, got {str(grid)[:80]}")
    train_paths = document.get("train_paths", [])
    _check(isinstance(train_paths, list) and all(isinstance(p, str) for p in train_paths), cfg,
           "train_paths must be a list of paths")
    train_root = document.get("train_root")
    _check(train_root is None or isinstance(train_root, str), cfg, "train_root must be a path")
    train_sizes = document.get("train_sizes", [])
    _check(isinstance(train_sizes, list) and len(train_sizes) in (0, len(train_paths)) and all(
        isinstance(s, list) and len(s) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10**6 for v in s)
        for s in train_sizes), cfg, "train_sizes must be one [width, height] per training image")
    fit_info = document.get("fit_info", {})
    _check(isinstance(fit_info, dict), cfg, "fit_info must be an object")
    # Provenance counts views (one per image, or several in aspect/tile preprocessing).
    n_views = len(train_paths)
    if train_sizes:
        from .engine.pipeline import preprocessor

        n_views = sum(preprocessor(config).num_views((s[0], s[1])) for s in train_sizes)
    entries = document["members"]
    _check(isinstance(entries, list) and 1 <= len(entries) <= 16, cfg,
           "members must be a list of 1 to 16 entries")
    try:
        calibration = Calibration.from_dict(document["calibration"])
    except ModelFileError as exc:
        raise ModelFileError(f"{cfg}: {_one_line(exc)}") from None
    expected = set()
    banks = []
    for i, entry in enumerate(entries):
        _check(isinstance(entry, dict) and isinstance(entry.get("backbone"), str)
               and isinstance(entry.get("layers"), list)
               and all(isinstance(x, str) for x in entry["layers"])
               and isinstance(entry.get("bank_shape"), list), cfg,
               f"member {i} needs backbone, layers and bank_shape")
        norm = entry.get("norm", [0.0, 1.0])
        _check(isinstance(norm, list) and len(norm) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            for v in norm) and norm[1] > 0, cfg, f"member {i} norm must be [mean, std > 0]")
        names = {k: f"member{i}.{k}" for k in ("bank", "image_index", "position")}
        expected.update(names.values())
        missing = [n for n in names.values() if n not in tensors]
        if missing:
            raise ModelFileError(f"{bank_file} lacks tensors {missing}; file does not match config")
        bank, image_index, position = (tensors[names[k]] for k in ("bank", "image_index",
                                                                     "position"))
        if list(bank.shape) != list(entry["bank_shape"]) or bank.ndim != 2:
            raise ModelFileError(
                f"{bank_file}: bank of member {i} has shape {list(bank.shape)}, config.json says "
                f"{entry['bank_shape']}; the files do not belong together"
            )
        if bank.dtype not in (np.float32, np.float16) or not np.isfinite(bank).all():
            raise ModelFileError(f"{bank_file}: bank of member {i} is not finite float data")
        if bank.shape[0] < 1:
            raise ModelFileError(f"{bank_file}: bank of member {i} is empty")
        if image_index.shape != (bank.shape[0],) or position.shape != (bank.shape[0], 2):
            raise ModelFileError(f"{bank_file}: provenance of member {i} does not match the bank")
        if image_index.dtype != np.int32 or position.dtype != np.int16:
            raise ModelFileError(f"{bank_file}: provenance of member {i} has the wrong dtype")
        if (image_index.min() < 0 or (n_views and image_index.max() >= n_views)
                or position.min() < 0 or (i == 0 and (position[:, 0].max() >= grid[0]
                                                      or position[:, 1].max() >= grid[1]))):
            raise ModelFileError(f"{bank_file}: provenance of member {i} points outside the "
                                 "training images or the feature grid")
        if config.aggregation == "reference" and bank.shape[1] != config.target_embed_dimension:
            raise ModelFileError(
                f"{bank_file}: bank rows have {bank.shape[1]} values, config says "
                f"target_embed_dimension={config.target_embed_dimension}"
            )
        if config.anomaly_scorer_num_nn > bank.shape[0]:
            raise ModelFileError(
                f"{cfg}: anomaly_scorer_num_nn={config.anomaly_scorer_num_nn} is larger than "
                f"the memory bank of member {i} ({bank.shape[0]} rows)")
        banks.append(MemoryBank(entry["backbone"], tuple(entry["layers"]), bank, image_index,
                                position, (float(norm[0]), float(norm[1]))))
    if len(banks) != len(config.backbones):
        raise ModelFileError(f"{cfg}: {len(banks)} members but {len(config.backbones)} backbones")
    extra = set(tensors) - expected
    if extra:
        raise ModelFileError(f"{bank_file} holds unexpected tensors {sorted(extra)}")
    return ModelState(config, banks, (grid[0], grid[1]), calibration, list(train_paths),
                      train_root, fit_info, [(s[0], s[1]) for s in train_sizes])
