"""From a net's output space to uint8 RGB pixels: EDM2's encoders' ``decode`` (docs/method.md, "Evaluation").

EDM2 nets work either on pixels (StandardRGBEncoder: pixels / 127.5 - 1) or on Stable Diffusion
VAE latents (StabilityVAEEncoder). For the latter EDM2 whitens the raw latents per channel,

    z = raw · scale + bias,   scale = final_std / raw_std,   bias = final_mean - raw_mean · scale

(computed in float32; defaults raw_mean [5.81, 3.25, 0.12, -2.15], raw_std [4.17, 4.62, 3.71, 3.28],
final_mean 0, final_std 0.5), so decoding is

    raw = (z - bias) / scale = (z - final_mean) / final_std · raw_std + raw_mean
    pixels = uint8(clamp(VAE.decode(raw), 0, 1) · 255)   (truncating, in batches)

with no 0.18215 factor: raw_mean/raw_std describe the VAE's unscaled latents, and EDM2 feeds the
VAE pixels in [0, 1] (x / 255) rather than [-1, 1], hence the [0, 1] clamp on the way out
(NVlabs/edm2 training/encoders.py). The VAE (``stabilityai/sd-vae-ft-mse`` for the published
nets) is loaded with diffusers from a local folder only: nothing is fetched from a hub at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .inception import to_uint8

PIXEL_ENCODER = "StandardRGBEncoder"
VAE_ENCODER = "StabilityVAEEncoder"
DEFAULT_VAE_BATCH = 8  # EDM2's StabilityVAEEncoder batch_size

# ----------------------------------------------------------------------------------------------
# Latent scaling.


def latent_scaling(encoder: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) float32 [C] of StabilityVAEEncoder settings (`checkpoints` ``encoder`` dict):
    the stored ones when present, else derived from raw_mean/raw_std/final_mean/final_std in
    float32 as EDM2 does."""
    if (encoder or {}).get("class_name") != VAE_ENCODER:
        raise ValueError(f"latent scaling needs {VAE_ENCODER} settings, got encoder {encoder!r}")
    if "scale" in encoder and "bias" in encoder:
        scale, bias = np.float32(encoder["scale"]), np.float32(encoder["bias"])
    else:
        missing = [k for k in ("raw_mean", "raw_std", "final_mean", "final_std") if k not in encoder]
        if missing:
            raise ValueError(f"{VAE_ENCODER} settings lack {missing} (and scale/bias): cannot undo the latent scaling")
        scale = np.float32(encoder["final_std"]) / np.float32(encoder["raw_std"])
        bias = np.float32(encoder["final_mean"]) - np.float32(encoder["raw_mean"]) * scale
    scale, bias = np.broadcast_arrays(np.atleast_1d(scale), np.atleast_1d(bias))
    if scale.ndim != 1 or not np.all(np.isfinite(scale)) or np.any(scale == 0) or not np.all(np.isfinite(bias)):
        raise ValueError(f"{VAE_ENCODER} scale {scale.tolist()} / bias {bias.tolist()} must be finite per-channel "
                         "vectors with non-zero scale")
    return torch.from_numpy(scale.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


def raw_latents(z: torch.Tensor, encoder: dict) -> torch.Tensor:
    """Undo EDM2's latent whitening: raw = (z - bias) / scale, per channel, in float32."""
    scale, bias = latent_scaling(encoder)
    if z.ndim != 4 or z.shape[1] != scale.numel():
        raise ValueError(f"latents must be [N, {scale.numel()}, H, W] for these {VAE_ENCODER} settings, "
                         f"got shape {tuple(z.shape)}")
    z = z.to(torch.float32)
    return (z - bias.to(z.device).reshape(1, -1, 1, 1)) / scale.to(z.device).reshape(1, -1, 1, 1)


# ----------------------------------------------------------------------------------------------
# The VAE.


def load_vae(path, device=None):
    """diffusers ``AutoencoderKL`` from a local folder (``save_pretrained`` layout), eval mode, no grads.

    Only local files are read (``local_files_only``): a hub name or a folder without
    ``config.json`` is an error naming the path.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json: evaluate.vae must be a local diffusers "
                                "AutoencoderKL folder (e.g. a download of stabilityai/sd-vae-ft-mse)")
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("decoding latents needs diffusers: pip install 'remeanflow[vae]'") from e
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    vae.eval().requires_grad_(False)
    return vae.to(torch.device(device) if device is not None else torch.device("cpu"))


def decode_latents(vae, z: torch.Tensor, encoder: dict, batch_size: int | None = None) -> torch.Tensor:
    """EDM2 StabilityVAEEncoder.decode: final latents [N, C, h, w] -> uint8 pixels [N, 3, H, W] on the CPU."""
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if channels is not None and z.shape[1] != channels:
        raise ValueError(f"the VAE takes {channels}-channel latents, the net makes {z.shape[1]} channels")
    batch_size = int(batch_size or encoder.get("batch_size") or DEFAULT_VAE_BATCH)
    device = next(vae.parameters()).device
    raw = raw_latents(z.to(device), encoder)
    out = []
    with torch.inference_mode():
        for part in raw.split(batch_size):
            out.append(vae.decode(part).sample.clamp(0, 1).mul(255).to(torch.uint8).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# One entry point for both encoders.


def make_decoder(encoder: dict | None, vae_path=None, device=None,
                 batch_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from net outputs to uint8 RGB pixels [N, 3, H, W] (CPU) for a net's `encoder`
    settings: StandardRGBEncoder (also when `encoder` is None) needs nothing; StabilityVAEEncoder
    needs `vae_path`, a local diffusers folder."""
    name = (encoder or {}).get("class_name", PIXEL_ENCODER)
    if name == PIXEL_ENCODER:
        return lambda x: to_uint8(x.float()).cpu()
    if name == VAE_ENCODER:
        if vae_path is None:
            raise ValueError(f"the net works in the latent space of {VAE_ENCODER} ({encoder.get('vae_name')}): "
                             "set evaluate.vae to a local diffusers folder of that VAE to decode its samples")
        latent_scaling(encoder)  # fail now on bad settings, not after sampling
        vae = load_vae(vae_path, device)
        return lambda z: decode_latents(vae, z, encoder, batch_size)
    raise ValueError(f"unknown encoder {name!r}: expected {PIXEL_ENCODER} or {VAE_ENCODER}")
