"""Read an ImageNet-train-style archive in place, without extracting it to disk.

Two layouts are accepted:

* nested (ImageNet's ``ILSVRC2012_img_train.tar``): an outer tar of ``<synset>.tar`` members,
  each an inner tar of ``<synset>_<n>.JPEG`` files;
* flat: one tar of ``<synset>/<file>`` members (directory members are ignored).

The class index of a synset is its position in the sorted synset list (``list_synsets``).

The outer archive is opened in tarfile's random-access mode (``r:*``) rather than streaming
mode: walking the headers then seeks over the class tars, so a shard that wants 50 of 1000
classes reads those 50 classes' bytes, not the whole 140 GB, and classes can be yielded in class
index order whatever order the archive stores them in. Inner tars are read member by member from
the outer file object. Nothing is extracted and only tar headers are held in memory.

Members are checked before use: absolute names, ``..`` components, links, devices and FIFOs raise
``UnsafeArchiveError``. Tar names are bytes; they are decoded as UTF-8 with surrogate escapes, so
a name that is not UTF-8 still reads, and ``name_problem`` says so: an image's name is then the
caller's bad member (it cannot be stored as text), a class name is an ``ArchiveError``. A
truncated or corrupt archive raises ``ArchiveError``; in particular a tar that ends without its
end-of-archive marker is an error (``tarfile`` itself treats a cut at a header boundary, or a
garbled header, as a normal end, which would silently drop classes).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = [
    "ArchiveError",
    "UnsafeArchiveError",
    "list_synsets",
    "iter_images",
    "name_problem",
    "raw_name",
]


class ArchiveError(Exception):
    """The archive is truncated, corrupt, or not laid out as an ImageNet train archive."""


class UnsafeArchiveError(ArchiveError):
    """A member has an absolute path, a ``..`` component, or is a link/device/FIFO."""


@dataclass
class _Index:
    """Headers of an archive, grouped by synset (class tars or, flat layout, image members)."""

    layout: str  # "nested" | "flat"
    class_tars: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    flat_members: dict[str, list[tarfile.TarInfo]] = field(default_factory=dict)

    def synsets(self) -> list[str]:
        keys = self.class_tars if self.layout == "nested" else self.flat_members
        return sorted(keys)


# ----------------------------------------------------------------------------------------------
# Member checks and tar walking.

_NAME_ENCODING = "utf-8"  # tar headers carry bytes; ImageNet's names are ASCII, any UTF-8 is fine


def raw_name(name: str) -> bytes:
    """The bytes of a member name as the tar header holds them."""
    return name.encode(_NAME_ENCODING, "surrogateescape")


def name_problem(name: str) -> str | None:
    """Why a member name cannot be kept as text (Zarr, JSON and CSV hold UTF-8), or None."""
    try:
        name.encode(_NAME_ENCODING)
    except UnicodeEncodeError:
        return f"{raw_name(name)!r} is not valid UTF-8"
    return None


def _check_member(member: tarfile.TarInfo, where: str) -> None:
    """Refuse members that could escape a directory or are not plain data."""
    name = member.name
    path = PurePosixPath(name)
    if not name or name.startswith("/") or path.is_absolute():
        raise UnsafeArchiveError(f"{where}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{where}: member {name!r} has a '..' path component")
    if member.issym() or member.islnk():
        raise UnsafeArchiveError(
            f"{where}: member {name!r} is a link (to {member.linkname!r}); "
            "only regular files and directories are allowed"
        )
    if not (member.isreg() or member.isdir()):
        raise UnsafeArchiveError(
            f"{where}: member {name!r} is a device/FIFO/special file (tar type {member.type!r}); "
            "only regular files and directories are allowed"
        )


def _check_class_name(name: str, where: str) -> None:
    """A class (tar or folder) name is kept as text everywhere (labels.csv, the store's synset
    list, error messages): one that is not UTF-8 is refused, not counted like an image."""
    problem = name_problem(name)
    if problem:
        raise ArchiveError(f"{where}: class name {problem}; rename that class tar or folder in the archive")


def _check_end_marker(tf: tarfile.TarFile, where: str) -> None:
    """After ``tf.next()`` returned None, require a zero block where the next header would be.

    ``tarfile`` returns None both at a real end-of-archive marker and when the data simply stops
    or a header is garbage; only the first is a complete archive.
    """
    tf.fileobj.seek(tf.offset)
    block = tf.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise ArchiveError(
            f"{where}: archive ends at byte {tf.offset + len(block)} without an end-of-archive "
            "marker (truncated?)"
        )
    if block.count(0) != tarfile.BLOCKSIZE:
        raise ArchiveError(f"{where}: corrupt tar header at byte {tf.offset}")


def _walk(tf: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    """Yield the checked members of an open tar, then verify the archive ended properly."""
    while True:
        try:
            member = tf.next()
        except tarfile.TarError as e:
            raise ArchiveError(f"{where}: corrupt or truncated tar: {e}") from e
        if member is None:
            break
        _check_member(member, where)
        yield member
    _check_end_marker(tf, where)


@contextmanager
def _open_tar(*, name: str | None = None, fileobj: IO[bytes] | None = None, where: str):
    """Open a tar (any compression) for random access, mapping tarfile's errors to ArchiveError."""
    try:
        tf = tarfile.open(name=name, fileobj=fileobj, mode="r:*", encoding=_NAME_ENCODING,
                          errors="surrogateescape")
    except FileNotFoundError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{where}: not a readable tar archive: {e}") from e
    with tf:
        yield tf


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> IO[bytes]:
    """File object over a member's data; short data is reported as truncation."""
    f = tf.extractfile(member)
    if f is None:  # only for non-regular members, which _check_member already refused
        raise ArchiveError(f"{where}: member {member.name!r} has no data")
    return f


