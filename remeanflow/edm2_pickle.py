"""Load published NVlabs EDM2 network pickles without NVlabs code and without running their source.

An EDM2 pickle (e.g. `edm2-img512-s-2147483-0.070.pkl`) is a plain `pickle.dump` of a
`dnnlib.EasyDict(ema=Precond, encoder=..., loss_fn=..., dataset_kwargs=...)`. Every EDM2 class is
decorated with `torch_utils.persistence.persistent_class`, so each instance pickles as a call
`_reconstruct_persistent_obj(meta)` with meta = dict(type='class', version, module_src,
class_name, state): the unpickler would `exec(module_src)` and rebuild the object from `state`,
the instance `__dict__` (for a torch module: `_parameters`, `_buffers`, `_modules`, ... plus the
constructor arguments `_init_args`/`_init_kwargs`).

Here a restricted unpickler turns every persistent object into an inert `PersistentRecord`
(class name + state), keeps tensors and numpy arrays, and refuses every other global with
`UnsafePickleError`. The weights are then copied by name into `networks.Precond`, rebuilt from
the recorded constructor arguments. Nothing from the file is ever executed.
"""

from __future__ import annotations

import collections
import inspect
import io
import pickle
import warnings
from typing import Any, Callable

import numpy as np
import torch

from . import networks
from .fileio import sha256_file

__all__ = [
    "EDM2PickleError",
    "UnsafePickleError",
    "Record",
    "PersistentRecord",
    "safe_load",
    "edm2_state_dict",
    "build_precond",
    "encoder_settings",
    "load_edm2_pickle",
]


class EDM2PickleError(ValueError):
    """The file is not a usable EDM2 network pickle (corrupt, truncated or unexpected content)."""


class UnsafePickleError(EDM2PickleError, pickle.UnpicklingError):
    """The pickle asks for a global outside the allow-list (it could execute code)."""


# ----------------------------------------------------------------------------------------------
# Inert stand-ins for the objects the pickle describes.


class Record:
    """An object from the pickle kept as data: its class name and its instance `__dict__`.

    Plain torch containers (ModuleDict, ...) arrive through NEWOBJ + BUILD, hence `__setstate__`.
    """

    class_name: str = "object"
    state: dict | None = None

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.class_name}>"


