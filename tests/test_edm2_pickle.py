"""EDM2 pickles load into networks.Precond without NVlabs code and without executing anything."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from remeanflow import checkpoints, networks
from remeanflow import edm2_writer as writer
from remeanflow.edm2_pickle import (
    EDM2PickleError,
    PersistentRecord,
    UnsafePickleError,
    build_precond,
    edm2_state_dict,
    load_edm2_pickle,
    safe_load,
)
from remeanflow.fileio import sha256_file

NEW_KEYS = {"unet.emb_noise_t.weight", "unet.emb_noise_r.weight"}


def _net(preset: str, seed: int = 0) -> networks.Precond:
    torch.manual_seed(seed)
    net = networks.build(preset)
    with torch.no_grad():  # non-zero gains so that every weight affects the output
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.5)
    return net.eval()


@pytest.fixture(scope="module")
def tiny() -> networks.Precond:
    return _net("tiny")


def _denoise_inputs(net: networks.Precond, n: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.exp(torch.randn(n, generator=g) * 1.5)
    labels = torch.randint(-1, net.label_dim, (n,), generator=g)
    return x, sigma, labels


# ----------------------------------------------------------------------------------------------
# Round trip.


@pytest.mark.parametrize("preset,protocol", [("tiny", 4), ("toy-16", 5)])
def test_round_trip_is_exact(tmp_path, preset, protocol):
    net = _net(preset)
    path = tmp_path / "snapshot.pkl"
    writer.write_edm2_pickle(path, net, protocol=protocol, dtype=torch.float32)
    assert not {"dnnlib", "torch_utils.persistence", "training.networks_edm2"} & set(sys.modules)

    out = load_edm2_pickle(path)
    loaded = out["net"]
    x, sigma, labels = _denoise_inputs(net)
    with torch.no_grad():
        assert torch.equal(loaded.denoise(x, sigma, labels), net.denoise(x, sigma, labels))
    assert list(loaded.state_dict()) == list(net.state_dict())
    assert list(edm2_state_dict(safe_load(path)["ema"])) == [k for k in net.state_dict() if k not in NEW_KEYS]
    for key in ("unet.emb_noise_t.weight", "unet.emb_noise_r.weight"):
        assert torch.equal(loaded.state_dict()[key], net.state_dict()["unet.emb_noise.weight"])
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert out["init_kwargs"] == json.loads(json.dumps(net.init_kwargs))  # tuples come back as lists
    assert out["encoder"] == {"class_name": "StandardRGBEncoder"}
    assert out["source"] == str(path) and out["sha256"] == sha256_file(path)


def test_fp16_snapshot_equals_rounded_weights(tmp_path, tiny):
    """Published snapshots store every float tensor in fp16, as `ema.to(torch.float16)` does."""
    path = tmp_path / "fp16.pkl"
    writer.write_edm2_pickle(path, tiny)  # default dtype: float16
    raw = safe_load(path)["ema"]
    assert all(t.dtype == torch.float16 for t in edm2_state_dict(raw).values())
    loaded = load_edm2_pickle(path)["net"]
    rounded = copy.deepcopy(tiny).half().float()
    x, sigma, labels = _denoise_inputs(tiny)
    with torch.no_grad():
        assert torch.equal(loaded.denoise(x, sigma, labels), rounded.denoise(x, sigma, labels))
        assert not torch.equal(loaded.denoise(x, sigma, labels), tiny.denoise(x, sigma, labels))


def test_positional_init_args_and_reexport(tmp_path, tiny):
    path = tmp_path / "positional.pkl"
    writer.write_edm2_pickle(path, tiny, init_args=(8, 2, 4), dtype=torch.float32)
    assert safe_load(path)["ema"].state["_init_args"] == (8, 2, 4)
    out = checkpoints.load_edm2_pickle(path)
    assert {k: out["init_kwargs"][k] for k in ("img_resolution", "img_channels", "label_dim")} == dict(
        img_resolution=8, img_channels=2, label_dim=4)
    x, sigma, labels = _denoise_inputs(tiny)
    with torch.no_grad():
        assert torch.equal(out["net"].denoise(x, sigma, labels), tiny.denoise(x, sigma, labels))


# ----------------------------------------------------------------------------------------------
# Nothing from the file runs.


def test_module_src_is_never_executed(tmp_path, tiny):
    marker = tmp_path / "module_src_ran"
    src = f"open({str(marker)!r}, 'w').write('executed')\nraise SystemExit('module_src was executed')\n"
    path = tmp_path / "src.pkl"
    writer.write_edm2_pickle(path, tiny, module_src=src)
    raw = safe_load(path)
    assert isinstance(raw["ema"], PersistentRecord) and raw["ema"].module_src == src
    load_edm2_pickle(path)
    assert not marker.exists()
    # The marker source is live: what EDM2's persistence module would do with it leaves the marker.
    with pytest.raises(SystemExit):
        exec(compile(src, "<module_src>", "exec"), {})
    assert marker.exists()


class Payload:
    """An object that calls `func(*args)` when a normal unpickler loads it."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: str) -> dict:
    return {
        "system": (Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "eval": (Payload(eval, f"open({marker!r}, 'w').close()"), "builtins.eval"),
        "subprocess": (Payload(subprocess.check_call, ["touch", marker]), "subprocess.check_call"),
    }


@pytest.mark.parametrize("kind", ["system", "eval", "subprocess"])
@pytest.mark.parametrize("where", ["top", "inside_network"])
def test_hostile_globals_are_refused(tmp_path, tiny, kind, where):
    marker = tmp_path / "pwned"
    payload, global_name = _payloads(str(marker))[kind]
    data = writer.edm2_data(tiny)
    if where == "top":
        data["loss_fn"] = payload
    else:
        data["ema"].state["_modules"]["unet"].state["label_balance"] = payload
    path = tmp_path / "hostile.pkl"
    writer.dump(path, data)

    expected = rf"{re.escape(str(path))}: refused to load global '{re.escape(global_name)}'"
    for load in (safe_load, load_edm2_pickle):
        with pytest.raises(UnsafePickleError, match=expected) as info:
            load(path)
        assert isinstance(info.value, pickle.UnpicklingError)
    assert not marker.exists()
    # The payload is live: a normal unpickler runs it.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_hostile_tensor_storage_is_refused(tmp_path, tiny):
    """Storage bytes are an inner torch.load; EDM2's loader would run it with weights_only=False."""
    marker = tmp_path / "pwned"
    payload = Payload(torch.storage._load_from_bytes, pickle.dumps(_payloads(str(marker))["system"][0], protocol=2))
    data = writer.edm2_data(tiny)
    data["ema"].state["_buffers"]["extra"] = payload
    path = tmp_path / "storage.pkl"
    writer.dump(path, data)
    with pytest.raises(UnsafePickleError, match=rf"{re.escape(str(path))}.*weights_only"):
        load_edm2_pickle(path)
    assert not marker.exists()
    with pytest.raises(Exception):
        pickle.loads(pickle.dumps(payload))  # torch's own loader runs the payload before failing
    assert marker.exists()


# ----------------------------------------------------------------------------------------------
# Clear errors.


def _not_precond(data):
    data["ema"].class_name = "UNet"


def _no_network(data):
    del data["ema"]


def _unknown_kwarg(data):
    data["ema"].state["_init_kwargs"]["magic_option"] = 3


def _missing_weight(data):
    del data["ema"].state["_modules"]["unet"].state["_parameters"]["out_gain"]


def _wrong_shape(data):
    kwargs = data["ema"].state["_init_kwargs"]
    kwargs["model_channels"] = kwargs["model_channels"] * 2


def _unknown_encoder(data):
    data["encoder"].class_name = "MysteryEncoder"


@pytest.mark.parametrize("mutate,message", [
    (_not_precond, r"'ema' is UNet, expected EDM2's persistent 'Precond'"),
    (_no_network, r"no 'ema' or 'net' entry"),
    (_unknown_kwarg, r"\['magic_option'\] are not supported"),
    (_missing_weight, r"missing \['unet.out_gain'\]"),
    (_wrong_shape, r"do not match|shapes differ"),
    (_unknown_encoder, r"'encoder' is MysteryEncoder"),
])
def test_bad_content_is_named(tmp_path, tiny, mutate, message):
    data = writer.edm2_data(tiny)
    mutate(data)
    path = tmp_path / "bad.pkl"
    writer.dump(path, data)
    with pytest.raises(EDM2PickleError, match=rf"{re.escape(str(path))}: .*{message}"):
        load_edm2_pickle(path)


def test_truncated_and_foreign_files_are_named(tmp_path, tiny):
    good = tmp_path / "good.pkl"
    writer.write_edm2_pickle(good, tiny)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pkl"
    text.write_text("this is not a pickle\n")
    listing = tmp_path / "list.pkl"
    listing.write_bytes(pickle.dumps([1, 2, 3]))
    for path in (truncated, text):
        with pytest.raises(EDM2PickleError, match=rf"{re.escape(str(path))}: not a readable pickle"):
            load_edm2_pickle(path)
    with pytest.raises(EDM2PickleError, match=rf"{re.escape(str(listing))}: top level is a list"):
        load_edm2_pickle(listing)
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_edm2_pickle(tmp_path / "missing.pkl")


# ----------------------------------------------------------------------------------------------
# Encoder settings.


def _plain_floats(values) -> bool:
    return isinstance(values, list) and all(type(v) is float for v in values)


def test_stability_vae_defaults_come_back_plain(tmp_path, tiny):
    """Published img512 pickles record no encoder arguments: settings follow EDM2's defaults."""
    path = tmp_path / "vae.pkl"
    writer.write_edm2_pickle(path, tiny, encoder=writer.stability_vae_encoder())
    enc = load_edm2_pickle(path)["encoder"]
    assert enc["class_name"] == "StabilityVAEEncoder" and enc["vae_name"] == "stabilityai/sd-vae-ft-mse"
    assert enc["raw_mean"] == [5.81, 3.25, 0.12, -2.15] and enc["raw_std"] == [4.17, 4.62, 3.71, 3.28]
    assert enc["final_mean"] == [0.0] * 4 and enc["final_std"] == [0.5] * 4
    assert all(_plain_floats(enc[k]) for k in ("raw_mean", "raw_std", "final_mean", "final_std", "scale", "bias"))
    assert enc["scale"] == pytest.approx([0.5 / s for s in enc["raw_std"]], rel=1e-6)
    assert json.loads(json.dumps(enc)) == enc


def test_stability_vae_recorded_arguments(tmp_path, tiny):
    path = tmp_path / "vae-custom.pkl"
    encoder = writer.stability_vae_encoder("local/vae", [1.0, 2.0, 3.0, 4.0], final_std=0.25, batch_size=2)
    writer.write_edm2_pickle(path, tiny, encoder=encoder)
    enc = load_edm2_pickle(path)["encoder"]
    assert enc["vae_name"] == "local/vae" and enc["batch_size"] == 2
    assert enc["raw_mean"] == [1.0, 2.0, 3.0, 4.0] and enc["final_std"] == [0.25] * 4
    assert enc["bias"] == pytest.approx([-m * 0.25 / s for m, s in zip(enc["raw_mean"], enc["raw_std"])], rel=1e-6)

    # Scale/bias that do not follow from the recorded arguments are refused, not guessed.
    encoder.state["_init_kwargs"] = {}
    writer.write_edm2_pickle(path, tiny, encoder=encoder)
    with pytest.raises(EDM2PickleError, match=rf"{re.escape(str(path))}: encoder scale .* does not follow"):
        load_edm2_pickle(path)


# ----------------------------------------------------------------------------------------------
# Published sizes through the same kwargs path.


def test_edm2_s_img512_kwargs_build_280m_params():
    kwargs = dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=192, dropout=0.0, use_fp16=True)
    with torch.device("meta"):
        net, used = build_precond((), kwargs, source="edm2-img512-s-2147483-0.070.pkl")
    edm2_params = sum(p.numel() for name, p in net.named_parameters() if name not in NEW_KEYS)
    assert round(edm2_params / 1e6, 1) == 280.2
    assert used == kwargs and net.unet.emb_label.weight.shape == (768, 1000)
