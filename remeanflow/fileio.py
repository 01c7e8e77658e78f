"""Small file helpers shared by every stage: checksums and all-or-nothing writes.

``atomic_path`` writes every output through a hidden sibling ``.<name>.tmp<pid>`` and renames it
into place only when the write succeeded. Two failure modes are handled on top of that:

* a job killed mid-write (SIGKILL, node loss) cannot remove its temporary; the next
  ``atomic_path`` of the same output removes the temporaries of processes that no longer run
  (see ``remove_stale_temporaries``);
* a failing disk write (no space left, quota, file too large, I/O error) is raised as an
  ``OutputWriteError`` (an ``OSError`` with the original errno) naming the output and the free
  space, even when a library wrapped it in its own error (torch.save reports a failed write as
  ``RuntimeError: unexpected pos ...``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "OutputWriteError",
    "WriteRecorder",
    "atomic_path",
    "cached_sha256",
    "content_hash",
    "file_identity",
    "json_sha256",
    "output_write_error",
    "remove_stale_temporaries",
    "sha256_file",
    "tree_checksum",
    "write_side_digest",
]


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


def hash_prefix(name: str) -> str | None:
    """The sha256 prefix a torch.hub-style file name carries (``...-6726825d.pth`` -> '6726825d')."""
    m = _HASH_IN_NAME.search(name)
    return m.group(1) if m else None


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Cached digests: trusted only while the file is the one they were taken of.

SIDE_SUFFIX = ".sha256"
_IDENTITY_PREFIX = "# identity "


def file_identity(path) -> dict[str, int]:
    """(size, mtime_ns, inode) of a file; of a directory, those of every content file folded into
    one digest. A cached digest stands for the bytes only while this is unchanged: a rewrite,
    replacement or copy changes at least one of them."""
    path = Path(path)
    if not path.is_dir():
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    h = hashlib.sha256()
    for p in _content_files(path):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size} {st.st_mtime_ns} {st.st_ino}\n".encode())
    return {"tree": h.hexdigest()}


def side_digest_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDE_SUFFIX)


def write_side_digest(path, digest: str | None = None, identity: dict | None = None) -> str:
    """Write ``<path>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it; it skips the
    ``#`` line) with the file's identity on a comment line; returns the digest.

    ``digest`` and ``identity`` may be given when the caller hashed the bytes while writing them
    (a download) and ``path`` is not yet at its final name (identity survives a rename)."""
    path = Path(path)
    identity = file_identity(path) if identity is None else identity  # before hashing: a write meanwhile shows
    digest = sha256_file(path) if digest is None else digest
    fields = " ".join(f"{k}={v}" for k, v in sorted(identity.items()))
    with atomic_path(side_digest_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n{_IDENTITY_PREFIX}{fields}\n")
    return digest


def read_side_digest(path) -> str | None:
    """The digest of ``<path>.sha256`` if it was taken of the file as it is now (same identity);
    None without a side file, with one from before identities were recorded, or with a stale one."""
    side = side_digest_path(path)
    try:
        lines = side.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    recorded = next((line[len(_IDENTITY_PREFIX):] for line in lines if line.startswith(_IDENTITY_PREFIX)), None)
    if not lines or recorded is None:
        return None
    fields = " ".join(f"{k}={v}" for k, v in sorted(file_identity(path).items()))
    return lines[0].split()[0] if recorded == fields else None


def cached_sha256(path) -> str:
    """sha256 of a file from its ``.sha256`` side file while that was taken of these very bytes
    (``read_side_digest``), else hashed now. Never trusts a side file the file has outlived."""
    return read_side_digest(path) or sha256_file(path)


# ----------------------------------------------------------------------------------------------
# Disk errors as the primary error.

# errnos that mean "the disk did not take the bytes": raised as the primary error even when a
# library wrapped them (an incidental, handled OSError of another kind in a chain is left alone).
_DISK_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EIO, errno.EROFS) if e
)


class OutputWriteError(OSError):
    """An OSError while writing an output; its message names the output and the free space."""


def _free_space(path: Path) -> str:
    """'<n> GiB free on <dir>' for the nearest existing folder of ``path`` (or why unknown)."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError as e:
        return f"free space on {where} unknown ({e.strerror})"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f"{free:.1f} {unit} free on {where}" if unit != "B" else f"{free} B free on {where}"


