"""Small file helpers shared by every stage: checksums and all-or-nothing writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and directories (e.g. Zarr stores). On error the temporary is removed, so a
    failed step never leaves an output that Snakemake (or a resume) would take as complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


# Files that are not content: Snakemake touches `.snakemake_timestamp` in every directory()
# output after the job; Zarr's local store writes through `*.partial` temporaries that a killed
# writer may leave behind.
_NOT_CONTENT = {".snakemake_timestamp"}
_NOT_CONTENT_SUFFIX = ".partial"


def json_sha256(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no whitespace, no NaN/inf)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def tree_checksum(path) -> str:
    """sha256 over (relative path, file sha256) of every file under a directory, in sorted order.
    Stable across machines for the same content; used for Zarr stores and other directory outputs."""
    root = Path(path)
    h = hashlib.sha256()
    files = (q for q in root.rglob("*") if q.is_file())
    for p in sorted(q for q in files if q.name not in _NOT_CONTENT and not q.name.endswith(_NOT_CONTENT_SUFFIX)):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def content_hash(path) -> str:
    """sha256 of a file, or `tree_checksum` of a directory."""
    return tree_checksum(path) if Path(path).is_dir() else sha256_file(path)
