"""Tests of remeanflow.vae: undoing EDM2's latent scaling and decoding with a real (tiny, randomly
initialised) diffusers AutoencoderKL saved to disk, and sharded evaluation of a latent net."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny_vae

from remeanflow import checkpoints, evaluate, networks, reference_stats, sampling, vae

diffusers = pytest.importorskip("diffusers", reason="the 'vae' extra (diffusers) is not installed")

# EDM2's StabilityVAEEncoder defaults, as `edm2_pickle.encoder_settings` records them (without the
# derived scale/bias, which `vae.latent_scaling` must then derive itself).
SETTINGS = dict(class_name="StabilityVAEEncoder", vae_name="stabilityai/sd-vae-ft-mse",
                raw_mean=[5.81, 3.25, 0.12, -2.15], raw_std=[4.17, 4.62, 3.71, 3.28],
                final_mean=[0.0] * 4, final_std=[0.5] * 4, batch_size=8)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """The tiny VAE of `conftest.save_tiny_vae`."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


def test_raw_latents_undo_edm2_scaling():
    z = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    raw = vae.raw_latents(z, SETTINGS)
    mean, std = torch.tensor(SETTINGS["raw_mean"]), torch.tensor(SETTINGS["raw_std"])
    # docs/method.md / EDM2 decode: raw = (z - final_mean) / final_std * raw_std + raw_mean, no 0.18215.
    torch.testing.assert_close(raw, z / 0.5 * std.view(1, 4, 1, 1) + mean.view(1, 4, 1, 1), rtol=1e-5, atol=1e-5)
    # ... the exact inverse of EDM2's encode_latents (raw * scale + bias, float32).
    scale, bias = vae.latent_scaling(SETTINGS)
    torch.testing.assert_close(raw * scale.view(1, 4, 1, 1) + bias.view(1, 4, 1, 1), z, rtol=1e-5, atol=1e-5)
    # Stored scale/bias (as the pickle loader records them) take precedence and agree.
    stored = dict(SETTINGS, scale=scale.tolist(), bias=bias.tolist(), raw_mean=[0.0] * 4)
    torch.testing.assert_close(vae.raw_latents(z, stored), raw)
    with pytest.raises(ValueError, match=r"latents must be \[N, 4, H, W\]"):
        vae.raw_latents(z[:, :3], SETTINGS)
    with pytest.raises(ValueError, match="needs StabilityVAEEncoder"):
        vae.latent_scaling({"class_name": "StandardRGBEncoder"})
    with pytest.raises(ValueError, match=r"lack \['raw_std'\]"):
        vae.latent_scaling({k: v for k, v in SETTINGS.items() if k != "raw_std"})


def test_decode_latents_matches_the_vae(vae_dir):
    model = vae.load_vae(vae_dir, device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    z = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.5
    pixels = vae.decode_latents(model, z, SETTINGS, batch_size=2)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 8, 8)
    with torch.inference_mode():
        want = model.decode(vae.raw_latents(z, SETTINGS)).sample.clamp(0, 1).mul(255).to(torch.uint8)
    # Batches of 2 versus one of 5: the same up to a truncation step where roundoff crosses an integer.
    assert (pixels.int() - want.int()).abs().max() <= 1 and (pixels == want).float().mean() > 0.99
    assert 0 < pixels.float().mean() < 255 and len(pixels.unique()) > 50  # not stuck at the clamp
    # make_decoder gives the same function, loaded from the folder.
    np.testing.assert_array_equal(vae.make_decoder(SETTINGS, vae_dir, device="cpu")(z), pixels)
    with pytest.raises(ValueError, match="takes 4-channel latents, the net makes 3"):
        vae.decode_latents(model, z[:, :3], SETTINGS)


def test_decoder_errors_and_pixel_nets(vae_dir, tmp_path):
    x = torch.tensor([[[[-1.0, 0.0, 1.0, 2.0]]]]).expand(1, 3, 1, 4)
    assert vae.make_decoder(None)(x)[0, 0, 0].tolist() == [0, 128, 255, 255]  # EDM2 StandardRGBEncoder.decode
    assert vae.make_decoder({"class_name": "StandardRGBEncoder"})(x).dtype == torch.uint8
    with pytest.raises(ValueError, match="set evaluate.vae"):
        vae.make_decoder(SETTINGS, None)
    with pytest.raises(ValueError, match="unknown encoder 'Other'"):
        vae.make_decoder({"class_name": "Other"})
    # Only local folders: a hub name is not looked up.
    with pytest.raises(FileNotFoundError, match="stabilityai/sd-vae-ft-mse has no config.json"):
        vae.load_vae("stabilityai/sd-vae-ft-mse")
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        vae.load_vae(tmp_path / "empty")


def test_sample_shard_of_a_latent_net_decodes_through_the_vae(vae_dir, tmp_path):
    torch.manual_seed(3)
    net = networks.build("tiny", img_channels=4)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)  # zero-initialised gains: make the output depend on the input
    net_path = tmp_path / "latent.pt"
    checkpoints.save_net(net_path, net, encoder=SETTINGS)
    common = dict(num_shards=2, num_samples=6, seed=9, num_classes=4, batch=2, device="cpu", progress=False)
    parts = [tmp_path / f"s{k}.npz" for k in range(2)]
    for k, part in enumerate(parts):
        attrs = evaluate.sample_shard(net_path, part, shard=k, vae_path=vae_dir, pixel_resolution=4, **common)
    assert attrs["image_shape"] == [3, 16, 16] and attrs["features"] == {"pixels": 48}
    assert attrs["encoder"] == "StabilityVAEEncoder" and attrs["sample_ids"] == [3, 6]

    # The features are those of the decoded one-step samples, area-downsampled to 4 px.
    merged = evaluate.merge_shards(parts, 6)
    ids = np.arange(6)
    noise = sampling.per_sample_noise(9, ids, (4, 8, 8))
    labels = sampling.per_sample_labels(9, ids, 4)
    with torch.inference_mode():
        pixels = vae.make_decoder(SETTINGS, vae_dir)(sampling.one_step(net.eval(), noise, labels))
    np.testing.assert_allclose(merged.features["pixels"], reference_stats.pixel_features(pixels, 4), atol=2 / 127.5)
    assert np.array_equal(merged.labels, labels.numpy())

    # Without a VAE: nothing to compare in pixels (noted), and FID (Inception) is impossible.
    alone = evaluate.sample_shard(net_path, tmp_path / "novae.npz", shard=0, **common)
    assert alone["features"] == {} and "no VAE is configured" in alone["notes"][0]
    with pytest.raises(ValueError, match="set evaluate.vae"):
        evaluate.sample_shard(net_path, tmp_path / "x.npz", shard=0, inception_weights=tmp_path / "w.pth", **common)
    assert not (tmp_path / "x.npz").exists()
