"""InceptionV3 pool features for FID, compatible with pytorch-fid's weights (docs/method.md, "Evaluation").

FID (Heusel et al. 2017) is defined on the 2048-d final average-pool activations of the
TensorFlow InceptionV3 graph ``inception-2015-12-05``. pytorch-fid ported that graph to PyTorch as
``pt_inception-2015-12-05-6726825d.pth`` (a torchvision-style state_dict with a 1008-way ``fc``)
and published reference statistics in that format, which the paper's ImageNet statistics follow.
This module builds the same network without torchvision, with the same parameter names, so the
published weights load strictly by name. The port differs from torchvision's ImageNet InceptionV3
in three places that change the features (the "FID blocks"):

* the average-pool branches of the A, C and first E blocks exclude the zero padding from the mean
  (TensorFlow's ``avg_pool`` semantics, ``count_include_pad=False``);
* the pool branch of the last E block (``Mixed_7c``) uses a 3x3 *max* pool;
* BatchNorm eps is 1e-3.

Input convention of `InceptionV3.forward` (pytorch-fid's): float RGB in [0, 1], any size, resized
bilinearly to 299x299 (``align_corners=False``, no antialiasing), then mapped to [-1, 1].
`extract_features` adds the project's conventions: uint8 images, or float images in [-1, 1] that
are first quantised the way samples are written to disk (EDM2's StandardRGBEncoder.decode), so
FID of generated samples equals FID of their saved PNGs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import tqdm

from .data.download import DEFAULT_ATTEMPTS, DEFAULT_MAX_SECONDS, DEFAULT_RETRY_WAIT_S
from .fid import fetch_checked
from .fileio import hash_prefix, sha256_file

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_LOGITS = 1008  # the TF graph's classifier: 1000 ImageNet classes plus 8 unused outputs
BN_EPS = 1e-3

# torch.hub convention: a weights file named <name>-<first hex digits of its sha256>.<ext>.

# ----------------------------------------------------------------------------------------------
# Building blocks (Szegedy et al. 2016, "Rethinking the Inception Architecture", Fig. 5-7, 10).


class BasicConv2d(torch.nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool over the valid pixels only, as TensorFlow pads for 'SAME'."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(torch.nn.Module):
    """35x35 block (Fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], dim=1)


class InceptionB(torch.nn.Module):
    """35x35 -> 17x17 grid reduction (Fig. 10): stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(torch.nn.Module):
    """17x17 block with factorised 7x7 convolutions (Fig. 6)."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))], dim=1)


class InceptionD(torch.nn.Module):
    """17x17 -> 8x8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(torch.nn.Module):
    """8x8 block with expanded filter banks (Fig. 7); `pool` is the pool branch's 3x3 pooling
    (TF average for Mixed_7b, max for Mixed_7c in the FID graph)."""

    def __init__(self, in_channels: int, pool: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], dim=1)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))], dim=1)


# ----------------------------------------------------------------------------------------------
# The network.


class InceptionV3(torch.nn.Module):
    """The FID InceptionV3: input [B, 3, H, W] in [0, 1] -> pool features [B, 2048] (float32).

    Parameter names equal those of pytorch-fid's ``fid_inception_v3()`` (torchvision's names
    without the auxiliary classifier), so ``pt_inception-2015-12-05-6726825d.pth`` loads strictly.
    ``fc`` (the 1008-way classifier) is kept for that reason; the features do not use it.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=_tf_avg_pool)
        self.Mixed_7c = InceptionE(2048, pool=_max_pool_same)
        self.fc = torch.nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects RGB images [B, 3, H, W], got shape {tuple(x.shape)}")
        # Resize first, then normalise: pytorch-fid's order (they commute only up to roundoff).
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


# ----------------------------------------------------------------------------------------------
# Weights.


def _is_url(source) -> bool:
    return urlparse(str(source)).scheme in ("http", "https", "file")


def _name_of(source) -> str:
    return Path(urlparse(str(source)).path).name if _is_url(source) else Path(source).name


