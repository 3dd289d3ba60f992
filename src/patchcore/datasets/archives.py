"""Safe extraction of dataset tar archives (plain, gzip, bzip2 or xz).

Every member is checked before anything of it is written: only regular files and folders
(no links, devices or FIFOs), relative names without `..`, and limits on the number of members
and on the bytes unpacked, so a hostile or damaged archive cannot write outside the target
folder or fill the disk. Python's tarfile "data" filter is applied on top where available.
"""

from __future__ import annotations

import lzma
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .fetch import DownloadError

MAX_MEMBERS = 200_000  # MVTec AD has ~11,000 files, VisA ~12,000
MAX_BYTES = 64 * 2**30  # unpacked; MVTec AD is ~5 GB, VisA ~2 GB


def member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    """The path components of a member; DownloadError for names that could escape the target."""
    name = member.name
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts or "\\" in name or "\x00" in name or not parts:
        raise DownloadError(f"{archive} holds an unsafe member name {name!r}; refusing to unpack "
                            "it (the archive is damaged or not the published one)")
    return parts


def safe_extract(archive: Path, dest: Path, wanted: Callable[[tuple[str, ...]], bool] | None = None,
                 *, max_members: int = MAX_MEMBERS, max_bytes: int = MAX_BYTES,
                 progress: bool = True) -> int:
    """Unpack the members of `archive` for which `wanted(parts)` is true into `dest`.

    Returns the number of files written. Links, special files, unsafe names and archives past
    the limits raise DownloadError; the archive is read once, front to back.
    """
    files = total = 0
    data_filter = getattr(tarfile, "data_filter", None)
    try:
        with tarfile.open(archive, "r:*") as tar, tqdm(desc=f"unpacking {archive.name}",
                                                      unit=" files", disable=not progress) as bar:
            for member in tar:
                parts = member_parts(member, archive)
                if not (member.isfile() or member.isdir()):
                    raise DownloadError(f"{archive} holds {member.name!r}, which is a link or "
                                        "special file; refusing to unpack it")
                if wanted is not None and not wanted(parts):
                    continue
                files += member.isfile()
                total += member.size
                if files > max_members or total > max_bytes:
                    raise DownloadError(f"{archive} unpacks to more than {max_members} files or "
                                        f"{max_bytes / 2**30:.0f} GiB; refusing to unpack it")
                if data_filter is not None:
                    tar.extract(member, dest, filter="data")
                else:  # Python < 3.10.12: the checks above are the filter
                    tar.extract(member, dest)
                bar.update(member.isfile())
    except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError) as exc:
        raise DownloadError(f"{archive} is not a readable tar archive ({exc}); remove it and "
                            "download it again") from None
    return files