def output_write_error(path, error: OSError) -> OutputWriteError:
    """An ``OutputWriteError`` with ``error``'s errno whose message names ``path`` and the free
    space; raise it ``from`` the original exception."""
    path = Path(path)
    reason = error.strerror or str(error) or type(error).__name__
    code = error.errno if error.errno is not None else errno.EIO
    return OutputWriteError(code, f"{reason} while writing {path} ({_free_space(path)})", str(path))


def _disk_error_in_chain(exc: BaseException) -> OSError | None:
    """The first disk-write OSError in ``exc`` or its cause/context chain, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            return current
        current = current.__cause__ or current.__context__
    return None


class WriteRecorder:
    """Binary file wrapper that remembers the first OSError of ``write``/``flush``.

    For writers that hide a failed write behind an error of their own (torch.save's zip writer):
    after they fail, ``error`` is the OSError to report.
    """

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


# ----------------------------------------------------------------------------------------------
# Temporaries of killed writers.

# A live pid whose process started more than this long after the temporary was last modified
# cannot have written it (the pid was reused). The margin absorbs clock-tick rounding and clock
# skew between this host and a network file server.
_PID_REUSE_MARGIN_S = 120.0


def _temporary_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp{pid}")


def _process_start_time(pid: int) -> float | None:
    """Start of process ``pid`` in seconds since the epoch (Linux /proc), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        ticks = float(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, after comm
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True  # unknown: keep the temporary
    return not _is_zombie(pid)


def _is_stale(temporary: Path, pid: int) -> bool:
    if not _pid_alive(pid):
        return True
    started = _process_start_time(pid)
    try:
        modified = temporary.lstat().st_mtime
    except FileNotFoundError:
        return False
    return started is not None and started > modified + _PID_REUSE_MARGIN_S


def remove_stale_temporaries(path) -> list[Path]:
    """Remove ``atomic_path`` temporaries of ``path`` (``.<name>.tmp<pid>`` siblings) whose
    writer is gone; returns what was removed.

    A temporary is stale when no process with its pid runs on this host (a zombie counts as
    gone), or when the process that has that pid now started more than two minutes after the
    temporary was last modified (the pid was reused by another process). The temporary of a live
    writer is never removed; this process's own temporary is left to ``atomic_path``. Assumes the
    same output is not written at the same time from another host (Snakemake runs one job per
    output).
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.tmp") + r"(\d+)")
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        temporary = Path(entry.path)
        if not _is_stale(temporary, int(m.group(1))):
            continue
        try:
            _remove(temporary)
        except FileNotFoundError:  # another run removed it first
            pass
        except OSError as e:
            log.warning("could not remove stale temporary %s: %s", temporary, e)
            continue
        log.warning("removed %s, the temporary of a writer (pid %s) that no longer runs", temporary, m.group(1))
        removed.append(temporary)
    return removed


# ----------------------------------------------------------------------------------------------
# All-or-nothing writes.


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and directories (e.g. Zarr stores). On error the temporary is removed, so a
    failed step never leaves an output that Snakemake (or a resume) would take as complete.
    Temporaries that killed writers left for the same `path` are removed first
    (`remove_stale_temporaries`). A disk-write error (no space, quota, file too large, I/O error)
    in the block is raised as `OutputWriteError` naming `path` and the free space, chained to
    the original error, even when a library wrapped it in another exception type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = _temporary_name(path, os.getpid())
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            _remove(tmp)
        wrapped = isinstance(e, Exception) and not isinstance(e, OutputWriteError)
        disk = _disk_error_in_chain(e) if wrapped else None
        if disk is not None:
            raise output_write_error(path, disk) from e
        raise


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


def _content_files(root: Path) -> list[Path]:
    files = (q for q in root.rglob("*") if q.is_file())
    return sorted(q for q in files if q.name not in _NOT_CONTENT and not q.name.endswith(_NOT_CONTENT_SUFFIX))


def tree_checksum(path) -> str:
    """sha256 over (relative path, file sha256) of every file under a directory, in sorted order.
    Stable across machines for the same content; used for Zarr stores and other directory outputs."""
    root = Path(path)
    h = hashlib.sha256()
    for p in _content_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def content_hash(path) -> str:
    """sha256 of a file, or `tree_checksum` of a directory."""
    return tree_checksum(path) if Path(path).is_dir() else sha256_file(path)