def check_sha256(path, sha256: str | None, name: str | None = None) -> str:
    """sha256 of `path`, checked against `sha256` (hex, optional ``sha256:`` prefix) when given, else
    against the prefix in `name` (default: the file's own name) when it carries one."""
    path = Path(path)
    digest = sha256_file(path)
    if sha256:
        expected = sha256.lower().removeprefix("sha256:")
        if digest != expected:
            raise ValueError(f"{path}: sha256 is {digest}, expected {expected}")
    elif (prefix := hash_prefix(name or path.name)) is not None and not digest.startswith(prefix):
        raise ValueError(f"{path}: sha256 {digest} does not start with {prefix}, the hash in its name "
                         f"{name or path.name!r} (a different or corrupt file)")
    return digest


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ValueError(f"{path}: not a readable PyTorch state_dict ({e})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def _shorten(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{f' ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def load_weights_(model: InceptionV3, path) -> InceptionV3:
    """Load a pytorch-fid style state_dict into `model` by name, strictly: any missing or unexpected
    key, or a shape mismatch, is an error naming the file and the keys."""
    path = Path(path)
    state = _state_dict(path)
    own = model.state_dict()
    if bad := [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
               if k in own and v.shape != own[k].shape]:
        raise ValueError(f"{path}: weight shapes differ from the FID InceptionV3's: {_shorten(bad)}")
    # strict=False so that BatchNorm's own loader may fill num_batches_tracked of old-format files
    # (as a strict load does); everything else that does not match is reported below.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: not the FID InceptionV3's state_dict (missing keys {_shorten(missing)}, "
                         f"unexpected keys {_shorten(unexpected)})")
    return model


def _uninitialised() -> InceptionV3:
    """The network with uninitialised parameters, for loading weights over them (random
    initialisation of 24M parameters would cost more than the load itself)."""
    with torch.device("meta"):
        model = InceptionV3()
    return model.to_empty(device="cpu")


def fetch_weights(source, dest, sha256: str | None = None, *, progress: bool = True,
                  attempts: int = DEFAULT_ATTEMPTS, max_seconds: float = DEFAULT_MAX_SECONDS,
                  retry_wait_s: float = DEFAULT_RETRY_WAIT_S) -> str:
    """Fetch Inception weights (URL, ``file://`` or path) to `dest` and check them: sha256 (or the
    hash in the source's file name), then a strict load. `dest` exists only if all of it passed.
    Returns the sha256. The download bounds are `data.download.download`'s."""

    def check(path: Path) -> None:
        check_sha256(path, sha256, name=_name_of(source))
        load_weights_(_uninitialised(), path)

    return fetch_checked(source, dest, check, sha256=sha256, progress=progress, attempts=attempts,
                         max_seconds=max_seconds, retry_wait_s=retry_wait_s)


def load_inception(path_or_url, sha256: str | None = None, *, cache_dir=None, device=None) -> InceptionV3:
    """The FID InceptionV3 with weights from a local file or a URL, in eval mode without gradients,
    on `device` (default: CUDA when available).

    A URL (http(s) or ``file://``) is fetched once into `cache_dir` (required for URLs) and reused
    from there. The file is checked against `sha256`, or else against the hash in its name
    (torch.hub convention, e.g. ``-6726825d``), then loaded strictly (`load_weights_`).
    """
    if _is_url(path_or_url):
        if cache_dir is None:
            raise ValueError(f"Inception weights {path_or_url} are a URL: a cache_dir to download them into is needed")
        path = Path(cache_dir) / _name_of(path_or_url)
        if not path.is_file():
            fetch_weights(path_or_url, path, sha256)
    else:
        path = Path(path_or_url)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
    check_sha256(path, sha256)
    model = load_weights_(_uninitialised(), path)
    model.eval().requires_grad_(False)
    if device is None:  # feature extraction is meant for the GPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(torch.device(device))


# ----------------------------------------------------------------------------------------------
# Feature extraction.


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 as written to disk (EDM2's StandardRGBEncoder.decode:
    x · 127.5 + 128, clipped, truncated); the exact inverse of x / 127.5 - 1 on uint8 values."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def to_unit_range(images) -> torch.Tensor:
    """uint8 images, or float images in [-1, 1] (quantised by `to_uint8` first), as float32 in
    [0, 1]: the input of `InceptionV3`."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        if not x.dtype.is_floating_point:
            raise ValueError(f"images must be uint8 or floating point in [-1, 1], got {x.dtype}")
        x = to_uint8(x.float())
    return x.float() / 255


def extract_features(
    model: InceptionV3, images, *, batch: int = 200, device=None, progress: bool = False
) -> np.ndarray:
    """Pool features float32 [N, 2048] of images [N, 3, H, W] (uint8, or float in [-1, 1])."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty RGB batch [N, 3, H, W], got shape {tuple(x.shape)}")
    device = next(model.parameters()).device if device is None else torch.device(device)
    out = []
    with torch.inference_mode():
        for lo in tqdm.tqdm(range(0, x.shape[0], batch), desc="inception features", unit="batch",
                            disable=not progress, leave=False):
            out.append(model(to_unit_range(x[lo : lo + batch]).to(device)).float().cpu())
    return torch.cat(out).numpy()
