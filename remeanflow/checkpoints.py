"""Network checkpoints: the project's own format, and published EDM2 pickles.

Project format (`save_net` / `load_net`): a `torch.save` dict with `format`, `init_kwargs`,
`state_dict`, `encoder` and free-form `meta`, loaded with `weights_only=True` so that opening a
checkpoint never executes code. A sidecar `<path>.sha256` holds the file's checksum and the
identity of the file it was taken of (`fileio.write_side_digest`).

Every file written by `atomic_torch_save` (nets, snapshots, training checkpoints, train_state.pt)
is *canonical* and carries a *content digest*:

* canonical (`canonical`): fresh containers, interned strings, every tensor alone on its own
  contiguous CPU storage. pickle shares an object it meets twice by identity, so without this the
  bytes depend on where equal values came from: after a resume the optimiser state's keys are
  strings the unpickler made, not the literals of an uninterrupted run, and train_state.pt's bytes
  (hence every digest downstream) differed although every tensor was equal. torch.save itself is
  deterministic for a canonical object (no timestamps; zip records named after "archive/").
* content digest (`content_sha256`, stored under CONTENT_KEY): sha256 over the object's
  structure, every non-tensor value as JSON with its type, and every tensor's dtype, shape and raw
  bytes, streamed (no copy of a contiguous CPU tensor). `torch.load` checks no zip CRC, so a
  flipped byte in tensor data loads silently; `verify_content` catches it at every load that feeds
  a result (`load_net`, `train_state.load_start`, the resume path).
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import torch

from . import networks
from .fileio import atomic_path, cached_sha256, write_side_digest

FORMAT = "remeanflow-net-v1"
CONTENT_KEY = "content_sha256"  # top-level key of the content digest in every file atomic_torch_save writes
# What to do about a damaged project file when the caller knows no better (load_net's files are
# written by several rules: train_teacher, fetch_teacher, init_time_embedding, train_stageN).
RERUN_WRITER = "Delete it and rerun the rule that wrote it (named in its .provenance.json sidecar, where there is one)."


class ContentDigestError(ValueError):
    """A torch-saved project file whose content does not match the digest recorded in it, or that
    has none (written before files carried one): its bytes cannot be trusted."""


# ----------------------------------------------------------------------------------------------
# Canonical objects and content digests.


def canonical(value, _owned: set[int] | None = None, _where: str = ""):
    """A copy of `value` whose pickle depends only on its values: new dicts, lists and tuples,
    interned strings, exact bool/int/float, and each tensor detached, contiguous, on the CPU and
    alone on its storage (copied only where it is not already so). Anything else is refused."""
    owned = set() if _owned is None else _owned
    if isinstance(value, torch.Tensor):
        return _owned_tensor(value, owned)
    if isinstance(value, dict):  # OrderedDict too: its `_metadata` attribute is not content
        return {canonical(k, owned, _where): canonical(v, owned, f"{_where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [canonical(v, owned, f"{_where}/{i}") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, str):
        return sys.intern(str(value))
    for kind in (bool, int, float):  # bool first: it is an int
        if isinstance(value, kind):
            return kind(value)  # a numpy float64 becomes a float
    if value is None:
        return None
    raise TypeError(f"{_where or '/'}: a {type(value).__name__} cannot go into a project torch file "
                    "(tensors, dicts, lists, tuples, str, int, float, bool and None only)")


def _owned_tensor(t: torch.Tensor, owned: set[int]) -> torch.Tensor:
    """`t` as a plain CPU tensor that covers its whole storage, shared with no other saved tensor
    (torch.save writes a shared storage once: that sharing would be part of the bytes)."""
    t = t.detach()
    storage = t.untyped_storage()
    whole = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
             and storage.nbytes() == t.numel() * t.element_size())
    if not whole or storage.data_ptr() in owned:
        t = t.to("cpu", memory_format=torch.contiguous_format, copy=True)
    owned.add(t.untyped_storage().data_ptr())
    return t


def content_sha256(value) -> str:
    """sha256 of `value`'s content: its structure (dict keys in order, list/tuple lengths), every
    non-tensor value as JSON with its type, every tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)  # no copy for a contiguous CPU tensor
        h.update(f"tensor {str(t.dtype).removeprefix('torch.')} {list(value.shape)}\n".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))  # the tensor's own bytes, not a copy
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}\n".encode())
        for k, v in value.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}\n".encode())
        for v in value:
            _feed(h, v)
    else:
        h.update(f"{type(value).__name__} {json.dumps(value)}\n".encode())


