"""Write network pickles in NVlabs EDM2's format from a `remeanflow.networks.Precond`, for tests and the rehearsal (`remeanflow.rehearsal`).

The bytes follow what EDM2's `training_loop` writes: `pickle.dump(dnnlib.EasyDict(encoder=...,
dataset_kwargs=..., loss_fn=..., ema=Precond))`, where every EDM2 class instance reduces to
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = dict(type='class',
version=6, module_src, class_name, state). Pickle resolves those globals by module name, so
stand-in modules `dnnlib`, `torch_utils.persistence`, `training.networks_edm2` and
`training.encoders` exist in `sys.modules` while dumping only.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import torch

from . import networks

PERSISTENCE_VERSION = 6  # torch_utils.persistence._version of the published pickles

NETWORKS_SRC = '"""training/networks_edm2.py stand-in: never executed by the loader."""\nclass Precond: pass\n'
ENCODERS_SRC = '"""training/encoders.py stand-in: never executed by the loader."""\nclass Encoder: pass\n'
LOSS_SRC = '"""training/training_loop.py stand-in."""\nclass EDM2Loss: pass\n'

# Our classes and the EDM2 class names they stand for; containers (ModuleDict) stay plain torch.
EDM2_NAMES = {
    networks.Precond: "Precond", networks.UNet: "UNet", networks.Block: "Block",
    networks.MPConv: "MPConv", networks.MPFourier: "MPFourier",
}
NEW_MODULES = {"emb_noise_t", "emb_noise_r"}  # Re-MeanFlow additions, absent from EDM2


class EasyDict(dict):
    """dnnlib.util.EasyDict: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _reconstruct_persistent_obj(meta):
    raise RuntimeError("writer-side stand-in: only its name goes into the pickle")


class PersistentObject:
    """An instance of an EDM2 persistent class, as far as pickling is concerned."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.class_name, self.state, self.module_src = class_name, state, module_src

    def __reduce__(self):
        meta = dict(type="class", version=PERSISTENCE_VERSION, module_src=self.module_src,
                    class_name=self.class_name, state=self.state)
        return _reconstruct_persistent_obj, (meta,), None


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    for key, value in attrs.items():
        value.__module__ = name
        setattr(mod, key, value)
    return mod


@contextlib.contextmanager
def fake_edm2_modules():
    """Install stand-ins for the NVlabs modules whose names the pickle references; restore after."""
    fakes = {
        "dnnlib": _module("dnnlib"),
        "dnnlib.util": _module("dnnlib.util", EasyDict=EasyDict),
        "torch_utils": _module("torch_utils"),
        "torch_utils.persistence": _module("torch_utils.persistence",
                                           _reconstruct_persistent_obj=_reconstruct_persistent_obj),
        "training": _module("training"),
        "training.networks_edm2": _module("training.networks_edm2"),
        "training.encoders": _module("training.encoders"),
    }
    fakes["dnnlib"].EasyDict = EasyDict
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _tensor(t: torch.Tensor, dtype) -> torch.Tensor:
    t = t.detach().clone()
    return t.to(dtype) if t.is_floating_point() and dtype is not None else t


def edm2_object(module: torch.nn.Module, dtype=None, module_src: str = NETWORKS_SRC, init_args=(), init_kwargs=None):
    """Mirror `module` as EDM2 would pickle it: persistent classes as PersistentObject with their
    `__dict__` as state (without Re-MeanFlow's extra modules), torch containers as themselves."""
    children = OrderedDict((name, edm2_object(child, dtype, module_src)) for name, child in module._modules.items()
                           if name not in NEW_MODULES)
    state = dict(module.__dict__)
    state["_parameters"] = {n: torch.nn.Parameter(_tensor(p, dtype), requires_grad=False)
                            for n, p in module._parameters.items()}
    state["_buffers"] = {n: _tensor(b, dtype) for n, b in module._buffers.items()}
    state["_modules"] = children
    state["training"] = False
    if type(module) not in EDM2_NAMES:
        clone = type(module).__new__(type(module))
        clone.__dict__.update(state)
        return clone
    state.pop("init_kwargs", None)  # ours; EDM2 keeps the arguments in _init_args/_init_kwargs
    if isinstance(module, networks.Block):
        state["resample_filter"] = [1, 1]
    state["_init_args"] = tuple(init_args)
    state["_init_kwargs"] = dict(init_kwargs or {})
    return PersistentObject(EDM2_NAMES[type(module)], state, module_src)


def stability_vae_encoder(*args, **kwargs) -> PersistentObject:
    """StabilityVAEEncoder state as EDM2's constructor leaves it (`_vae` dropped by __getstate__)."""
    names = ("vae_name", "raw_mean", "raw_std", "final_mean", "final_std", "batch_size")
    defaults = dict(vae_name="stabilityai/sd-vae-ft-mse", raw_mean=[5.81, 3.25, 0.12, -2.15],
                    raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8)
    s = {**defaults, **dict(zip(names, args)), **kwargs}
    scale = np.float32(s["final_std"]) / np.float32(s["raw_std"])
    bias = np.float32(s["final_mean"]) - np.float32(s["raw_mean"]) * scale
    state = dict(vae_name=s["vae_name"], scale=scale, bias=bias,
                 batch_size=int(s["batch_size"]), _vae=None, _init_args=tuple(args), _init_kwargs=dict(kwargs))
    return PersistentObject("StabilityVAEEncoder", state, ENCODERS_SRC)


def standard_rgb_encoder() -> PersistentObject:
    return PersistentObject("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}), ENCODERS_SRC)


def edm2_data(net: networks.Precond, *, dtype=torch.float16, init_args=(), init_kwargs=None, encoder=None,
              module_src: str = NETWORKS_SRC) -> EasyDict:
    """The dict EDM2 pickles for a snapshot. `init_kwargs` defaults to the net's own; positional
    `init_args` (img_resolution, img_channels, label_dim) are removed from the keyword set."""
    if init_kwargs is None:
        init_kwargs = {k: v for k, v in net.init_kwargs.items()
                       if k not in ("img_resolution", "img_channels", "label_dim")[:len(init_args)]}
    loss = PersistentObject("EDM2Loss", dict(P_mean=-0.4, P_std=1.0, sigma_data=0.5,
                                             _init_args=(), _init_kwargs=dict(P_mean=-0.4, P_std=1.0)), LOSS_SRC)
    return EasyDict(
        encoder=encoder if encoder is not None else standard_rgb_encoder(),
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="datasets/toy.zip",
                                use_labels=True),
        loss_fn=loss,
        ema=edm2_object(net, dtype, module_src, init_args, init_kwargs),
    )


def dump(path, data, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    """pickle.dump `data` with the NVlabs module names resolvable, as EDM2's training loop does."""
    with fake_edm2_modules(), open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)


def write_edm2_pickle(path, net: networks.Precond, protocol: int = pickle.DEFAULT_PROTOCOL, **kwargs) -> None:
    """Write `net` as an EDM2 snapshot pickle (keyword arguments as for `edm2_data`)."""
    dump(path, edm2_data(net, **kwargs), protocol)
