"""Resumable HTTP downloads (Range requests) and SHA-256 checks, with the standard library only.

A transfer writes to `NAME.part` beside the destination; an interrupted transfer (dropped
connection, timeout, Ctrl-C) keeps what arrived, and the next attempt asks the server for the
rest with `Range: bytes=N-`. Only a complete file whose SHA-256 matches is renamed to `NAME`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .. import __version__
from ..errors import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Network failures worth another (resuming) attempt; disk errors are not among them.
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DownloadError(DataError):
    """A dataset archive could not be fetched, verified or unpacked."""


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, leave=False,
                                      desc=f"checking {path.name}", disable=not progress) as bar:
        while block := fh.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_url(url: str) -> str:
    """`url` if it is http(s); DownloadError otherwise (no file:, ftp: or other schemes)."""
    if not re.match(r"^https?://[^/\s]+", url):
        raise DownloadError(f"download URL {url!r} is not an http:// or https:// address")
    return url


def _total_size(response: http.client.HTTPResponse, start: int) -> int | None:
    """The full file size the server announces (Content-Range, else Content-Length + start)."""
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match and match.group(3) != "*":
        return int(match.group(3))
    length = response.headers.get("Content-Length")
    return int(length) + start if length and length.isdigit() else None


def _transfer(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One request for the rest of `part`; raises on a short or failed transfer."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"patchcore/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (checked)
        if have and response.status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                answered = response.headers.get("Content-Range")
                raise http.client.HTTPException(f"the server answered the range {answered}")
            log.info("resuming %s at byte %d", part.name, have)
        elif have:
            log.info("%s does not resume downloads; starting %s again", url, part.name)
            have = 0
        total = _total_size(response, have)
        with open(part, "ab" if have else "wb") as fh, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5],
                disable=not progress) as bar:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def fetch(url: str, dest: Path, sha256: str | None, *, manual_hint: str, progress: bool = True,
          retries: int = 3, retry_wait: float = 2.0, timeout: float = 60.0) -> str:
    """Download `url` to `dest` (resuming `dest.part`), check its SHA-256, return the digest.

    `sha256` None means no published checksum: the digest is returned (and logged) unchecked.
    Network failures are retried `retries` times, each resuming where the last stopped; when
    they persist the error names the URL, the file to save it as (`manual_hint`) and keeps the
    partial file. A checksum mismatch removes the downloaded file.
    """
    check_url(url)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            _transfer(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and part.exists():  # nothing left to send: verify what we have
                break
            raise DownloadError(f"{url} answered HTTP {exc.code} {exc.reason}; {manual_hint}"
                                ) from None
        except _TRANSIENT as exc:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            if attempt > retries:
                kept = (f"; the {have} bytes received so far are kept in {part} and the same "
                        "command resumes from there") if have else ""
                raise DownloadError(f"cannot download {url} ({reason}){kept}; {manual_hint}"
                                    ) from None
            wait = retry_wait * attempt
            log.warning("download of %s interrupted (%s) after %d bytes; retrying in %.0fs",
                        url, reason, have, wait)
            time.sleep(wait)
    digest = sha256_file(part, progress)
    if sha256 is not None and digest != sha256.lower():
        part.unlink()
        raise DownloadError(f"{url} arrived corrupted: SHA-256 {digest}, expected {sha256}; the "
                            f"file was removed, run the command again to download it anew")
    os.replace(part, dest)
    return digest