def verify_content(path, obj: dict[str, Any], remedy: str = RERUN_WRITER) -> dict[str, Any]:
    """Check a loaded project file against the content digest recorded in it, and return it
    without that key; `ContentDigestError` naming the file, the digests and `remedy` otherwise."""
    recorded = obj.pop(CONTENT_KEY, None)
    if recorded is None:
        raise ContentDigestError(f"{path}: no {CONTENT_KEY} recorded (written by an older remeanflow, before files "
                                 f"were verified on load), so its content cannot be checked. {remedy}")
    actual = content_sha256(obj)
    if actual != recorded:
        raise ContentDigestError(f"{path}: content does not match the digest recorded when it was written "
                                 f"({CONTENT_KEY} {recorded}, content now {actual}): the file was damaged or "
                                 f"changed after it was written. {remedy}")
    return obj


def torch_load(path) -> Any:
    """torch.load of a project file on the CPU, weights only (opening it never runs code); the
    caller checks its format and then `verify_content`."""
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_torch_save(obj: dict[str, Any], path) -> str:
    """torch.save the canonical form of `obj` with its content digest under CONTENT_KEY, through
    a temporary file and rename, so a killed job never leaves a torn file; returns the digest.

    A failed write (e.g. no space left on device) is raised as `fileio.OutputWriteError`, an
    OSError with the write's errno naming `path` and the free space, not as torch's
    ``RuntimeError: unexpected pos ...``; no output and no temporary remain.
    """
    from .fileio import WriteRecorder, output_write_error

    if not isinstance(obj, dict) or CONTENT_KEY in obj:
        raise TypeError(f"{path}: atomic_torch_save takes a dict without a {CONTENT_KEY!r} key")
    obj = canonical(obj)
    digest = obj[CONTENT_KEY] = content_sha256(obj)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        f = WriteRecorder(raw)
        try:
            torch.save(obj, f)  # a file object, not a path: torch names zip records after a path
        except Exception:
            if f.error is not None:  # torch reports a failed write as its own RuntimeError
                raise output_write_error(path, f.error) from f.error
            raise
    return digest


def _plain(value):
    """init_kwargs with tuples as lists, so the dict survives weights_only loading unchanged."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def save_net(path, net: networks.Precond, encoder: dict | None = None, meta: dict | None = None) -> str:
    """Save `net` in the project format; returns the sha256 also written to `<path>.sha256`."""
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    obj = dict(
        format=FORMAT,
        init_kwargs=_plain(net.init_kwargs),
        state_dict=state,
        encoder=encoder or {"class_name": "StandardRGBEncoder"},
        meta=meta or {},
    )
    atomic_torch_save(obj, path)
    return write_side_digest(path)


def net_sha256(path) -> str:
    """sha256 of a project checkpoint's bytes: from the `.sha256` file `save_net` writes while it
    was taken of this very file (same size, mtime, inode), else hashed now."""
    return cached_sha256(path)


def load_net(path, remedy: str = RERUN_WRITER) -> dict:
    """Load a project checkpoint and check its content digest -> dict(net=Precond in eval mode,
    init_kwargs, encoder, meta). `remedy` ends the error of a damaged file."""
    obj = torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a remeanflow network checkpoint (expected format {FORMAT!r})")
    verify_content(path, obj, remedy)
    net = networks.Precond(**obj["init_kwargs"])
    missing, unexpected = net.load_state_dict(obj["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state_dict does not match init_kwargs (missing {missing}, unexpected {unexpected})")
    net.eval().requires_grad_(False)
    return dict(net=net, init_kwargs=obj["init_kwargs"], encoder=obj["encoder"], meta=obj["meta"])
from .edm2_pickle import load_edm2_pickle  # noqa: E402,F401
