"""Assets of the paper-scale rehearsal (`presets/rehearsal512.yaml`): everything the ImageNet
presets fetch or read from outside the run, made locally in the same formats with random weights,
so that the whole paper path (fetch + conversion of EDM2 pickles, SD-VAE latents, VAE decoding,
Inception features, reference statistics, FID) runs on a CPU in minutes before a cluster run.

`write_assets(preset, out_dir)` reads what the rehearsal preset declares about its teacher
(`teacher.fetch.encoder`, `teacher.fetch.resolution`) and writes into `out_dir`:

* ``train.tar``: an ImageNet-layout train archive, 1000 synset tars of generated JPEGs
  (`data.toy.write_toy_archive`);
* ``edm2-main.pkl`` / ``edm2-guide.pkl``: NVlabs-format EDM2 snapshot pickles (`edm2_writer`) of
  the img512 (or img64) architecture with small widths and random weights, with the preset's
  encoder (StabilityVAEEncoder settings for latents);
* ``pt_inception-rehearsal-<sha8>.pth``: InceptionV3 weights in pytorch-fid's layout, random;
* ``vae/``: a diffusers AutoencoderKL (``save_pretrained``) with the SD-VAE's 8x upsampling and
  4 latent channels, small widths, random weights (only for a latent teacher);
* ``assets.yaml``: the config overlay naming them (``file://`` URLs with their sha256).

The rehearsal is then ``snakemake --configfile presets/rehearsal512.yaml <out_dir>/assets.yaml``.
Its numbers mean nothing (random teacher, random Inception); that it runs, and how long each
step takes, is the point.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from . import config, edm2_writer, inception, networks, settings
from .data.toy import write_toy_archive
from .fileio import atomic_path, sha256_file

NUM_CLASSES = 1000  # ImageNet's synsets: the label dimension of the published nets
IMAGES_PER_CLASS = 1
IMAGE_SIZE = 72  # short side of the generated JPEGs; the preset's preprocessing crops to 64
# Small widths of the EDM2 architecture (EDM2 img512: model_channels 192 (S) / 128 (XS)); the
# layout (channel_mult, num_blocks, attention at 16 and 8) is the published one.
MAIN_CHANNELS, GUIDE_CHANNELS = 8, 4
VAE_CHANNELS = (8, 8, 8, 8)  # four blocks: 8 pixels per latent, as the SD-VAE


def _teacher(channels: int, model_channels: int, resolution: int, seed: int) -> networks.Precond:
    torch.manual_seed(seed)
    net = networks.build(f"edm2-img{'512' if channels == 4 else '64'}-xs", img_resolution=resolution,
                         model_channels=model_channels, channels_per_head=model_channels)
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)  # EDM2 initialises it to 0: a trained net's output is not zero
    return net


def _encoder(encoder: str):
    if encoder == "StabilityVAEEncoder":
        return edm2_writer.stability_vae_encoder()
    return edm2_writer.standard_rgb_encoder()


def random_inception(seed: int) -> inception.InceptionV3:
    """InceptionV3 with random weights that keep activations O(1) through all 94 layers (He-normal
    convolutions, BatchNorm statistics away from the identity); PyTorch's default init makes the
    features vanish (~1e-7), which would hide a wrong pooling or padding."""
    torch.manual_seed(seed)
    model = inception.InceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def save_random_vae(path, block_out_channels=VAE_CHANNELS, seed: int = 0) -> Path:
    """A diffusers AutoencoderKL with 4 latent channels and 2 ** (len(block_out_channels) - 1)
    pixels per latent, random weights, saved with ``save_pretrained``. The decoder's output bias is
    0.5 so that decoded pixels spread over (0, 1) instead of sitting at EDM2's [0, 1] clamp."""
    import diffusers

    torch.manual_seed(seed)
    blocks = len(block_out_channels)
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=tuple(block_out_channels),
        layers_per_block=1, latent_channels=4, norm_num_groups=min(block_out_channels) // 2, sample_size=64,
    )
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(0.5)
    model.save_pretrained(path)
    return Path(path)


def _save_inception(out_dir: Path) -> Path:
    """Random weights under a torch.hub-style name whose hash prefix is their sha256's."""
    tmp = out_dir / "pt_inception-rehearsal.pth.tmp"
    torch.save(random_inception(0).state_dict(), tmp)
    path = out_dir / f"pt_inception-rehearsal-{sha256_file(tmp)[:8]}.pth"
    tmp.replace(path)
    return path


def write_assets(preset, out_dir, *, progress: bool = True) -> dict:
    """Write the rehearsal's assets for `preset` (a rehearsal preset YAML) into `out_dir` and return
    the config overlay (also written to ``out_dir/assets.yaml``)."""
    s = settings.load(config.load_files([preset]))
    if s.teacher.mode != "fetch":
        raise ValueError(f"{preset}: teacher.mode is {s.teacher.mode!r}; a rehearsal stands in for fetched pickles")
    encoder, resolution = s.teacher.fetch.encoder, s.teacher.fetch.resolution
    latent = encoder == "StabilityVAEEncoder"
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / "train.tar"
    write_toy_archive(archive, num_classes=NUM_CLASSES, images_per_class=IMAGES_PER_CLASS, size=IMAGE_SIZE,
                      progress=progress)
    channels = 4 if latent else 3
    overlay = {"dataset": {"source": archive.as_uri(), "sha256": sha256_file(archive)}, "teacher": {"fetch": {}},
               "evaluate": {}}
    for role, width, seed in (("main", MAIN_CHANNELS, 1), ("guide", GUIDE_CHANNELS, 2)):
        pkl = out_dir / f"edm2-{role}.pkl"
        net = _teacher(channels, width, resolution, seed)
        with atomic_path(pkl) as tmp:
            edm2_writer.write_edm2_pickle(tmp, net, init_args=(resolution, channels, NUM_CLASSES),
                                          encoder=_encoder(encoder))
        overlay["teacher"]["fetch"].update({role: pkl.as_uri(), f"{role}_sha256": sha256_file(pkl)})
    weights = _save_inception(out_dir)
    overlay["evaluate"]["inception"] = {"weights": weights.as_uri(), "sha256": sha256_file(weights)}
    if latent:
        overlay["evaluate"]["vae"] = str(save_random_vae(out_dir / "vae"))
    with atomic_path(out_dir / "assets.yaml") as tmp:
        Path(tmp).write_text(f"# Rehearsal assets for {preset} (python -m remeanflow rehearsal-assets)\n"
                             + yaml.safe_dump(overlay, sort_keys=False))
    return overlay
