"""Network checkpoints: the project's own format, and published EDM2 pickles.

Project format (`save_net` / `load_net`): a `torch.save` dict with `format`, `init_kwargs`,
`state_dict`, `encoder` and free-form `meta`, loaded with `weights_only=True` so that opening a
checkpoint never executes code. A sidecar `<path>.sha256` holds the file's checksum.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import networks
from .fileio import atomic_path, sha256_file

FORMAT = "remeanflow-net-v1"


def atomic_torch_save(obj, path) -> None:
    """torch.save through a temporary file and rename, so a killed job never leaves a torn file.

    A failed write (e.g. no space left on device) is raised as `fileio.OutputWriteError`, an
    OSError with the write's errno naming `path` and the free space, not as torch's
    ``RuntimeError: unexpected pos ...``; no output and no temporary remain.
    """
    from .fileio import WriteRecorder, output_write_error

    with atomic_path(path) as tmp, open(tmp, "wb") as raw:
        f = WriteRecorder(raw)
        try:
            torch.save(obj, f)  # a file object, not a path: torch names zip records after a path
        except Exception:
            if f.error is not None:  # torch reports a failed write as its own RuntimeError
                raise output_write_error(path, f.error) from f.error
            raise


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
    digest = sha256_file(path)
    Path(str(path) + ".sha256").write_text(f"{digest}  {Path(path).name}\n")
    return digest


def net_sha256(path) -> str:
    """Checksum of a project checkpoint, from the `.sha256` file `save_net` writes when present."""
    side = Path(str(path) + ".sha256")
    return side.read_text().split()[0] if side.is_file() else sha256_file(path)


def load_net(path, map_location="cpu") -> dict:
    """Load a project checkpoint -> dict(net=Precond in eval mode, init_kwargs, encoder, meta)."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a remeanflow network checkpoint (expected format {FORMAT!r})")
    net = networks.Precond(**obj["init_kwargs"])
    missing, unexpected = net.load_state_dict(obj["state_dict"], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: state_dict does not match init_kwargs (missing {missing}, unexpected {unexpected})")
    net.eval().requires_grad_(False)
    return dict(net=net, init_kwargs=obj["init_kwargs"], encoder=obj["encoder"], meta=obj["meta"])
from .edm2_pickle import load_edm2_pickle  # noqa: E402,F401
