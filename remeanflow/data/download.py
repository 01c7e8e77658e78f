"""Fetch a dataset archive from an http(s) URL, a ``file://`` URL or a local path.

Guarantees, whatever the source:

* bytes go to ``<dest>.part``; ``dest`` appears only by an atomic rename after the transfer is
  complete and (when a digest is given) verified, so a crash never leaves a ``dest`` that looks
  finished;
* ``<dest>.sha256`` (``sha256sum`` format) is written before that rename;
* a checksum mismatch raises ``ChecksumError`` and deletes ``.part``.

HTTP specifics: an existing ``.part`` is resumed with a ``Range`` request (the running digest is
kept across resumes, so the part is read back only once per call); a server that ignores
``Range`` (200 instead of 206) makes the transfer restart from byte 0; a body shorter than its
``Content-Length`` counts as an interrupted transfer and is resumed; connection errors, timeouts
and 5xx/408/429 answers are retried with exponential backoff. ``retries`` bounds consecutive
attempts that make no progress, so a long download survives any number of dropped connections
as long as each one moves forward. When the retries run out the ``.part`` is kept so that the
next call resumes it. Without a ``Content-Length`` (chunked or close-delimited bodies) truncation
can only be caught by ``sha256``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from remeanflow import fileio

__all__ = ["DownloadError", "SourceNotFoundError", "ChecksumError", "download"]

_USER_AGENT = "remeanflow-download/0.1"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
_NOT_FOUND_STATUS = {404, 410}


class DownloadError(Exception):
    """The source could not be fetched completely."""


class SourceNotFoundError(DownloadError):
    """The source does not exist (HTTP 404/410, or a missing local file)."""


class ChecksumError(DownloadError):
    """The fetched bytes do not have the expected sha256."""

    def __init__(self, path, expected: str, actual: str):
        super().__init__(f"{path}: sha256 mismatch: expected {expected}, got {actual}")
        self.path, self.expected, self.actual = str(path), expected, actual


class _Interrupted(Exception):
    """A transfer attempt that may succeed if retried (``progressed``: it wrote some bytes)."""

    def __init__(self, message: str, progressed: bool):
        super().__init__(message)
        self.progressed = progressed


class _RangeNotSatisfiable(Exception):
    """HTTP 416 to a Range request; ``total`` is the file size the server reports (or None)."""

    def __init__(self, total: int | None):
        super().__init__(f"range not satisfiable (size {total})")
        self.total = total


# ----------------------------------------------------------------------------------------------
# The .part file with a running digest.


class _PartFile:
    """Append-only ``.part`` file whose sha256 is updated as bytes are written.

    Opening an existing part hashes what is already there, once, so that resumes continue the
    same digest instead of re-reading the whole file at the end.
    """

    def __init__(self, path: Path, *, resume: bool, chunk: int):
        self.path = path
        self.hasher = hashlib.sha256()
        self.size = 0
        if resume and path.exists():
            with open(path, "rb") as f:
                while block := f.read(chunk):
                    self.hasher.update(block)
                    self.size += len(block)
            self.f = open(path, "ab")
        else:
            self.f = open(path, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        """Drop everything written so far (the server will send the file from the start)."""
        self.f.seek(0)
        self.f.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


# ----------------------------------------------------------------------------------------------
# Sources.


def _classify(source) -> tuple[str, str]:
    """('http', url) or ('local', path) for a URL, a ``file://`` URL or a path."""
    text = os.fspath(source)
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme in ("http", "https"):
        return "http", text
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URL with a remote host is not supported: {text}")
        return "local", urllib.request.url2pathname(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise ValueError(f"unsupported source scheme {parsed.scheme!r} in {text!r}")
    return "local", text


def _copy_local(src: Path, part: _PartFile, *, progress: bool, chunk: int) -> None:
    """Stream a local file into the part, hashing as we go (shutil.copy would need a re-read)."""
    if not src.is_file():
        raise SourceNotFoundError(f"source file not found: {src}")
    total = src.stat().st_size
    with open(src, "rb") as f, _bar(src.name, total, 0, progress) as bar:
        while block := f.read(chunk):
            part.write(block)
            bar.update(len(block))
    if part.size != total:  # the file changed while we copied it
        raise DownloadError(f"{src}: copied {part.size} bytes, expected {total}")


def _bar(name: str, total: int | None, initial: int, progress: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
    )


# ----------------------------------------------------------------------------------------------
# HTTP.


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes a-b/N`` or ``bytes */N``; None where unknown."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open_url(url: str, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``; map HTTP/network failures to our error classes.

    A 416 answer to a Range request raises ``_RangeNotSatisfiable`` with the size the server
    reports: the caller decides whether the part is already complete or must start over.
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _RangeNotSatisfiable(_content_range(e.headers.get("Content-Range"))[1]) from None
        if e.code in _NOT_FOUND_STATUS:
            raise SourceNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from None
        if e.code in _RETRY_STATUS:
            raise _Interrupted(f"{url}: HTTP {e.code} {e.reason}", False) from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Interrupted(f"{url}: {e}", False) from e


def _http_attempt(url: str, part: _PartFile, *, timeout: float, chunk: int, bar: tqdm) -> None:
    """One request: append the rest of the file to ``part`` or raise ``_Interrupted``."""
    try:
        resp = _open_url(url, part.size, timeout)
    except _RangeNotSatisfiable as e:
        if e.total == part.size:
            return  # an earlier call fetched every byte but stopped before the rename
        message = f"{url}: range from byte {part.size} not satisfiable (size {e.total})"
        part.restart()  # the part is longer than the file: not a prefix of it
        raise _Interrupted(message, False) from None
    with resp:
        remaining = resp.headers.get("Content-Length")
        remaining = int(remaining) if remaining is not None else None
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != part.size:
                message = f"{url}: asked for bytes from {part.size}, server sent from {start}"
                part.restart()
                raise _Interrupted(message, False)
        else:
            if part.size:  # 200 to a Range request: the body is the whole file again
                part.restart()
            total = remaining
        bar.reset(total=total)
        bar.update(part.size)
        received = 0
        try:
            while block := resp.read(chunk):
                part.write(block)
                received += len(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise _Interrupted(
                f"{url}: connection lost after {part.size} bytes: {e}", received > 0
            ) from e
        if remaining is not None and received != remaining:
            raise _Interrupted(
                f"{url}: truncated transfer: got {received} of {remaining} bytes", received > 0
            )


def _fetch_http(url, part: _PartFile, *, progress, timeout, retries, chunk, backoff) -> None:
    """Retry ``_http_attempt`` until complete; ``retries`` counts attempts without progress."""
    failures = 0
    with _bar(Path(urllib.parse.urlparse(url).path).name or url, None, part.size, progress) as bar:
        while True:
            try:
                _http_attempt(url, part, timeout=timeout, chunk=chunk, bar=bar)
                return
            except _Interrupted as e:
                failures = 1 if e.progressed else failures + 1
                if failures > retries:
                    raise DownloadError(f"{e} (giving up after {retries} retries)") from e
                time.sleep(backoff * 2 ** (failures - 1))


# ----------------------------------------------------------------------------------------------
# Public entry point.


def _expected_digest(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return digest


def _finish(part_path: Path, dest: Path, digest: str, expected: str | None) -> None:
    """Verify, write the sidecar, then publish ``dest`` by rename (in that order)."""
    if expected is not None and digest != expected:
        part_path.unlink()
        raise ChecksumError(dest, expected, digest)
    with fileio.atomic_path(dest.with_name(dest.name + ".sha256")) as tmp:
        tmp.write_text(f"{digest}  {dest.name}\n")
    os.replace(part_path, dest)


def download(
    source,
    dest,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
    chunk: int = 1 << 20,
    backoff: float = 1.0,
) -> str:
    """Fetch ``source`` (http(s) URL, ``file://`` URL or local path) to ``dest``; return its sha256.

    ``sha256`` (hex, optional ``sha256:`` prefix) is checked before ``dest`` appears. ``timeout``
    is per network operation; ``retries`` is how many times a failed HTTP attempt is retried
    (an attempt that received bytes resets the count); ``backoff`` is the first wait in seconds,
    doubling after each further failure.
    """
    expected = _expected_digest(sha256)
    kind, location = _classify(source)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part_path = dest.with_name(dest.name + ".part")
    part = _PartFile(part_path, resume=(kind == "http"), chunk=chunk)
    try:
        if kind == "http":
            _fetch_http(
                location,
                part,
                progress=progress,
                timeout=timeout,
                retries=retries,
                chunk=chunk,
                backoff=backoff,
            )
        else:
            _copy_local(Path(location), part, progress=progress, chunk=chunk)
    except SourceNotFoundError:
        part.close()
        part_path.unlink()  # nothing was fetched; an empty part would only mislead a resume
        raise
    except BaseException:
        part.close()  # keep a partial HTTP part for the next call to resume
        if kind != "http":
            part_path.unlink()
        raise
    part.close()
    _finish(part_path, dest, part.hexdigest(), expected)
    return part.hexdigest()
