"""Fetch a file from an http(s) URL, a ``file://`` URL or a local path.

Guarantees, whatever the source:

* bytes go to ``<dest>.part``; ``dest`` appears only by an atomic rename after the transfer is
  complete and (when a digest is given) verified, so a crash never leaves a ``dest`` that looks
  finished;
* ``<dest>.sha256`` (``sha256sum`` format, with the file's identity on a comment line, so that a
  reader trusts it only for these bytes: ``fileio.read_side_digest``) is written before that rename;
* a checksum mismatch raises ``ChecksumError`` and deletes ``.part``.

HTTP specifics:

* **Resume.** An existing ``.part`` is resumed with a ``Range`` request (the running digest is
  kept across resumes, so the part is read back only once per call). A body shorter than its
  ``Content-Length`` is an interrupted transfer and is resumed by the next attempt. Without a
  ``Content-Length`` (chunked or close-delimited bodies) truncation can only be caught by
  ``sha256``.
* **A server that ignores Range** (200 with the whole file instead of 206) is detected: the part
  restarts from byte 0, and the attempt counts like any other (it is not progress).
* **Bounded attempts.** Every failed attempt counts against ``attempts`` (total requests,
  the first included): a dropped connection, a timeout, a 5xx/408/429 answer, a restart because
  of an ignored or wrong Range. Each retry is logged (``logging.warning``: attempt number,
  reason, wait); the waits are ``retry_wait_s``, doubling, at most 60 s.
* **Bounded time.** ``max_seconds`` bounds the whole call, all attempts and waits together,
  whatever the server does: when it passes, the open connection is shut down (a stalled or
  trickling server cannot hold the call), and no attempt starts whose wait would end past it.
  ``timeout`` bounds each single network operation (connect, one read). Only name resolution
  (DNS) is outside these bounds.
* **Giving up** raises ``DownloadError`` naming the URL, the attempts, the time and the last
  reason. A ``.part`` with bytes from a server that honours Range is kept, so that the next call
  resumes it; a ``.part`` that cannot be resumed (the server ignores Range) or that is empty is
  removed. 404/410 raise ``SourceNotFoundError`` and other 4xx answers ``DownloadError`` at once,
  without retries.

``attempts`` and ``max_seconds`` apply to HTTP; local and ``file://`` copies are a single read.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from tqdm import tqdm

from remeanflow import fileio

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_MAX_SECONDS",
    "DEFAULT_RETRY_WAIT_S",
    "DownloadError",
    "SourceNotFoundError",
    "ChecksumError",
    "download",
]

log = logging.getLogger(__name__)

_USER_AGENT = "remeanflow-download/0.1"
_MAX_WAIT_S = 60.0

# Defaults of download(); the workflow passes the config's `download.*` values
# (settings.DownloadSettings), whose defaults are the same.
DEFAULT_ATTEMPTS = 5
DEFAULT_MAX_SECONDS = 86400.0
DEFAULT_RETRY_WAIT_S = 5.0
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
    """A transfer attempt that failed but may succeed if retried; the message is the reason."""


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
        try:
            self.f.write(data)
        except OSError as e:  # e.g. no space left: name the file and the free space
            raise fileio.output_write_error(self.path, e) from e
        self.hasher.update(data)
        self.size += len(data)

    def restart(self) -> None:
        """Drop everything written so far (the server will send the file from the start)."""
        self.f.seek(0)
        self.f.truncate()
        self.hasher = hashlib.sha256()
        self.size = 0

    def close(self) -> None:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise fileio.output_write_error(self.path, e) from e
        finally:
            self.f.close()

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


# ----------------------------------------------------------------------------------------------
# Sources.


def classify_source(source) -> tuple[str, str]:
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


class _Deadline:
    """The ``max_seconds`` bound of one download: when it passes, every connection that is open
    is shut down, which ends any blocked connect/read (a stalled or trickling server)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.end = self.start + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shutdown(sock)

    def forget(self) -> None:
        with self._lock:
            self._sockets.clear()

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSL socket: it ends the TCP connection (a blocked
    # read in the other thread returns), where SSLSocket.shutdown would unwrap the SSL object
    # under that read.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _WatchedHandler:
    """urllib handler mixin whose connections register their socket with the deadline."""

    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        deadline = self.deadline

        class Connection(http_class):
            def connect(self):
                super().connect()
                deadline.watch(self.sock)

        return super().do_open(Connection, req, **kwargs)


class _HTTPHandler(_WatchedHandler, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_WatchedHandler, urllib.request.HTTPSHandler):
    pass


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes a-b/N`` or ``bytes */N``; None where unknown."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _open_url(opener, url: str, offset: int, timeout: float):
    """Open ``url`` from byte ``offset``; map HTTP/network failures to our error classes.

    A 416 answer to a Range request raises ``_RangeNotSatisfiable`` with the size the server
    reports: the caller decides whether the part is already complete or must start over.
    """
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise _RangeNotSatisfiable(_content_range(e.headers.get("Content-Range"))[1]) from None
        if e.code in _NOT_FOUND_STATUS:
            raise SourceNotFoundError(f"{url}: HTTP {e.code} {e.reason}") from None
        if e.code in _RETRY_STATUS:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise _Interrupted(f"request failed: {type(reason).__name__}: {reason}") from e


class _Transfer:
    """What the attempts of one HTTP download share."""

    def __init__(self, url: str, part: _PartFile, deadline: _Deadline, timeout: float, chunk: int):
        self.url, self.part, self.deadline = url, part, deadline
        self.timeout, self.chunk = timeout, chunk
        self.opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
        self.ignores_range = False  # seen a 200 answer to a Range request

    def attempt(self, bar: tqdm) -> None:
        """One request: append the rest of the file to the part, or raise ``_Interrupted``."""
        part = self.part
        offset = part.size
        # capped at the time left: the deadline can shut a socket down only once it is connected
        timeout = max(min(self.timeout, self.deadline.remaining()), 0.001)
        try:
            resp = _open_url(self.opener, self.url, offset, timeout)
        except _RangeNotSatisfiable as e:
            if e.total == offset:
                return  # an earlier call fetched every byte but stopped before the rename
            part.restart()  # the part is longer than the file: not a prefix of it
            raise _Interrupted(
                f"range from byte {offset} not satisfiable (file size {e.total}); restarting from 0"
            ) from None
        with resp:
            self._receive(resp, offset, bar)

    def _receive(self, resp, offset: int, bar: tqdm) -> None:
        part = self.part
        remaining = resp.headers.get("Content-Length")
        remaining = int(remaining) if remaining is not None else None
        restarted = ""
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.restart()
                raise _Interrupted(
                    f"asked for bytes from {offset}, the server sent from {start}; restarting from 0"
                )
        else:
            total = remaining
            if offset:  # 200 to a Range request: the body is the whole file again
                self.ignores_range = True
                restarted = f" (the server ignored Range from byte {offset} and resent the file from byte 0)"
                part.restart()
        bar.reset(total=total)
        bar.update(part.size)
        received = 0
        while True:
            try:
                block = resp.read(self.chunk)
            except (OSError, http.client.HTTPException) as e:
                raise _Interrupted(
                    f"connection lost after {received} bytes of this answer{restarted}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            if not block:
                break
            part.write(block)  # a disk error here is not a network failure: it is raised as is
            received += len(block)
            bar.update(len(block))
        if remaining is not None and received != remaining:
            raise _Interrupted(
                f"connection dropped: got {received} of {remaining} bytes{restarted}"
            )


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


def _fetch_http(
    url, part: _PartFile, *, progress, timeout, attempts, max_seconds, retry_wait_s, chunk
) -> None:
    """Run attempts until the file is complete, ``attempts`` have failed or ``max_seconds``
    have passed (then ``DownloadError``)."""
    deadline = _Deadline(max_seconds)
    transfer = _Transfer(url, part, deadline, timeout, chunk)
    name = Path(urllib.parse.urlparse(url).path).name or url
    try:
        with _bar(name, None, part.size, progress) as bar:
            for attempt in range(1, attempts + 1):
                try:
                    transfer.attempt(bar)
                    return
                except _Interrupted as e:
                    reason = str(e)
                finally:
                    deadline.forget()
                _give_up_or_wait(transfer, attempt, attempts, reason, retry_wait_s)
    finally:
        deadline.cancel()


def _give_up_or_wait(transfer: _Transfer, attempt: int, attempts: int, reason: str, retry_wait_s: float) -> None:
    """After failed attempt number ``attempt``: raise DownloadError, or log and wait."""
    deadline, url = transfer.deadline, transfer.url
    wait = min(retry_wait_s * 2 ** min(attempt - 1, 32), _MAX_WAIT_S)  # 2**n of a huge n overflows a float
    if deadline.passed():
        why = f"max_seconds={deadline.seconds:g} passed during attempt {attempt} of {attempts}"
    elif attempt >= attempts:
        why = f"all {attempts} attempts failed"
    elif deadline.remaining() <= wait:
        why = (f"attempt {attempt} of {attempts} failed and the next one would start after "
               f"max_seconds={deadline.seconds:g}")
    else:
        log.warning("%s: attempt %d of %d failed: %s; retrying in %.3g s", url, attempt, attempts, reason, wait)
        _sleep(wait)
        return
    note = ""
    if transfer.ignores_range:
        note = ("; the server ignores Range requests (it answers 200 with the whole file), so every "
                "attempt restarted from byte 0 and the partial file cannot be resumed")
        transfer.part.restart()
    raise DownloadError(f"{url}: download failed after {attempt} attempt(s) in {deadline.elapsed():.1f} s "
                        f"({why}); last error: {reason}{note}")


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
    # the part file's identity is dest's after the rename (same inode, size and mtime)
    fileio.write_side_digest(dest, digest, identity=fileio.file_identity(part_path))
    os.replace(part_path, dest)


def _bounds(attempts, max_seconds, retry_wait_s, retries, backoff) -> tuple[int, float, float]:
    """Check the bounds and map the deprecated ``retries``/``backoff`` onto them."""
    if retries is not None:
        warnings.warn("download(retries=N) is deprecated: use attempts=N + 1 (all attempts, the "
                      "first included)", DeprecationWarning, stacklevel=3)
        attempts = retries + 1
    if backoff is not None:
        warnings.warn("download(backoff=...) is deprecated: use retry_wait_s=...",
                      DeprecationWarning, stacklevel=3)
        retry_wait_s = backoff
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an integer >= 1, got {attempts!r}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    if not retry_wait_s >= 0:
        raise ValueError(f"retry_wait_s must be >= 0, got {retry_wait_s!r}")
    return attempts, float(max_seconds), float(retry_wait_s)


def download(
    source,
    dest,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    attempts: int = DEFAULT_ATTEMPTS,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    retry_wait_s: float = DEFAULT_RETRY_WAIT_S,
    chunk: int = 1 << 20,
    retries: int | None = None,
    backoff: float | None = None,
) -> str:
    """Fetch ``source`` (http(s) URL, ``file://`` URL or local path) to ``dest``; return its sha256.

    ``sha256`` (hex, optional ``sha256:`` prefix) is checked before ``dest`` appears. HTTP:
    ``attempts`` is the number of requests in all (the first included), each failure counting
    one; ``max_seconds`` bounds the whole call; ``retry_wait_s`` is the first wait between
    attempts, doubling, at most 60 s; ``timeout`` is per network operation. See the module
    docstring for what is kept on failure. ``retries`` (= ``attempts - 1``) and ``backoff``
    (= ``retry_wait_s``) are deprecated aliases.
    """
    attempts, max_seconds, retry_wait_s = _bounds(attempts, max_seconds, retry_wait_s, retries, backoff)
    expected = _expected_digest(sha256)
    kind, location = classify_source(source)
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
                attempts=attempts,
                max_seconds=max_seconds,
                retry_wait_s=retry_wait_s,
                chunk=chunk,
            )
        else:
            _copy_local(Path(location), part, progress=progress, chunk=chunk)
    except SourceNotFoundError:
        part.close()
        part_path.unlink()  # the source is gone: nothing to resume
        raise
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised matters more
            part.close()
        # keep a partial HTTP part for the next call to resume; an empty one would only mislead
        if kind != "http" or part.size == 0:
            part_path.unlink(missing_ok=True)
        raise
    part.close()
    _finish(part_path, dest, part.hexdigest(), expected)
    return part.hexdigest()
