"""download(): local/file:// copies and HTTP on 127.0.0.1 with dropped connections and resume."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from remeanflow.data.download import ChecksumError, DownloadError, SourceNotFoundError, download

PAYLOAD = np.random.default_rng(0).bytes(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def _leftovers(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(dest.name))


# ----------------------------------------------------------------------------------------------
# Local sources.


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src" / "archive.tar"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-url"])
def test_local_copy_verifies_and_writes_sidecar(src, tmp_path, as_uri):
    dest = tmp_path / "raw" / "archive.tar"
    source = src.as_uri() if as_uri else str(src)
    assert download(source, dest, sha256=DIGEST.upper(), progress=False, chunk=4096) == DIGEST
    assert dest.read_bytes() == PAYLOAD
    assert (tmp_path / "raw" / "archive.tar.sha256").read_text() == f"{DIGEST}  archive.tar\n"
    assert _leftovers(dest) == ["archive.tar", "archive.tar.sha256"]


def test_checksum_mismatch_leaves_nothing(src, tmp_path):
    dest = tmp_path / "archive.tar"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download(src, dest, sha256=wrong, progress=False)
    assert wrong in str(err.value) and DIGEST in str(err.value) and "archive.tar" in str(err.value)
    assert _leftovers(dest) == []


def test_missing_local_source(tmp_path):
    dest = tmp_path / "archive.tar"
    with pytest.raises(SourceNotFoundError, match="nope.tar"):
        download(tmp_path / "nope.tar", dest, progress=False)
    assert _leftovers(dest) == []


@pytest.mark.parametrize("bad", ["abc", "g" * 64])
def test_malformed_digest_is_rejected_before_any_work(src, tmp_path, bad):
    with pytest.raises(ValueError, match="64 hex"):
        download(src, tmp_path / "x", sha256=bad, progress=False)
    assert list(tmp_path.glob("x*")) == []


def test_unsupported_scheme(tmp_path):
    with pytest.raises(ValueError, match="ftp"):
        download("ftp://example.org/a.tar", tmp_path / "a.tar", progress=False)


# ----------------------------------------------------------------------------------------------
# HTTP.


class _Handler(BaseHTTPRequestHandler):
    """Serves PAYLOAD at /data.bin; the server object says how to misbehave."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if self.path != "/data.bin":
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if rng and srv.honour_range and start >= len(PAYLOAD):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng and srv.honour_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            start = 0
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops_left > 0:
            srv.drops_left -= 1
            # Promise the whole body, send half, hang up: a dropped connection mid-file.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.honour_range, srv.drops_left = [], True, 0
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(server, dest, **kw):
    kw = dict(progress=False, backoff=0, chunk=16_384, timeout=10) | kw
    return download(f"{server.url}/data.bin", dest, **kw)


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    server.drops_left = 1
    dest = tmp_path / "data.bin"
    assert _get(server, dest, sha256=DIGEST) == DIGEST
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[0] is None
    assert server.requests[1] == f"bytes={len(PAYLOAD) // 2}-", "the resume must ask for the rest"
    assert _leftovers(dest) == ["data.bin", "data.bin.sha256"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.honour_range, server.drops_left = False, 1
    dest = tmp_path / "data.bin"
    assert _get(server, dest, sha256=DIGEST) == DIGEST
    assert dest.read_bytes() == PAYLOAD  # not the first half followed by the whole file
    assert server.requests[1] is not None and len(server.requests) == 2


def test_part_left_by_an_earlier_run_is_resumed(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    assert _get(server, dest) == DIGEST
    assert server.requests == ["bytes=1000-"]


def test_complete_part_needs_no_more_bytes(server, tmp_path):
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    assert _get(server, dest, sha256=DIGEST) == DIGEST  # the server answers 416
    assert server.requests == [f"bytes={len(PAYLOAD)}-"]


def test_giving_up_keeps_the_part_for_a_later_resume(server, tmp_path):
    server.drops_left = 10  # every attempt is cut; each still moves forward
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="truncated"):
        _get(server, dest, retries=0)
    assert not dest.exists()
    assert (tmp_path / "data.bin.part").read_bytes() == PAYLOAD[: len(PAYLOAD) // 2]
    server.drops_left = 0
    assert _get(server, dest, sha256=DIGEST) == DIGEST
    assert server.requests[-1] == f"bytes={len(PAYLOAD) // 2}-"


def test_http_checksum_mismatch_removes_part(server, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError):
        _get(server, dest, sha256="f" * 64)
    assert _leftovers(dest) == []


def test_404_is_a_clear_error(server, tmp_path):
    dest = tmp_path / "missing.bin"
    with pytest.raises(SourceNotFoundError, match="404"):
        download(f"{server.url}/missing.bin", dest, progress=False, backoff=0)
    assert len(server.requests) == 1, "a 404 is not retried"
    assert _leftovers(dest) == []


def test_unreachable_server_is_retried_then_reported(tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]
    srv.server_close()  # nothing listens on this port now
    with pytest.raises(DownloadError, match="giving up after 2 retries"):
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", progress=False, retries=2, backoff=0)