class PersistentRecord(Record):
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` would have built, minus
    the class: `module_src` is kept as a string for inspection and never executed."""

    def __init__(self, class_name: str, state: dict, module_src: str, version: int | None):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src
        self.version = version


def _container_record(qualname: str) -> type[Record]:
    return type(qualname.rsplit(".", 1)[-1], (Record,), {"class_name": qualname})


# torch.nn containers that EDM2 uses without the persistence decorator (UNet.enc / UNet.dec).
_CONTAINERS = {
    f"torch.nn.modules.container.{name}": _container_record(f"torch.nn.{name}")
    for name in ("ModuleDict", "ModuleList", "Sequential")
}

# ----------------------------------------------------------------------------------------------
# Restricted unpickler.

# numpy pickles its arrays through module-private helpers whose module moved in numpy 2
# (numpy.core -> numpy._core); take the functions from numpy itself and accept both spellings.
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_NP_SCALAR = np.float32(0).__reduce__()[0]
_NP_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]

_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    **{f"numpy.{core}.multiarray._reconstruct": _NP_RECONSTRUCT for core in ("core", "_core")},
    **{f"numpy.{core}.multiarray.scalar": _NP_SCALAR for core in ("core", "_core")},
    **{f"numpy.{core}.numeric._frombuffer": _NP_FROMBUFFER for core in ("core", "_core")},
    # EasyDict is a dict with attribute access; the attribute access is not needed here.
    "dnnlib.util.EasyDict": dict,
    "dnnlib.EasyDict": dict,
    **_CONTAINERS,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come from `_ALLOWED` or from two hooks bound to the source file."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key == "torch_utils.persistence._reconstruct_persistent_obj":
            return self._persistent_record
        if key == "torch.storage._load_from_bytes":
            return self._storage_from_bytes
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise UnsafePickleError(
            f"{self.source}: refused to load global {key!r}: an EDM2 network pickle needs only tensors, "
            f"numpy arrays, plain containers and EDM2 persistent objects, and anything else could run code"
        )

    def persistent_load(self, pid) -> Any:
        raise UnsafePickleError(f"{self.source}: refused persistent id {pid!r} (EDM2 pickles use none)")

    def _persistent_record(self, meta) -> PersistentRecord:
        """Stand-in for EDM2's `_reconstruct_persistent_obj`: record the object, skip the `exec`."""
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise EDM2PickleError(f"{self.source}: persistent object meta must be a dict with type 'class'")
        class_name, state = meta.get("class_name"), meta.get("state")
        if not isinstance(class_name, str) or not isinstance(state, dict):
            raise EDM2PickleError(f"{self.source}: persistent object meta lacks a class_name string or state dict")
        return PersistentRecord(class_name, state, str(meta.get("module_src", "")), meta.get("version"))

    def _storage_from_bytes(self, data: bytes):
        """Stand-in for `torch.storage._load_from_bytes`, which torch.load's the bytes with
        weights_only=False; the same bytes load here with weights_only=True."""
        if not isinstance(data, (bytes, bytearray)):
            raise EDM2PickleError(f"{self.source}: tensor storage must be bytes, got {type(data).__name__}")
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafePickleError(f"{self.source}: an embedded tensor storage was refused by "
                                    f"torch.load(weights_only=True): {e}") from e


def safe_load(path) -> Any:
    """Unpickle `path` with the restricted unpickler and return the raw object for inspection.

    EDM2 persistent objects come back as `PersistentRecord`, torch containers as `Record`,
    EasyDicts as dicts; tensors and numpy arrays are real. Raises `UnsafePickleError` for any
    other global and `EDM2PickleError` for a truncated or corrupt file.
    """
    source = str(path)
    with open(path, "rb") as f, warnings.catch_warnings():
        # Rebuilding pre-2.0 style storages warns about TypedStorage; it is the file format, not us.
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        try:
            return _RestrictedUnpickler(f, source).load()
        except EDM2PickleError:
            raise
        except Exception as e:  # the pickle machinery raises many types on damaged input
            raise EDM2PickleError(f"{source}: not a readable pickle (truncated or corrupt?): "
                                  f"{type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------------------------
# From records to a Precond.


def _plain(value):
    """Recorded constructor arguments -> JSON-like values (tuples and numpy values as lists/floats)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def edm2_state_dict(record: Record, source: str = "<record>") -> dict[str, torch.Tensor]:
    """Flat state_dict of a recorded torch module, named exactly as `Module.state_dict()` names
    it: own parameters, then persistent buffers, then children depth-first."""
    out: dict[str, torch.Tensor] = {}
    _collect(record, "", out, source)
    return out


def _collect(record: Record, prefix: str, out: dict, source: str) -> None:
    state = record.state
    if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
        raise EDM2PickleError(f"{source}: {prefix or 'network'} ({record.class_name}) is not a recorded torch module")
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    tensors = list((state.get("_parameters") or {}).items())
    tensors += [(n, b) for n, b in (state.get("_buffers") or {}).items() if n not in non_persistent]
    for name, tensor in tensors:
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise EDM2PickleError(f"{source}: {prefix}{name} is a {type(tensor).__name__}, expected a tensor")
        out[prefix + name] = tensor
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise EDM2PickleError(f"{source}: submodule {prefix}{name} is a {type(child).__name__}, expected a module")
        _collect(child, f"{prefix}{name}.", out, source)


_POSITIONAL = ("img_resolution", "img_channels", "label_dim")
# Block arguments that UNet itself sets per block; from a pickle they would be a conflict.
_SET_BY_UNET = {"in_channels", "out_channels", "emb_channels", "flavor", "resample_mode", "attention"}


def _accepted_kwargs() -> set[str]:
    """Names our Precond takes, directly or forwarded to UNet and Block (EDM2's own split)."""
    names = set()
    for fn in (networks.Precond.__init__, networks.UNet.__init__, networks.Block.__init__):
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - _SET_BY_UNET


def build_precond(init_args=(), init_kwargs: dict | None = None, source: str = "<kwargs>"):
    """Build `networks.Precond` from EDM2 Precond constructor arguments.

    Positional arguments map to (img_resolution, img_channels, label_dim) as in EDM2. Every EDM2
    argument has a counterpart here, so nothing is dropped; an unknown name is an error rather
    than a silently different network. Returns (net, plain kwargs used).
    """
    init_args, init_kwargs = tuple(init_args or ()), dict(init_kwargs or {})
    if len(init_args) > len(_POSITIONAL):
        raise EDM2PickleError(f"{source}: Precond got {len(init_args)} positional arguments, expected at most "
                              f"{len(_POSITIONAL)} {_POSITIONAL}")
    kwargs = dict(zip(_POSITIONAL, init_args))
    if both := sorted(set(kwargs) & set(init_kwargs)):
        raise EDM2PickleError(f"{source}: Precond arguments {both} given both positionally and by name")
    kwargs = _plain({**kwargs, **init_kwargs})
    if missing := [n for n in _POSITIONAL if n not in kwargs]:
        raise EDM2PickleError(f"{source}: Precond constructor arguments lack {missing}")
    if unknown := sorted(set(kwargs) - _accepted_kwargs()):
        raise EDM2PickleError(f"{source}: EDM2 Precond arguments {unknown} are not supported by "
                              f"remeanflow.networks.Precond (known: {sorted(_accepted_kwargs())})")
    try:
        return networks.Precond(**kwargs), kwargs
    except (TypeError, ValueError) as e:
        raise EDM2PickleError(f"{source}: cannot build Precond from {kwargs}: {e}") from e


# Parameters Re-MeanFlow adds to EDM2; a teacher's pickle has none of them.
_NEW_KEYS = {"unet.emb_noise_t.weight", "unet.emb_noise_r.weight"}


def _load_teacher_weights(net: networks.Precond, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy the EDM2 weights by name; all EDM2 keys must match, the new time embeddings start
    as copies of the teacher's noise embedding."""
    ours = net.state_dict()
    expected = set(ours) - _NEW_KEYS
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise EDM2PickleError(f"{source}: network weights do not match its constructor arguments "
                              f"(missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''})")
    if bad := [f"{k} {tuple(state[k].shape)} vs {tuple(ours[k].shape)}" for k in sorted(expected)
               if state[k].shape != ours[k].shape]:
        raise EDM2PickleError(f"{source}: weight shapes differ from the network's: {bad[:8]}")
    net.load_state_dict(state, strict=False)
    net.init_time_embedding_()


# ----------------------------------------------------------------------------------------------
# Encoder settings.

# StabilityVAEEncoder constructor defaults (EDM2 training/encoders.py); the published pickles
# record no encoder arguments, so these are what they were built with.
_VAE_DEFAULTS = dict(
    vae_name="stabilityai/sd-vae-ft-mse", raw_mean=[5.81, 3.25, 0.12, -2.15], raw_std=[4.17, 4.62, 3.71, 3.28],
    final_mean=0.0, final_std=0.5, batch_size=8,
)


def _per_channel(value, channels: int) -> list[float]:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (channels,)).tolist()


def _vae_settings(state: dict, source: str) -> dict:
    """StabilityVAEEncoder settings, checked against the scale/bias it actually stored."""
    args = dict(zip(_VAE_DEFAULTS, state.get("_init_args") or ()))
    settings = {**_VAE_DEFAULTS, **args, **_plain(state.get("_init_kwargs") or {})}
    settings["vae_name"] = state.get("vae_name", settings["vae_name"])
    settings["batch_size"] = int(state.get("batch_size", settings["batch_size"]))
    # EDM2 computes these in float32: scale = final_std / raw_std, bias = final_mean - raw_mean * scale.
    scale = np.float32(settings["final_std"]) / np.float32(settings["raw_std"])
    bias = np.float32(settings["final_mean"]) - np.float32(settings["raw_mean"]) * scale
    for name, derived in (("scale", scale), ("bias", bias)):
        stored = state.get(name)
        matches = stored is None or (np.shape(stored) == np.shape(derived) and np.allclose(stored, derived, rtol=1e-6))
        if not matches:
            raise EDM2PickleError(f"{source}: encoder {name} {np.asarray(stored).tolist()} does not follow from its "
                                  f"recorded arguments (expected {derived.tolist()})")
    channels = len(scale)
    for name in ("raw_mean", "raw_std", "final_mean", "final_std"):
        settings[name] = _per_channel(settings[name], channels)
    settings.update(scale=_per_channel(scale, channels), bias=_per_channel(bias, channels))
    return settings


def _rgb_settings(state: dict, source: str) -> dict:
    """StandardRGBEncoder has no settings: pixels map linearly to [-1, 1]."""
    return {}


_ENCODERS: dict[str, Callable[[dict, str], dict]] = {
    "StandardRGBEncoder": _rgb_settings,
    "StabilityVAEEncoder": _vae_settings,
}


def encoder_settings(record, source: str = "<record>") -> dict:
    """Plain settings of a recorded EDM2 encoder: class_name plus, for the Stability VAE, vae_name,
    per-channel raw_mean/raw_std/final_mean/final_std and the derived scale/bias."""
    if not isinstance(record, PersistentRecord) or record.class_name not in _ENCODERS:
        found = record.class_name if isinstance(record, Record) else type(record).__name__
        raise EDM2PickleError(f"{source}: 'encoder' is {found}, expected one of {sorted(_ENCODERS)}")
    try:
        return {"class_name": record.class_name, **_ENCODERS[record.class_name](record.state, source)}
    except EDM2PickleError:
        raise
    except (TypeError, ValueError) as e:  # e.g. raw_mean and raw_std of different lengths
        raise EDM2PickleError(f"{source}: unusable {record.class_name} settings: {e}") from e


# ----------------------------------------------------------------------------------------------
# Public entry point.


def _network_record(data, source: str) -> PersistentRecord:
    if not isinstance(data, dict):
        raise EDM2PickleError(f"{source}: top level is a {type(data).__name__}, expected an EDM2 dict with key 'ema'")
    key = "ema" if "ema" in data else "net" if "net" in data else None
    if key is None:
        raise EDM2PickleError(f"{source}: no 'ema' or 'net' entry (keys: {sorted(map(str, data))})")
    record = data[key]
    if not isinstance(record, PersistentRecord) or record.class_name != "Precond":
        found = record.class_name if isinstance(record, Record) else type(record).__name__
        raise EDM2PickleError(f"{source}: {key!r} is {found}, expected EDM2's persistent 'Precond'")
    if record.state.get("_init_kwargs") is None:
        raise EDM2PickleError(f"{source}: {key!r} did not record its constructor arguments (_init_kwargs)")
    return record


def load_edm2_pickle(path) -> dict:
    """Load an NVlabs EDM2 network pickle into `networks.Precond`, executing nothing from it.

    Returns dict(net=Precond in eval mode without gradients, init_kwargs=plain constructor
    arguments, encoder=plain encoder settings, source=str(path), sha256=file checksum).
    """
    source = str(path)
    data = safe_load(path)
    record = _network_record(data, source)
    net, kwargs = build_precond(record.state.get("_init_args"), record.state["_init_kwargs"], source)
    _load_teacher_weights(net, edm2_state_dict(record, source), source)
    if "encoder" not in data:
        raise EDM2PickleError(f"{source}: no 'encoder' entry; EDM2 pickles record the pixel/latent encoder")
    encoder = encoder_settings(data["encoder"], source)
    net.eval().requires_grad_(False)
    return dict(net=net, init_kwargs=kwargs, encoder=encoder, source=source, sha256=sha256_file(path))


def check_declared(loaded: dict, *, encoder: str, resolution: int, role: str) -> None:
    """Refuse a pickle whose encoder or resolution differs from what the config declared
    (teacher.fetch.encoder / resolution): the pre-run checks planned decoding and FID from them."""
    net, found = loaded["net"], loaded["encoder"]["class_name"]
    wrong = []
    if found != encoder:
        wrong.append(f"teacher.fetch.encoder is {encoder}, the pickle's encoder is {found}")
    if net.img_resolution != resolution:
        wrong.append(f"teacher.fetch.resolution is {resolution}, the pickle's img_resolution is {net.img_resolution}")
    if wrong:
        raise EDM2PickleError(f"{loaded['source']} (teacher.fetch.{role}): " + "; ".join(wrong))