def _read_all(f: IO[bytes], where: str, name: str) -> bytes:
    try:
        return f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"{where}: cannot read member {name!r}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Index: one pass over the outer headers.


def _synset_of_class_tar(name: str) -> str:
    return PurePosixPath(name).name[: -len(".tar")]


def _index(archive: Path) -> _Index:
    """Walk the outer archive's headers (seeking over data) and group them by synset."""
    where = str(archive)
    class_tars: dict[str, tarfile.TarInfo] = {}
    flat: dict[str, list[tarfile.TarInfo]] = {}
    with _open_tar(name=str(archive), where=where) as tf:
        for m in _walk(tf, where):
            if m.isdir():
                continue
            parts = PurePosixPath(m.name).parts
            parts = parts[1:] if parts and parts[0] == "." else parts
            if m.name.lower().endswith(".tar"):
                synset = _synset_of_class_tar(m.name)
                _check_class_name(m.name, where)
                if synset in class_tars:
                    raise ArchiveError(f"{where}: class tar for {synset!r} appears twice")
                class_tars[synset] = m
            elif len(parts) == 2:
                _check_class_name(parts[0], where)
                flat.setdefault(parts[0], []).append(m)
            else:
                raise ArchiveError(
                    f"{where}: unexpected member {m.name!r}; expected '<synset>.tar' class "
                    "archives (ImageNet train layout) or '<synset>/<image>' files (flat layout)"
                )
    if class_tars and flat:
        raise ArchiveError(f"{where}: mixes class tars and '<synset>/<image>' files")
    if not class_tars and not flat:
        raise ArchiveError(f"{where}: archive contains no classes")
    if class_tars:
        return _Index("nested", class_tars=class_tars)
    return _Index("flat", flat_members=flat)


def _archive_path(archive) -> Path:
    path = Path(archive)
    if not path.is_file():
        raise FileNotFoundError(f"archive not found: {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Public API.


def list_synsets(archive) -> list[str]:
    """Sorted synset names in ``archive``; a synset's class index is its position in this list.

    Walks every header of the outer archive, so truncation, corruption and unsafe members are
    reported here, before any data is read.
    """
    return _index(_archive_path(archive)).synsets()


def _selected(index: _Index, synsets: Iterable[str] | None, where: str) -> list[str]:
    """Requested synsets in class index order; unknown names are an error, not an empty class."""
    available = index.synsets()
    if synsets is None:
        return available
    wanted = set(synsets)
    missing = sorted(wanted.difference(available))
    if missing:
        raise ArchiveError(f"{where}: synsets not in archive: {missing[:10]}")
    return [s for s in available if s in wanted]


def _iter_nested_class(
    outer: tarfile.TarFile, synset: str, member: tarfile.TarInfo, where: str
) -> Iterator[tuple[str, str, bytes]]:
    inner_where = f"{where}:{member.name}"
    with _open_tar(fileobj=_read_member(outer, member, where), where=inner_where) as inner:
        for m in _walk(inner, inner_where):
            if m.isdir():
                continue
            data = _read_all(_read_member(inner, m, inner_where), inner_where, m.name)
            yield synset, m.name, data


def _iter_flat_class(
    tf: tarfile.TarFile, synset: str, members: list[tarfile.TarInfo], where: str
) -> Iterator[tuple[str, str, bytes]]:
    for m in members:
        yield synset, m.name, _read_all(_read_member(tf, m, where), where, m.name)


def iter_images(archive, synsets: Iterable[str] | None = None) -> Iterator[tuple[str, str, bytes]]:
    """Yield ``(synset, member_name, image_bytes)`` for every image file of the chosen classes.

    Classes come in class index order (sorted synsets), images within a class in archive order.
    ``synsets`` limits the classes (all when None); naming a synset that the archive lacks is an
    ``ArchiveError``. ``member_name`` is the name inside the class tar (nested layout) or inside
    the archive (flat layout); it may not be UTF-8 (``name_problem``). Bytes are returned
    undecoded: callers decide what a bad image is.
    """
    path = _archive_path(archive)
    where = str(path)
    index = _index(path)
    chosen = _selected(index, synsets, where)
    with _open_tar(name=str(path), where=where) as tf:
        for synset in chosen:
            if index.layout == "nested":
                yield from _iter_nested_class(tf, synset, index.class_tars[synset], where)
            else:
                yield from _iter_flat_class(tf, synset, index.flat_members[synset], where)
