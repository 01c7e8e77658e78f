"""`python -m remeanflow plan`: the cost plan of the presets and the toy default, from a benchmark
report the test writes (GPU-hours must follow its figures exactly) and from the official code's
figures (marked as such), its JSON output and its errors on bad reports and configs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from remeanflow import accel, networks, plan
from remeanflow.__main__ import main

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import TRAIN_KW, make_couplings, make_teacher, run_meanflow  # noqa: E402

P512, P64 = REPO / "presets" / "imagenet512.yaml", REPO / "presets" / "imagenet64.yaml"
IMAGES = 1_281_167
STAGES = ["preprocess", "teacher fetch", "couplings", "time embedding", "stage 1", "stage 2", "held-out couplings",
          "reference stats", "evaluation"]

# Figures of a made-up GPU, in the layout benchmarks/gpu_bench.py writes.
REF_RATE, FAST_RATE = 20.0, 50.0
STEP = {"reference": {(1, 16): 0.5, (1, 64): 0.9, (2, 16): 0.6, (2, 64): 1.0},
        "fast": {(1, 16): 0.2, (1, 64): 0.3, (2, 16): 0.25, (2, 64): 0.4}}


def bench_report() -> dict:
    train = [dict(stage=stage, batch=batch, **{run: dict(median_s=STEP[run][stage, batch], peak_gib=10.0 + batch)
                                               for run in STEP})
             for stage in (1, 2) for batch in (16, 64)]
    return {
        "format": "remeanflow.gpu-bench/1", "smoke": False, "env": {"device_name": "Made-up GPU"},
        "settings": {"train_preset": "edm2-img512-s"},
        "sampler": {"main_preset": "edm2-img512-s", "guide_preset": "edm2-img512-xs", "heun_steps": 32,
                    "runs": {"reference": {"samples_per_s": REF_RATE}, "fast": {"samples_per_s": FAST_RATE},
                             "fast+cuda-graphs": {"skipped": "no CUDA"}}},
        "train": train, "checks": [{"what": "sampler", "passed": True}],
    }


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "gpu_bench.json"
    path.write_text(json.dumps(bench_report()))
    return path


def run_plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out, err = capsys.readouterr()
    return code, out, err


def json_plan(capsys, *args: str) -> dict:
    code, out, err = run_plan(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def stage(p: dict, name: str) -> dict:
    (found,) = [s for s in p["stages"] if s["name"] == name]
    return found


def flops(preset: str) -> int:
    with torch.device("meta"):
        net = networks.build(preset)
        net.init_time_embedding_()
    return accel.forward_flops(net, 1, "meta")


def test_512_preset_follows_the_benchmark_figures(capsys, bench):
    p = json_plan(capsys, "--configfile", str(P512), "--bench", str(bench))
    assert p["format"] == "remeanflow.plan/1" and p["figures"]["measured"]
    assert str(bench) in p["figures"]["source"] and "not measured here" not in p["figures"]["source"]
    assert [s["name"] for s in p["stages"]] == STAGES
    n = IMAGES * 4
    c = stage(p, "couplings")
    assert p["couplings"] == c["count"] == n and c["jobs"] == 64 + 2 and c["nfe_per_net"] == 63 == p["nfe_per_net"]
    # couplings.fast_path is off in the preset: the workflow samples with the eager reference
    assert c["gpu_hours"] == pytest.approx(n * 63 / (REF_RATE * 63) / 3600, rel=1e-12)
    per = 4 * 64 * 64 * 2 + 4 + 8  # compact store: float16 endpoint, int32 label, int64 id (no noise)
    assert c["bytes_per_coupling"] == per
    shards = [a for a in c["artifacts"] if a["path"].startswith("reflow/couplings/")]
    assert shards[0]["bytes"] == n * per
    # 8 processes of 16 at 50k iterations; train.jvp tangent: the fast step
    for k in (1, 2):
        s = stage(p, f"stage {k}")
        assert (s["processes"], s["count"], s["step_s"]) == (8, 50000, STEP["fast"][k, 16])
        assert s["gpu_hours"] == pytest.approx(50000 * STEP["fast"][k, 16] * 8 / 3600, rel=1e-12)
        assert s["peak_gib"] == 26.0
    params = p["nets"]["main_params"]
    assert 270e6 < params < 290e6 and 115e6 < p["nets"]["guide_params"] < 135e6  # EDM2-S ~280M, XS ~125M
    assert stage(p, "stage 1")["artifacts"][0]["bytes"] == params * 4
    held = stage(p, "held-out couplings")
    assert held["gpu_hours"] == pytest.approx(50000 * 64 / (REF_RATE * 63) / 3600, rel=1e-12)
    assert stage(p, "teacher fetch")["gpu_hours"] is None and stage(p, "preprocess")["count"] == IMAGES
    total = p["totals"]
    assert total["gpu_hours"] == pytest.approx(sum(s["gpu_hours"] or 0 for s in p["stages"]))
    assert total["disk_bytes"] == sum(a["bytes"] or 0 for s in p["stages"] for a in s["artifacts"])
    assert total["jobs"] == sum(s["jobs"] for s in p["stages"])


def test_overlays_merge_in_order_and_choose_the_measured_path(capsys, bench, tmp_path):
    overlay = tmp_path / "more.yaml"
    overlay.write_text(yaml.safe_dump({"couplings": {"fast_path": True, "passes": 1, "store_noise": True},
                                       "train": {"jvp": "autograd", "processes": 2, "batch_size": 64},
                                       "resources": {"train": {"gpu": 2}}}))
    p = json_plan(capsys, "--configfile", str(P512), "--configfile", str(overlay), "--bench", str(bench))
    c = stage(p, "couplings")
    assert c["count"] == IMAGES and c["bytes_per_coupling"] == 4 * 64 * 64 * (4 + 2) + 12  # noise stored again
    assert c["gpu_hours"] == pytest.approx(IMAGES / FAST_RATE / 3600, rel=1e-12)  # the faster fast run
    s1 = stage(p, "stage 1")
    # per-process batch 32 lies between the measured 16 and 64: a straight line through them
    t32 = 0.5 + (32 - 16) * (0.9 - 0.5) / (64 - 16)
    assert s1["processes"] == 2 and s1["step_s"] == pytest.approx(t32)
    assert s1["gpu_hours"] == pytest.approx(50000 * t32 * 2 / 3600)
    assert "interpolated" in s1["gpu_hours_how"]


def test_64_preset_scales_by_flops_and_pixel_shape(capsys, bench):
    p = json_plan(capsys, "--configfile", str(P64), "--bench", str(bench))
    assert p["sample_shape"] == [3, 64, 64] and p["nets"]["main"] == "edm2-img64-s"
    c = stage(p, "couplings")
    assert c["bytes_per_coupling"] == 3 * 64 * 64 * 2 + 12  # compact store, float16 endpoints
    ratio = (flops("edm2-img64-s") + flops("edm2-img64-xs")) / (flops("edm2-img512-s") + flops("edm2-img512-xs"))
    assert c["gpu_hours"] == pytest.approx(IMAGES * 4 / REF_RATE / 3600 * ratio, rel=1e-9)
    assert 0.99 < ratio < 1.0  # only the first and last layers differ (3 vs 4 channels)


def test_without_a_benchmark_the_official_figures_are_used_and_marked(capsys):
    code, out, err = run_plan(capsys, "--configfile", str(P512))
    assert code == 0, err
    assert "from the official code's H200 figures (not measured here)" in out
    for name in STAGES:
        assert name in out
    p = json_plan(capsys, "--configfile", str(P512))
    assert not p["figures"]["measured"] and p["figures"]["source"] == plan.OFFICIAL_SOURCE
    assert stage(p, "couplings")["gpu_hours"] == pytest.approx(IMAGES * 4 / plan.OFFICIAL_COUPLING_SAMPLES_PER_S
                                                                / 3600, rel=1e-12)
    assert stage(p, "stage 1")["gpu_hours"] == pytest.approx(50000 * plan.OFFICIAL_STEP_S[1][16] * 8 / 3600)
    assert stage(p, "stage 2")["gpu_hours"] == pytest.approx(50000 * plan.OFFICIAL_STEP_S[2][16] * 8 / 3600)


def test_toy_default(capsys):
    p = json_plan(capsys)
    assert p["run_name"] == "toy" and p["config_files"] == ["config.yaml"]
    assert p["sample_shape"] == [3, 16, 16] and p["nets"]["main"] == p["nets"]["guide"] == "toy-16"
    assert [s["name"] for s in p["stages"]][1] == "teacher train"
    teacher = stage(p, "teacher train")
    assert teacher["count"] == 600 and teacher["gpu_hours"] is None and "teacher train" in p["totals"][
        "gpu_hours_missing"]
    c = stage(p, "couplings")
    assert c["count"] == 10 * 120 * 2 and c["nfe_per_net"] == 15 and c["jobs"] == 4
    assert stage(p, "preprocess")["jobs"] == 1 + 1 + 2 + 1  # toy_source, download, 2 shards, merge
    assert stage(p, "evaluation")["count"] == 2 * 2000
    assert any("lower bound" in n for n in p["notes"])


def test_random_index_mode_counts_num_samples(capsys, tmp_path):
    overlay = tmp_path / "random.yaml"
    overlay.write_text(yaml.safe_dump({"couplings": {"index_mode": "random", "num_samples": 1000, "num_shards": 2}}))
    p = json_plan(capsys, "--configfile", str(overlay))
    assert stage(p, "couplings")["count"] == 1000


@pytest.mark.parametrize("edit, key", [
    (lambda r: r["sampler"]["runs"].pop("reference"), "sampler.runs.reference"),
    (lambda r: r["sampler"]["runs"]["reference"].update(samples_per_s=-1), "sampler.runs.reference.samples_per_s"),
    (lambda r: r["train"][2]["fast"].pop("median_s"), "train.2.fast.median_s"),
    (lambda r: r.pop("settings"), "settings.train_preset"),
    (lambda r: r.update(format="something/else"), "format"),
    (lambda r: r["checks"].append({"what": "sampler endpoints", "passed": False}), "checks"),
])
def test_bad_benchmark_report_names_file_and_key(capsys, tmp_path, edit, key):
    report = bench_report()
    edit(report)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(report))
    code, out, err = run_plan(capsys, "--configfile", str(P512), "--bench", str(path))
    assert code == 2 and not out
    assert str(path) in err and f"key {key}" in err, err


def test_unreadable_benchmark_and_bad_config(capsys, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    code, _, err = run_plan(capsys, "--bench", str(path))
    assert code == 2 and str(path) in err and "not JSON" in err
    code, _, err = run_plan(capsys, "--bench", str(tmp_path / "missing.json"))
    assert code == 2 and "missing.json" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"couplings": {"heun_stepz": 3}}))
    code, _, err = run_plan(capsys, "--configfile", str(bad))
    assert code == 2 and "couplings.heun_stepz" in err  # the workflow's own validation


def test_step_time_between_and_beyond_the_measured_batches():
    measured = {16: 0.5, 64: 0.9}
    assert plan.step_time(measured, 16) == (0.5, "measured")
    assert plan.step_time(measured, 40)[0] == pytest.approx(0.7)
    assert plan.step_time(measured, 128)[0] == pytest.approx(0.9 + 64 * 0.4 / 48)
    assert plan.step_time({16: 0.5}, 8)[0] == pytest.approx(0.25)
    t, how = plan.step_time({16: 0.5, 64: 10.0}, 1)  # a line that would go below zero
    assert t == pytest.approx(0.5 / 16) and "proportional" in how


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


def test_training_file_sizes_match_the_files_training_writes(capsys, tmp_path):
    """The plan's train_state.pt, checkpoint and net_ema.pt sizes against a real 2-step stage-1 run
    of the 'tiny' net (46k parameters). The tensors are what the plan counts (fp32 model + EMA + two
    Adam moments): within 1% (frozen parameters carry no moments). The files add a container
    overhead per stored tensor (zip entry, pickle record; ~12% of a net this small, far less of a
    real one) plus the config and a digest field: files may exceed the plan by at most 25%."""
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({"teacher": {"mode": "train", "train": {"preset": "tiny"}}}))
    planned_stage = stage(json_plan(capsys, "--configfile", str(overlay)), "stage 1")
    artifacts = {a["path"]: a["bytes"] for a in planned_stage["artifacts"]}
    out, work = tmp_path / "out", tmp_path / "work"
    run_meanflow(manifest=make_couplings(tmp_path / "couplings"), init=make_teacher(tmp_path / "teacher.pt"),
                 out_dir=out, work_dir=work, stage=1, iterations=1 + plan.KEPT_CHECKPOINTS, checkpoint_every=1,
                 **TRAIN_KW)
    written = {"train/stage1/train_state.pt": [out / "train_state.pt"], "train/stage1/net_ema.pt": [out / "net_ema.pt"],
               "train/work/stage1/ckpt-*.pt": sorted(work.glob("ckpt-*.pt"))}
    assert len(written["train/work/stage1/ckpt-*.pt"]) == plan.KEPT_CHECKPOINTS
    for path, files in written.items():
        planned = artifacts[path]
        tensors = sum(_tensor_bytes(torch.load(f, map_location="cpu", weights_only=True)) for f in files)
        size = sum(f.stat().st_size for f in files)
        assert abs(tensors - planned) <= 0.01 * planned, (path, tensors, planned)
        assert planned <= size <= 1.25 * planned, (path, size, planned)


# -- predicted per-GPU memory and FLOPs (`--gpu-mem`, `--memory`) ------------------------------------------------
# The 'tiny' net on 2 GPUs at a global batch of 8: per-GPU batch 4, bf16 (resources.train.gpu > 0).
TINY_GPU = {"teacher": {"mode": "train", "train": {"preset": "tiny"}}, "train": {"batch_size": 8, "processes": 2},
            "resources": {"train": {"gpu": 2}}}
TINY_BUDGET = 4_000_000  # bytes: per-GPU batch 4 fits, 64 does not (stage 1 tangent: ~24, autograd: ~6)


@pytest.fixture
def tiny_gpu(tmp_path, monkeypatch):
    """The tiny-net config, with the working directory in tmp_path (the cache lands there)."""
    path = tmp_path / "tiny_gpu.yaml"
    path.write_text(yaml.safe_dump(TINY_GPU))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def counted(monkeypatch):
    """Counts the fake steps run (largest_batch calls the module's measure_step too)."""
    from remeanflow import step_cost

    calls, measure = [], step_cost.measure_step
    monkeypatch.setattr(step_cost, "measure_step", lambda *a, **k: calls.append(a) or measure(*a, **k))
    return calls


def test_gpu_mem_shows_the_peak_and_the_largest_batch_of_both_jvp_modes(capsys, tiny_gpu):
    from remeanflow import step_cost

    code, out, err = run_plan(capsys, "--configfile", str(tiny_gpu), "--gpu-mem", f"{TINY_BUDGET / 1e9}GB")
    assert code == 0, err
    assert "mem/GPU" in out and "roofline on H200 (989 TFLOP/s dense bf16)" in out
    p = json_plan(capsys, "--configfile", str(tiny_gpu), "--gpu-mem", f"{TINY_BUDGET / 1e9}GB")  # cached: fast
    train = plan.load_settings([tiny_gpu]).train
    for k in (1, 2):
        m = stage(p, f"stage {k}")["train_memory"]
        assert m["processes"] == 2 and m["configured"] == "tangent" and set(m["modes"]) == {"tangent", "autograd"}
        for jvp, mode in m["modes"].items():
            assert mode["batch"] == 4 and mode["precision"] == "bf16" and mode["budget_bytes"] == TINY_BUDGET
            assert mode["peak_bytes"] <= TINY_BUDGET and mode["fit_batch"] >= 4
            assert mode["fit_peak_bytes"] <= TINY_BUDGET
            assert f"largest per-GPU batch that fits: {mode['fit_batch']} (train.batch_size {2 * mode['fit_batch']}" \
                in out
    # against step_cost called directly (stage 1: the search and the step at the configured batch)
    for jvp, mode in stage(p, "stage 1")["train_memory"]["modes"].items():
        direct = step_cost.largest_batch("tiny", TINY_BUDGET, jvp, "bf16", stage=1, settings=train)
        at_batch = step_cost.measure_step("tiny", 4, jvp=jvp, precision="bf16", stage=1, settings=train)
        assert (mode["fit_batch"], mode["fit_peak_bytes"]) == (direct.batch, direct.cost.peak_cuda_bytes), jvp
        assert (mode["peak_bytes"], mode["flops"]) == (at_batch.peak_cuda_bytes, at_batch.flops), jvp
        assert mode["roofline"]["seconds"] == pytest.approx(at_batch.flops / 989e12)
    modes = stage(p, "stage 1")["train_memory"]["modes"]
    assert modes["tangent"]["fit_batch"] > modes["autograd"]["fit_batch"]  # the double backward keeps more


def test_predictions_are_cached_in_the_working_directory(capsys, tiny_gpu, counted):
    p = json_plan(capsys, "--configfile", str(tiny_gpu), "--memory", "--gpu-model", "A100")
    assert len(counted) == 4  # 2 stages x 2 jvp modes, one step each (no card memory: no search)
    assert len(list(Path(".snakemake/remeanflow-step-cost").glob("*.json"))) == 4
    mode = stage(p, "stage 1")["train_memory"]["modes"]["tangent"]
    assert "fit_batch" not in mode and mode["roofline"]["card"] == "A100"
    assert mode["roofline"]["seconds"] == pytest.approx(mode["flops"] / 312e12)
    again = json_plan(capsys, "--configfile", str(tiny_gpu), "--memory", "--gpu-model", "A100")
    assert len(counted) == 4 and again == p  # all four read back
    s = plan.load_settings([tiny_gpu])
    assert plan.step_memory(s, 1, "tangent") == {k: v for k, v in mode.items() if k != "roofline"}
    assert len(counted) == 4
    bigger = dataclasses.replace(s, train=dataclasses.replace(s.train, batch_size=12))
    assert plan.step_memory(bigger, 1, "tangent")["batch"] == 6 and len(counted) == 5  # another key: measured


def test_gpu_mem_from_the_resources_and_bad_values(capsys, tiny_gpu, counted, monkeypatch):
    """resources.train.gpu_mem_gb asks for the prediction like --gpu-mem; plain plan predicts nothing."""
    json_plan(capsys, "--configfile", str(tiny_gpu))
    assert counted == []
    asked = []
    monkeypatch.setattr(plan, "step_memory", lambda s, stage, jvp, budget, cache: asked.append(budget) or dict(
        stage=stage, jvp=jvp, batch=4, precision="bf16", budget_bytes=budget, peak_bytes=1, flops=1, fit_batch=1,
        fit_peak_bytes=1))
    overlay = Path("mem.yaml")
    overlay.write_text(yaml.safe_dump({"resources": {"train": {"gpu_mem_gb": 2.5}}}))
    json_plan(capsys, "--configfile", str(tiny_gpu), "--configfile", str(overlay))
    assert asked == [2_500_000_000] * 4
    json_plan(capsys, "--configfile", str(tiny_gpu), "--configfile", str(overlay), "--gpu-mem", "1GiB")
    assert asked[4:] == [2 ** 30] * 4  # the command line wins
    assert plan.parse_gpu_mem("80GiB") == 80 * 2 ** 30 and plan.parse_gpu_mem("80 gb") == plan.parse_gpu_mem("80") \
        == 80_000_000_000
    for bad in ("80TB", "-1GB", "0", "lots"):
        code, _, err = run_plan(capsys, "--configfile", str(tiny_gpu), f"--gpu-mem={bad}")
        assert code == 2 and "--gpu-mem" in err, bad
    code, _, err = run_plan(capsys, "--configfile", str(tiny_gpu), "--memory", "--gpu-model", "Voodoo5")
    assert code == 2 and "--gpu-model 'Voodoo5'" in err and "H200" in err
