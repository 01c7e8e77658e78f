"""Tests of remeanflow.inception: the FID InceptionV3 against pytorch-fid, weights loading, features.

InceptionV3 costs ~0.3 s per image on one CPU thread, so every test here uses a handful of small
images, and the random weights and features are built once per module. FID's properties (0 for a
set against itself, growing with a shift) are tested on features in test_fid.py: a Fréchet
distance between 2048-d statistics costs seconds, and the workflow tests compute real ones.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from remeanflow import inception
from remeanflow.fileio import sha256_file
from remeanflow.rehearsal import random_inception  # noqa: F401  (other tests import it from here)


def smooth_images(seed: int, n: int, size: int = 24) -> torch.Tensor:
    """uint8 RGB images with structure at several scales (upsampled noise), not white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g)
    fine = torch.rand(n, 3, size, size, generator=g)
    x = 0.8 * torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") + 0.2 * fine
    return (x * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights saved as a torch.hub-style file whose name carries its sha256 prefix."""
    root = tmp_path_factory.mktemp("inception")
    model = random_inception(0)
    tmp = root / "weights.pth"
    torch.save(model.state_dict(), tmp)
    path = root / f"pt_inception-test-{sha256_file(tmp)[:8]}.pth"
    os.replace(tmp, path)
    return path, model


@pytest.fixture(scope="module")
def features(weights):
    """The loaded model, 4 images and their features (in batches of 3 and 1)."""
    path, _ = weights
    model = inception.load_inception(path, device="cpu")
    images = smooth_images(1, 4)
    return model, images, inception.extract_features(model, images, batch=3)


def test_features_match_pytorch_fid_with_the_same_weights(weights, pytorch_fid):
    path, ours = weights
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(2))  # non-square: resize path
    u8 = smooth_images(3, 2, size=32)
    theirs = pytorch_fid("""
        # pytorch-fid downloads its weights in fid_inception_v3(); hand it ours instead. Its own
        # strict load_state_dict then proves that the parameter names and shapes are identical.
        state = torch.load(str(inputs["weights"]), weights_only=True)
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state
        reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
        outputs["names"] = np.array(sorted(pfi.fid_inception_v3().state_dict()))
        with torch.inference_mode():
            outputs["float"] = reference(torch.from_numpy(inputs["x"]))[0].flatten(1).numpy()
            # its own loader's ToTensor(): uint8 / 255
            outputs["uint8"] = reference(torch.from_numpy(inputs["u8"]).float() / 255)[0].flatten(1).numpy()
    """, weights=np.array(str(path)), x=x.numpy(), u8=u8.numpy())
    assert theirs["names"].tolist() == sorted(ours.state_dict())
    want = torch.from_numpy(theirs["float"])
    with torch.inference_mode():
        got = inception.load_inception(path, device="cpu")(x)
    assert want.abs().max() > 1  # the features are far from vanishing, so the comparison has teeth
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # uint8 input through the project's helper equals pytorch-fid fed x / 255.
    np.testing.assert_allclose(inception.extract_features(ours, u8), theirs["uint8"], rtol=1e-5, atol=1e-5)


def test_architecture_has_the_fid_blocks_and_parameter_names(weights):
    _, model = weights
    state = model.state_dict()
    assert len(state) == 566 and sum(p.numel() for p in model.parameters()) == 23_850_960
    assert state["fc.weight"].shape == (1008, 2048) and "AuxLogits.fc.weight" not in state
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert model.Mixed_5b.branch_pool.bn.eps == 1e-3
    # The FID graph's pooling: padding excluded from averages, max pool in the last block.
    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(inception._tf_avg_pool(x), x)
    assert model.Mixed_7b.pool is inception._tf_avg_pool and model.Mixed_7c.pool is inception._max_pool_same


def test_load_inception_checks_files_strictly(weights, tmp_path):
    path, model = weights
    loaded = inception.load_inception(path, sha256=sha256_file(path), device="cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    with pytest.raises(ValueError, match=r"sha256 is [0-9a-f]{64}, expected 0{64}"):
        inception.load_inception(path, sha256="0" * 64)
    renamed = tmp_path / "pt_inception-2015-12-05-6726825d.pth"  # a hash in the name that does not match
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="does not start with 6726825d"):
        inception.load_inception(renamed)

    state = model.state_dict()
    cases = {
        "missing.pth": ({k: v for k, v in state.items() if k != "Mixed_6b.branch7x7_2.conv.weight"},
                        r"missing keys \['Mixed_6b.branch7x7_2.conv.weight'\]"),
        "extra.pth": ({**state, "AuxLogits.fc.weight": torch.zeros(1008, 768)},
                      r"unexpected keys \['AuxLogits.fc.weight'\]"),
        "shape.pth": ({**state, "fc.weight": torch.zeros(1000, 2048)}, r"fc.weight \(1000, 2048\) vs \(1008, 2048\)"),
        "list.pth": ([1, 2, 3], "expected a state_dict"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=message) as err:
            inception.load_inception(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match="not a readable PyTorch state_dict"):
        inception.load_inception(tmp_path / "text.pth")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        inception.load_inception(tmp_path / "nothere.pth")


def test_load_inception_from_a_url_uses_the_cache(weights, tmp_path):
    path, _ = weights
    with pytest.raises(ValueError, match="cache_dir"):
        inception.load_inception(path.as_uri())
    cache = tmp_path / "cache"
    inception.load_inception(path.as_uri(), cache_dir=cache, device="cpu")
    cached = cache / path.name
    assert cached.is_file() and sha256_file(cached) == sha256_file(path)
    stamp = cached.stat().st_mtime_ns
    inception.load_inception(path.as_uri(), cache_dir=cache, device="cpu")
    assert cached.stat().st_mtime_ns == stamp  # reused, not fetched again

    # fetch_weights keeps nothing that failed its checks.
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, bad)
    dest = tmp_path / "fetched" / "inception.pth"
    with pytest.raises(ValueError, match="failed its check: .*missing keys"):
        inception.fetch_weights(bad.as_uri(), dest, progress=False)
    assert not dest.exists() and not dest.with_name("inception.pth.sha256").exists()
    assert inception.fetch_weights(path, dest, progress=False) == sha256_file(path)


def test_extract_features_conventions(features):
    model, images, base = features
    assert base.shape == (4, 2048) and base.dtype == np.float32 and np.isfinite(base).all()
    # Float images in [-1, 1] are quantised exactly as samples written to disk: same features.
    as_float = images.float() / 127.5 - 1
    np.testing.assert_array_equal(inception.to_uint8(as_float), images)
    np.testing.assert_allclose(inception.extract_features(model, as_float, batch=4), base, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        direct = model(images[:1].float() / 255).numpy()
    np.testing.assert_allclose(base[:1], direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        inception.extract_features(model, images[:, :1])
    with pytest.raises(ValueError, match="uint8 or floating point"):
        inception.extract_features(model, images.int())
