"""Cached digests (`.sha256` side files, sidecar `output.sha256`) are used only for the bytes they
were taken of: identity (size, mtime_ns, inode) recorded with the digest must still hold."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from remeanflow import provenance
from remeanflow.fileio import (cached_sha256, file_identity, read_side_digest, sha256_file, side_digest_path,
                               write_side_digest)


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"teacher bytes " * 100)
    # written "a while ago": an edit in the same filesystem clock tick would keep mtime_ns
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    return path


def test_side_file_is_trusted_while_the_file_is_unchanged(blob, monkeypatch):
    digest = write_side_digest(blob)
    assert digest == sha256_file(blob) == read_side_digest(blob)
    calls = []
    monkeypatch.setattr("remeanflow.fileio.sha256_file", lambda p: calls.append(p) or "rehashed")
    assert cached_sha256(blob) == digest and calls == []  # the cache saves the hash


def test_side_file_is_sha256sum_compatible(blob):
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum is not installed")
    write_side_digest(blob)
    proc = subprocess.run(["sha256sum", "--strict", "-c", side_digest_path(blob).name], cwd=blob.parent,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "net.pt: OK" in proc.stdout, proc.stdout + proc.stderr


def test_replaced_file_keeping_the_side_file_is_hashed_again(blob, tmp_path):
    write_side_digest(blob)
    other = tmp_path / "other.pt"
    other.write_bytes(b"another net " * 100)
    os.replace(other, blob)  # new inode, same name: what `cp`/`mv` over the file does
    assert read_side_digest(blob) is None
    assert cached_sha256(blob) == sha256_file(blob) != side_digest_path(blob).read_text().split()[0]


def test_in_place_edit_changes_the_mtime_and_invalidates_the_cache(blob):
    write_side_digest(blob)
    st = blob.stat()
    with open(blob, "r+b") as f:  # same size, same inode: only mtime tells
        f.write(b"X")
    assert read_side_digest(blob) is None
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    # identity is a cache key, not a digest: an editor that restores mtime on purpose is what
    # `provenance --verify` (which always re-hashes) is for
    assert read_side_digest(blob) is not None


def test_side_file_without_identity_is_not_trusted(blob):
    side_digest_path(blob).write_text(f"{'0' * 64}  {blob.name}\n")  # format before identities
    assert read_side_digest(blob) is None
    assert cached_sha256(blob) == sha256_file(blob)


def test_directory_identity_follows_every_content_file(tmp_path):
    store = tmp_path / "store.zarr"
    (store / "c").mkdir(parents=True)
    (store / "c" / "0").write_bytes(b"chunk")
    before = file_identity(store)
    (store / ".snakemake_timestamp").write_text("")  # not content
    assert file_identity(store) == before
    (store / "c" / "0").write_bytes(b"chunK")
    assert file_identity(store) != before


def test_describe_input_uses_the_sidecar_only_while_the_input_is_unchanged(blob, tmp_path):
    provenance.write(blob, rule="made", config={})
    entry = provenance.describe_input(blob)
    assert entry["hash_source"] == "sidecar" and entry["sha256"] == sha256_file(blob)
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"replaced " * 10)
    os.replace(replacement, blob)
    entry = provenance.describe_input(blob)
    assert entry["hash_source"] == "computed" and entry["sha256"] == sha256_file(blob)
