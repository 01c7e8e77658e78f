"""The paper-scale rehearsal (presets/rehearsal512.yaml + `remeanflow rehearsal-assets`) and the
checks made before any job (remeanflow/preflight.py).

The rehearsal runs the 512 preset's whole path through real Snakemake on generated assets: a
1000-synset ImageNet-layout tar, NVlabs-format EDM2 img512-architecture pickles fetched through
file:// with sha256 checks, 4x64x64 latents, a diffusers VAE decoding to 512 px, Inception weights in
pytorch-fid's layout and reference statistics from the pipeline's own rule, so FID is computed.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from conftest import REPO, complete_preset, job_counts, run_snakemake, write_config
from PIL import Image
from test_report import chromium, console_messages, parse_page

from remeanflow import config as rmf_config
from remeanflow import (
    edm2_writer,
    networks,
    preflight,
    provenance,
    rehearsal,
    settings,
)
from remeanflow.checkpoints import load_edm2_pickle
from remeanflow.edm2_pickle import EDM2PickleError, check_declared

PRESET = REPO / "presets" / "imagenet512.yaml"
REHEARSAL = REPO / "presets" / "rehearsal512.yaml"

# What the rehearsal may change of presets/imagenet512.yaml: sizes (images, couplings, steps,
# samples, shards, processes, resources), where the assets live, and two CPU concessions.
SIZE_KEYS = {
    "run_name",
    "dataset.preprocess_shards", "dataset.decode_workers",
    "couplings.passes", "couplings.num_shards", "couplings.batch", "couplings.heun_steps",
    "time_embedding.steps", "time_embedding.batch",
    "train.batch_size", "train.checkpoint_every", "train.snapshot_every", "train.window_chunks",
    "train.processes", "train.stage1.iterations", "train.stage2.iterations",  # w_max: the preset's own
    "evaluate.num_samples", "evaluate.batch", "evaluate.fid_samples", "evaluate.shards",
}
ASSET_KEYS = {"dataset.source", "teacher.fetch.main", "teacher.fetch.guide", "evaluate.inception.weights"}
# What the generated overlay (assets.yaml) may set: the asset locations and their checksums.
OVERLAY_KEYS = ASSET_KEYS | {"dataset.sha256", "teacher.fetch.main_sha256", "teacher.fetch.guide_sha256",
                             "evaluate.inception.sha256", "evaluate.vae"}
CPU_CONCESSIONS = {
    "couplings.precision",  # fp16 autocast on a CPU is ~10x slower than fp32
    "evaluate.ref_stats.on_mismatch",  # the rehearsal's reference comes from its own 64 px images
}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "resources":
            out.update(_flat(value, f"{prefix}{key}."))
        elif key != "resources":
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("preset, rehearsal_preset, concessions", [
    (PRESET, REHEARSAL, CPU_CONCESSIONS),
    # pixel space: the reference statistics of the 64 px images are comparable, no concession there
    (REPO / "presets" / "imagenet64.yaml", REPO / "presets" / "rehearsal64.yaml", {"couplings.precision"}),
], ids=["512", "64"])
def test_rehearsal_differs_from_its_preset_only_in_sizes_and_assets(preset, rehearsal_preset, concessions):
    preset, rehearsal_cfg = (yaml.safe_load(p.read_text()) for p in (preset, rehearsal_preset))
    a, b = _flat(preset), _flat(rehearsal_cfg)
    differ = {k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>")}
    allowed = SIZE_KEYS | ASSET_KEYS | concessions
    assert differ <= allowed, f"the rehearsal changes more than sizes and assets: {sorted(differ - allowed)}"
    # every declared difference is one (the lists stay honest), resources are sizes too
    assert differ == allowed, f"listed but equal: {sorted(allowed - differ)}"
    assert set(preset["resources"]) == set(rehearsal_cfg["resources"])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal_assets")
    overlay = rehearsal.write_assets(REHEARSAL, out, progress=False)
    assert set(_flat(overlay)) == OVERLAY_KEYS  # locations and checksums only
    assert yaml.safe_load((out / "assets.yaml").read_text()) == overlay
    return out / "assets.yaml", overlay


def test_assets_are_in_the_formats_the_preset_fetches(assets):
    overlay_file, overlay = assets
    loaded = load_edm2_pickle(overlay["teacher"]["fetch"]["main"].removeprefix("file://"))
    net = loaded["net"]
    assert (net.img_channels, net.img_resolution, net.label_dim) == (4, 64, 1000)
    # the published img512 layout (levels, blocks, attention), only narrower
    narrow = networks.build("edm2-img512-xs", model_channels=rehearsal.MAIN_CHANNELS,
                            channels_per_head=rehearsal.MAIN_CHANNELS)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in narrow.state_dict().items()}
    assert loaded["encoder"]["class_name"] == "StabilityVAEEncoder"
    check_declared(loaded, encoder="StabilityVAEEncoder", resolution=64, role="main")
    with pytest.raises(EDM2PickleError, match=r"teacher\.fetch\.encoder is StandardRGBEncoder.*teacher\.fetch\."
                                              r"resolution is 32"):
        check_declared(loaded, encoder="StandardRGBEncoder", resolution=32, role="main")
    vae = json.loads((Path(overlay["evaluate"]["vae"]) / "config.json").read_text())
    assert vae["latent_channels"] == 4 and 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert preflight.vae_factor(overlay["evaluate"]["vae"]) == 8


@pytest.fixture(scope="module")
def rehearsal_run(assets, tmp_path_factory):
    overlay_file, _ = assets
    workdir = tmp_path_factory.mktemp("rehearsal_run")
    proc = run_snakemake(workdir, None, "--configfile", str(REHEARSAL), str(overlay_file), timeout=1200)
    return workdir / "results" / "rehearsal512", proc.stdout + proc.stderr


@pytest.mark.slow
def test_rehearsal_runs_the_512_path_end_to_end_with_fid(rehearsal_run, assets):
    run, out = rehearsal_run
    _, overlay = assets
    counts = job_counts(out)
    for rule in ("download_dataset", "fetch_teacher", "fetch_inception", "fid_reference_stats", "init_time_embedding",
                 "train_stage1", "train_stage2", "report"):
        assert counts.get(rule) == 1, rule
    assert "train_teacher" not in counts and "toy_source" not in counts
    # the fetched pickles were checked against their sha256 and converted
    side = provenance.read(run / "teacher" / "net.pt")
    assert side["extra"]["main_sha256"] == overlay["teacher"]["fetch"]["main_sha256"]
    for stage in ("stage1", "stage2"):
        metrics = json.loads((run / "eval" / stage / "metrics.json").read_text())
        assert metrics["fid"] is not None and math.isfinite(metrics["fid"]) and metrics["fid"] > 0
        sampled = metrics["sampled"]
        assert sampled["encoder"] == "StabilityVAEEncoder" and sampled["image_shape"] == [3, 512, 512]
        assert sampled["inception_reference"]["resolution"] == 64  # computed by the pipeline from the 64 px images
        assert any("not comparable" in n for n in sampled["notes"]), sampled["notes"]
        assert metrics["grid"]["decoded_by"] == overlay["evaluate"]["vae"]
        with Image.open(run / "eval" / stage / "samples.png") as grid:
            assert grid.height > 512  # decoded 512 px tiles, not 64 px latent channels
    # the 1000-synset archive went through preprocessing: every class is present
    assert len(zarr.open_group(run / "data" / "images.zarr", mode="r").attrs["synsets"]) == 1000


@pytest.mark.slow
def test_rehearsal_report_shows_decoded_512px_grids(rehearsal_run, tmp_path):
    run, _ = rehearsal_run
    page = run / "report" / "index.html"
    text = page.read_text()
    parsed = parse_page(text)
    imgs = [a for tag, a in parsed.tags if tag == "img"]
    sizes = []
    for a in imgs:
        with Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1]))) as im:
            sizes.append(im.size)
    assert any(h > 512 for _, h in sizes), sizes  # the sample grids hold 512 px decoded images
    shot = tmp_path / "shot.png"
    proc = chromium(page.resolve().as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert console_messages(proc.stderr) == []
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert np.any(image < 200, axis=-1).mean() > 0.02


# -- checks before the run ------------------------------------------------------------------------


def _dry(tmp_path, *configs, check=False):
    proc = run_snakemake(tmp_path, None, "-n", "--configfile", *map(str, configs), check=check)
    return proc.returncode, proc.stdout + proc.stderr


def _overlay(tmp_path, name: str, tree: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_the_512_preset_as_shipped_lists_every_missing_item_before_any_job(tmp_path):
    code, out = _dry(tmp_path, PRESET)
    assert code != 0
    for key in ("dataset.source", "evaluate.vae", "evaluate.ref_stats.source"):
        assert f"  - {key}:" in out, key
    assert "3 problems" in out
    for key in ("teacher.fetch.main_sha256", "teacher.fetch.guide_sha256"):  # warnings, not problems
        assert f"  - {key}:" in out
    assert not (tmp_path / "results").exists() and "Job stats" not in out


def test_a_complete_config_dry_runs_clean(tmp_path):
    code, out = _dry(tmp_path, PRESET, complete_preset(tmp_path, "imagenet512"))
    assert code == 0, out[-3000:]
    assert "remeanflow: warnings" not in out and "problem" not in out
    code, out = _dry(tmp_path, write_config(tmp_path))  # the toy default's test config
    assert code == 0 and "remeanflow: warnings" not in out


@pytest.mark.parametrize("change, key, message", [
    ({"evaluate": {"vae": None}}, "evaluate.vae", "StabilityVAEEncoder latents"),
    ({"evaluate": {"vae": "/nonexistent/vae"}}, "evaluate.vae", "not a diffusers AutoencoderKL folder"),
    ({"evaluate": {"inception": {"weights": None}}}, "evaluate.inception.weights", "require_fid is true"),
    ({"evaluate": {"inception": {"weights": "/nonexistent/pt_inception.pth"}}}, "evaluate.inception.weights",
     "does not exist"),
    ({"evaluate": {"ref_stats": {"source": None}}}, "evaluate.ref_stats.source", "64 px images"),
    ({"dataset": {"source": "/nonexistent/train.tar"}}, "dataset.source", "does not exist"),
    ({"dataset": {"source": None}}, "dataset.source", "no dataset"),
    ({"teacher": {"fetch": {"guide": None}}}, "teacher.fetch.guide", "name the EDM2 pickle"),
    ({"train": {"compile": "inductor"}}, "train.compile", "cannot trace the DDP-wrapped model"),
    ({"train": {"batch_size": 100}}, "train.batch_size", "does not split over 8 processes"),
    ({"resources": {"train": {"nodes": 3}}}, "train.batch_size", "does not split over 24 processes"),
])
def test_each_missing_item_stops_the_dry_run_naming_its_key(tmp_path, change, key, message):
    complete = complete_preset(tmp_path, "imagenet512")
    code, out = _dry(tmp_path, PRESET, complete, _overlay(tmp_path, "change", change))
    assert code != 0
    assert f"  - {key}: " in out and message in out, out[-3000:]
    assert "1 problem)" in out and not (tmp_path / "results").exists()


def test_unreadable_source_and_warnings(tmp_path):
    complete = yaml.safe_load(complete_preset(tmp_path, "imagenet512").read_text())
    (tmp_path / "train.tar").chmod(0o000)
    try:
        s = settings.load(_merged(complete))
        report = preflight.check(s, tmp_path / "run")
        if os.geteuid() != 0:  # root reads any file
            assert [f.key for f in report.problems] == ["dataset.source"]
    finally:
        (tmp_path / "train.tar").chmod(0o644)
    # a URL without a checksum is a warning, not a problem; with one it is neither
    s = settings.load(_merged(complete, {"dataset": {"source": "https://example.org/train.tar", "sha256": None}}))
    report = preflight.check(s, tmp_path / "run")
    assert report.problems == [] and [w.key for w in report.warnings] == ["dataset.sha256"]
    s = settings.load(_merged(complete, {"dataset": {"source": "https://example.org/train.tar", "sha256": "a" * 64}}))
    assert preflight.check(s, tmp_path / "run").warnings == []
    # incomparable reference statistics: a warning when asked
    s = settings.load(_merged(complete, {"evaluate": {"ref_stats": {"source": None, "on_mismatch": "warn"}}}))
    report = preflight.check(s, tmp_path / "run")
    assert report.problems == [] and [w.key for w in report.warnings] == ["evaluate.ref_stats.source"]
    assert "512 px" in str(report.warnings[0])
    # a run that already holds the downloaded archive and the fetched teacher needs neither source
    run = tmp_path / "run"
    (run / "data" / "raw").mkdir(parents=True)
    (run / "data" / "raw" / "ILSVRC2012_img_train.tar").write_bytes(b"")
    (run / "teacher").mkdir()
    (run / "teacher" / "net.pt").write_bytes(b"")
    s = settings.load(_merged(complete, {"dataset": {"source": None}, "teacher": {"fetch": {"main": None}}}))
    assert preflight.check(s, run).problems == []


def _merged(*overlays: dict) -> dict:
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    for tree in (yaml.safe_load(PRESET.read_text()), *overlays):
        base = rmf_config.merge(base, tree)
    return rmf_config.validate(base)


def test_fetch_refuses_a_pickle_of_another_kind_than_declared(tmp_path):
    net = networks.build("tiny")
    pkl = tmp_path / "tiny.pkl"
    edm2_writer.write_edm2_pickle(pkl, net)
    loaded = load_edm2_pickle(pkl)
    check_declared(loaded, encoder="StandardRGBEncoder", resolution=8, role="guide")
    with pytest.raises(EDM2PickleError, match=r"teacher\.fetch\.guide.*encoder is StabilityVAEEncoder, the pickle's "
                                              r"encoder is StandardRGBEncoder"):
        check_declared(loaded, encoder="StabilityVAEEncoder", resolution=8, role="guide")


def test_the_64_rehearsal_has_pixel_assets_and_a_clean_dry_run(tmp_path):
    """presets/rehearsal64.yaml: 3-channel img64-architecture pickles with StandardRGBEncoder, no VAE;
    its reference statistics are comparable, so the dry run has nothing to say."""
    rehearsal64 = REPO / "presets" / "rehearsal64.yaml"
    overlay = rehearsal.write_assets(rehearsal64, tmp_path / "assets", progress=False)
    assert "vae" not in overlay["evaluate"] and set(_flat(overlay)) <= OVERLAY_KEYS
    loaded = load_edm2_pickle(overlay["teacher"]["fetch"]["main"].removeprefix("file://"))
    assert (loaded["net"].img_channels, loaded["net"].img_resolution) == (3, 64)
    assert loaded["encoder"]["class_name"] == "StandardRGBEncoder"
    code, out = _dry(tmp_path, rehearsal64, tmp_path / "assets" / "assets.yaml")
    assert code == 0, out[-3000:]
    assert "remeanflow: warnings" not in out
    counts = job_counts(out)
    assert counts["fetch_teacher"] == 1 and counts["fid_reference_stats"] == 1 and counts["evaluate_shard"] == 4


# -- resources.train.gpu_mem_gb: the predicted per-GPU peak of the training step -------------------------------
# The test config's 'tiny' net on 2 GPUs (bf16), per-GPU batch 4. Its stage-1 peak is ~1.6 MB with the
# default train.jvp (tangent) and ~2.9 MB with autograd; 1.4 MB fits neither at batch 4.
TINY_ON_GPUS = {"train": {"processes": 2}, "resources": {"train": {"gpu": 2}}}


def _tiny_settings(jvp: str, gb: float | None = None) -> settings.Settings:
    from conftest import TINY

    tree = yaml.safe_load((REPO / "config.yaml").read_text())
    for overlay in (TINY, TINY_ON_GPUS, {"train": {"jvp": jvp}, "resources": {"train": {"gpu_mem_gb": gb}}}):
        tree = rmf_config.merge(tree, overlay)
    return settings.load(rmf_config.validate(tree))


def test_a_step_that_does_not_fit_gpu_mem_gb_is_refused_naming_the_batch_and_mode(tmp_path):
    """train.jvp: autograd, which needs more than tangent (the dry run below has the other case)."""
    from remeanflow import plan

    jvp, other, relation = "autograd", "tangent", "needs less"
    cache = tmp_path / "cache"
    s = _tiny_settings(jvp=jvp, gb=0.0014)
    report = preflight.check(s, tmp_path / "run", cache_dir=cache)
    assert [f.key for f in report.problems] == ["resources.train.gpu_mem_gb"] * 2  # both stages
    mine = plan.step_memory(s, 1, jvp, 1_400_000, cache)
    theirs = plan.step_memory(s, 1, other, 1_400_000, cache)
    assert mine["peak_bytes"] > 1_400_000 and mine["batch"] == 4
    text = str(report.problems[0])
    assert text.startswith("  - resources.train.gpu_mem_gb: stage 1: ")
    assert f"predicted to need {mine['peak_bytes'] / 2 ** 30:.2f} GiB per GPU" in text
    assert f"train.jvp: {jvp}, per-GPU batch 4 of train.batch_size 8" in text
    fit = f"train.batch_size: {2 * mine['fit_batch']} ({mine['fit_batch']} per GPU x 2 processes" if mine[
        "fit_batch"] else "not even a per-GPU batch of 1 fits"
    assert fit in text and f"train.jvp: {other} {relation} ({theirs['peak_bytes'] / 2 ** 30:.2f} GiB" in text
    assert (theirs["peak_bytes"] < mine["peak_bytes"]) == (relation == "needs less")
    # a card large enough: no problem; no card named: no prediction at all (nothing cached)
    assert preflight.check(_tiny_settings(jvp=jvp, gb=80), tmp_path / "run", cache_dir=cache).problems == []
    before = sorted(cache.iterdir())
    assert preflight.check(_tiny_settings(jvp=jvp), tmp_path / "run", cache_dir=tmp_path / "none").problems == []
    assert not (tmp_path / "none").exists() and sorted(cache.iterdir()) == before


def test_gpu_mem_gb_too_small_stops_the_dry_run_before_any_job(tmp_path):
    config = write_config(tmp_path, rmf_config.merge(TINY_ON_GPUS, {"resources": {"train": {"gpu_mem_gb": 0.0014}}}))
    code, out = _dry(tmp_path, config)
    assert code != 0 and "  - resources.train.gpu_mem_gb: stage 1: the training step is predicted to need" in out
    assert "train.jvp: tangent, per-GPU batch 4" in out and "train.jvp: autograd needs more" in out
    assert "2 problems" in out and not (tmp_path / "results").exists(), out[-3000:]
    assert len(list((tmp_path / ".snakemake" / "remeanflow-step-cost").glob("*.json"))) == 4  # kept for the next
