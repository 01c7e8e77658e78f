"""Speed helpers (`remeanflow.accel`) and the benchmark scripts.

The helpers are checked against the plain paths they replace (same numbers, up to rounding); the
benchmarks run for real as subprocesses in their smallest configurations, and their JSON is
checked for content and for the numerics checks they must make (including that a check fails
when the tolerance cannot be met). No timing is asserted here: speed claims live in the JSON.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from remeanflow import accel, meanflow, misc, networks, sampling, train_loss

BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("gpu_bench")


@pytest.fixture(scope="module")
def train_step():
    return _load("train_step")


def _net(train_step, preset: str, seed: int, dtype=torch.float32) -> networks.Precond:
    torch.manual_seed(seed)
    net = train_step.nonzero_gains_(networks.build(preset)).to(dtype)
    net.init_time_embedding_()
    return net


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


# ----------------------------------------------------------------------------------------------
# accel: each fast path against the plain one.


def test_sdpa_attention_matches_edm2_attention(train_step):
    net = _net(train_step, "toy-16", 0, torch.float64)
    blocks = [m for m in net.modules() if isinstance(m, networks.Block) and m.num_heads]
    x = torch.randn(3, blocks[0].out_channels, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain, _ = blocks[0]._attention(x)
    assert accel.use_sdpa_attention(net) == len(blocks) > 0
    fused, no_tangent = blocks[0]._attention(x)
    assert no_tangent is None
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no tangent rule"):
        blocks[0]._attention(x, torch.ones_like(x))
    assert accel.use_sdpa_attention(net, enable=False) == len(blocks)
    assert "_attention" not in vars(blocks[0])  # back to the class's einsum form
    # and through the whole net
    xt, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([0.3, 0.9], dtype=torch.float64)
    u_plain = net(xt, t, t * 0.5, torch.tensor([1, -1]))
    accel.use_sdpa_attention(net)
    torch.testing.assert_close(net(xt, t, t * 0.5, torch.tensor([1, -1])), u_plain, rtol=1e-12, atol=1e-12)


def test_channels_last_net_same_output(train_step):
    net = _net(train_step, "toy-16", 0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7])
    plain = net(x, t, t, torch.tensor([0, 5]))
    accel.to_channels_last(net)
    weight = net.unet.enc["16x16_conv"].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    out = net(accel.channels_last(x), t, t, torch.tensor([0, 5]))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_fast_sampler_matches_edm_heun(train_step):
    main, guide = _net(train_step, "toy-16", 0).eval(), _net(train_step, "toy-16-xs", 1).eval()
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 7, -1])
    ref = sampling.edm_heun(main, noise, labels, num_steps=3, guide=guide, guidance=2.1)
    denoiser = accel.FastDenoiser(copy.deepcopy(main), copy.deepcopy(guide), 2.1, precision="fp32", backend=None)
    out = accel.fast_edm_heun(denoiser, noise, labels, num_steps=3)
    assert accel.relative_error(out, ref) < 1e-4
    # the guidance really is inside the denoiser: without the guide the endpoints differ
    unguided = accel.FastDenoiser(copy.deepcopy(main), None, 1.0, precision="fp32", backend=None)
    assert accel.relative_error(accel.fast_edm_heun(unguided, noise, labels, num_steps=3), ref) > 1e-2
    with pytest.raises(ValueError, match="one-hot"):
        denoiser.denoise(noise, torch.ones(3), labels)


@pytest.mark.parametrize("jvp", ["tangent", "forward", "autograd"])
@pytest.mark.parametrize("stage", [1, 2])
def test_loss_fn_is_the_eager_loss(train_step, jvp, stage):
    net = _net(train_step, "tiny", 0).train()
    inputs, guidance = train_step.make_batch(net, 4, stage, seed=3, w_max=2.5, device="cpu")
    ref = meanflow.meanflow_loss_terms(net, **inputs, **guidance, jvp=jvp)
    out = train_loss.meanflow_loss_fn(net, jvp=jvp)(**inputs, **guidance)
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.e, ref.e)
    assert out.loss.requires_grad


def test_compiled_stage2_loss_takes_the_guidance_scale_as_an_input(train_step):
    # Stage 2 draws w' every step: a graph specialised on its value would recompile every step.
    net = _net(train_step, "tiny", 0).train()
    loss_fn = train_loss.meanflow_loss_fn(net, backend="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for seed, w_max in [(3, 2.5), (4, 3.0), (5, 4.0)]:
        inputs, guidance = train_step.make_batch(net, 4, 2, seed=seed, w_max=w_max, device="cpu")
        ref = meanflow.meanflow_loss_terms(net, **inputs, **guidance)
        torch.testing.assert_close(loss_fn(**inputs, **guidance).loss, ref.loss, rtol=1e-6, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    inputs, _ = train_step.make_batch(net, 4, 1, seed=6, w_max=2.0, device="cpu")
    torch.testing.assert_close(loss_fn(**inputs).loss, meanflow.meanflow_loss_terms(net, **inputs).loss,
                               rtol=1e-6, atol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # stage 1: its own graph, once


def test_loss_fn_rejects_what_cannot_work(train_step):
    net = _net(train_step, "tiny", 0)
    with pytest.raises(ValueError, match="cannot be captured"):
        train_loss.meanflow_loss_fn(net, jvp="autograd", backend="inductor")
    with pytest.raises(ValueError, match="precision"):
        train_loss.meanflow_loss_fn(net, precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        accel.compile_fn(lambda x: x, backend="no-such-backend")
    with pytest.raises(ValueError, match="CUDA"):
        accel.CudaGraphCall(lambda x: x * 2, [torch.ones(2)])


def test_forward_flops_match_the_measured_edm2_figures():
    """benchmarks/README.md (torch FLOP counter on the paper's nets, 64x64, batch 1): S 201.6, XS 89.9 GFLOP,
    18.4 TFLOP per coupling with 32 Heun steps. Counted here on the meta device (no compute)."""
    with torch.device("meta"):
        s, xs = networks.build("edm2-img512-s"), networks.build("edm2-img512-xs")
    flops_s, flops_xs = accel.forward_flops(s, 1, "meta"), accel.forward_flops(xs, 1, "meta")
    assert flops_s / 1e9 == pytest.approx(201.6, rel=1e-3)
    assert flops_xs / 1e9 == pytest.approx(89.9, rel=1e-3)
    assert misc.heun_nfe(32) == 63
    assert misc.heun_nfe(32) * (flops_s + flops_xs) / 1e12 == pytest.approx(18.4, rel=3e-3)


def test_relative_error():
    ref = torch.ones(2, 3)
    assert accel.relative_error(ref.clone(), ref) == 0
    bad = ref.clone()
    bad[1, 0] = 2  # second sample: ||(1, 0, 0)|| / ||(1, 1, 1)||
    assert accel.relative_error(bad, ref) == pytest.approx(1 / 3**0.5)
    assert accel.relative_error(torch.full((2, 3), float("nan")), ref) == float("inf")
    with pytest.raises(ValueError, match="shapes"):
        accel.relative_error(torch.ones(2, 4), ref)


def test_peak_tflops_by_device_name(bench):
    assert bench.peak_tflops("NVIDIA H200", None)[0] == 989
    assert bench.peak_tflops("NVIDIA H200 NVL", None)[0] == 835
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989
    assert bench.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312
    assert bench.peak_tflops("NVIDIA L4", None)[0] is None
    assert bench.peak_tflops("NVIDIA L4", 121.0) == (121.0, "--peak-tflops")
    with pytest.raises(ValueError, match="peak"):
        bench.peak_tflops("NVIDIA H200", -1.0)


# ----------------------------------------------------------------------------------------------
# The scripts, for real.


@pytest.mark.slow
def test_gpu_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    proc = _run("gpu_bench.py", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["format"] == "remeanflow.gpu-bench/1" and report["smoke"] and report["passed"]
    assert report["env"]["torch"] == torch.__version__

    sampler = report["sampler"]
    assert (sampler["heun_steps"], sampler["nfe_per_net"], sampler["batch"]) == (2, 3, 4)
    with torch.device("meta"):
        flops = [accel.forward_flops(networks.build(p), 1, "meta") for p in ("toy-16", "toy-16-xs")]
    assert sampler["flops_per_forward"] == dict(main=flops[0], guide=flops[1])
    assert sampler["flops_per_sample"] == 3 * sum(flops)
    ref, fast = sampler["runs"]["reference"], sampler["runs"]["fast"]
    assert ref["precision"] == "fp32" and fast["precision"] == "bf16" and fast["compile"] == "eager"
    assert fast["channels_last"] and fast["sdpa"]
    for run in (ref, fast):
        assert run["samples_per_s"] == pytest.approx(4 / run["median_s"])
    # bf16 against fp32 really differs, but within the tolerance
    assert 0 < fast["rel_err"] <= report["settings"]["sampler_rtol"]
    assert "CUDA" in sampler["runs"]["fast+cuda-graphs"]["skipped"]

    train = report["train"]
    assert sorted((e["stage"], e["batch"]) for e in train) == [(1, 2), (1, 4), (2, 2), (2, 4)]
    for entry in train:
        assert entry["reference"]["jvp"] == "autograd" and entry["fast"]["jvp"] == "tangent"
        assert entry["fast"]["compile"] == "eager" and entry["fast"]["precision"] == "bf16"
        assert len(entry["fast"]["times_s"]) == 2 and entry["speedup"] > 0
        assert 0 < entry["loss_rel_diff"] <= report["settings"]["loss_rtol"]
        assert (entry["w_pi"] == 1.0) == (entry["stage"] == 1)
    # the coupling job's own generate function, fast path off and on, checked like the fast run
    eager, piped = sampler["runs"]["pipeline-eager"], sampler["runs"]["pipeline-fast"]
    assert eager["rel_err"] == 0 and not eager["fast_path"]  # the reference's own computation
    assert piped["fast_path"] and 0 < piped["rel_err"] <= report["settings"]["sampler_rtol"]
    assert len(report["checks"]) == 3 + len(train) and all(c["passed"] for c in report["checks"])
    assert report["targets"] and all(t["passed"] is None for t in report["targets"])  # smoke: not applicable


@pytest.mark.slow
def test_gpu_bench_fails_loudly_out_of_tolerance(tmp_path):
    out = tmp_path / "fail.json"
    proc = _run("gpu_bench.py", "--smoke", "--compile-backend", "none", "--stages", "1", "--train-batches", "2",
                "--sampler-rtol", "1e-9", "--loss-rtol", "1e-9", "--json", str(out))
    assert proc.returncode == 1
    assert "ERROR: sampler fast endpoints" in proc.stderr and "ERROR: stage 1 batch 2: first-step loss" in proc.stderr
    report = json.loads(out.read_text())
    assert "ERROR: sampler pipeline-fast endpoints" in proc.stderr
    assert not report["passed"] and len(report["failures"]) == 3  # fast, pipeline-fast, the training loss
    assert report["settings"]["compile_backend"] is None


@pytest.mark.slow
def test_train_step_benchmark(tmp_path):
    out = tmp_path / "train_step.json"
    proc = _run("train_step.py", "--preset", "tiny", "--batch", "3", "--repeats", "1", "--stage", "2", "--threads", "1",
                "--modes", "tangent", "forward", "--compile", "--compile-backend", "eager", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["format"] == "remeanflow.train-step-bench/3" and report["passed"]
    (result,) = report["results"]
    runs = result["runs"]
    assert result["stage"] == 2
    assert list(runs) == ["autograd", "tangent", "forward", "tangent+compile", "forward+compile"]
    assert [runs[name]["mode"] for name in runs] == ["autograd", "tangent", "forward", "tangent", "forward"]
    assert [runs[name]["compiled"] for name in runs] == [False, False, False, True, True]
    assert runs["autograd"]["speedup"] == 1.0
    for name, run in runs.items():
        assert run["speedup"] > 0 and run["loss_ok"] and run["loss_rel_diff"] <= report["args"]["loss_rtol"], name
        assert run["w_pi"] == runs["autograd"]["w_pi"] > 1  # stage 2: one guidance scale for all modes
        assert len(run["times_s"]) == 1 and run["threads"] == 1


@pytest.mark.slow
def test_train_step_benchmark_fails_out_of_tolerance(tmp_path):
    """bf16 modes really differ from each other in rounding; a tolerance below that must fail the run."""
    out = tmp_path / "train_step.json"
    proc = _run("train_step.py", "--preset", "tiny", "--batch", "2", "--repeats", "1", "--stage", "1", "--threads", "1",
                "--modes", "forward", "--precision", "bf16", "--loss-rtol", "1e-12", "--json", str(out))
    assert proc.returncode == 1 and "ERROR: stage 1 forward: first-step loss" in proc.stderr
    report = json.loads(out.read_text())
    assert not report["passed"] and not report["results"][0]["runs"]["forward"]["loss_ok"]


def test_coupling_precision_benchmark_smoke(tmp_path):
    out = tmp_path / "precision.json"
    proc = _run("coupling_precision.py", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["format"] == "remeanflow.coupling-precision-bench/1" and report["teacher"]["kind"] == "random"
    assert json.loads(proc.stdout) == report
    fp32 = report["precisions"]["fp32"]
    assert fp32["time_vs_fp32"] == 1.0 and "rms_error" not in fp32
    reduced = [p for p in ("bf16", "fp16") if p in report["precisions"]]
    assert set(reduced) | set(report["skipped"]) == {"bf16", "fp16"}
    for p in reduced:
        entry = report["precisions"][p]
        # really reduced precision (an error), and the same ODE (far below the endpoints' size)
        assert 0 < entry["rms_error"] <= entry["max_abs_error"]
        assert entry["relative_rms_error"] < 0.05 and entry["seconds_best"] > 0


def test_merge_reports_of_separate_parts(bench):
    env = {"device_name": "cpu"}
    sampler = dict(format=bench.FORMAT, smoke=True, env=env, settings={"parts": ["sampler"]},
                   sampler={"heun_steps": 2, "runs": {"reference": {"samples_per_s": 3.0}}},
                   checks=[dict(what="sampler", value=0.01, tolerance=0.05, passed=True)])
    train = dict(format=bench.FORMAT, smoke=True, env=env, settings={"parts": ["train"], "train_preset": "toy-16"},
                 train=[dict(stage=1, batch=2, reference={}, fast={})],
                 checks=[dict(what="stage 1 batch 2", value=0.5, tolerance=0.02, passed=False)])
    merged = bench.merge_reports([sampler, train], ["a.json", "b.json"])
    assert merged["sampler"] == sampler["sampler"] and merged["train"] == train["train"]
    assert merged["settings"]["train_preset"] == "toy-16" and merged["merged_from"] == ["a.json", "b.json"]
    assert not merged["passed"] and merged["failures"] == ["stage 1 batch 2: 0.5 > 0.02"]  # a failed check stays
    with pytest.raises(ValueError, match="a.json and c.json both hold a sampler part"):
        bench.merge_reports([sampler, train, sampler], ["a.json", "b.json", "c.json"])
    with pytest.raises(ValueError, match="b.json: key format"):
        bench.merge_reports([sampler, dict(train, format="other")], ["a.json", "b.json"])


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """benchmarks/gpu_check.sh --smoke: gpu_bench.py in its CPU smoke mode, the 512 rehearsal at smaller
    sizes through real Snakemake on the CPU, and the 512 preset's cost plan from the merged report."""
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--smoke"], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["format"] == "remeanflow.gpu-check/1" and timings["mode"] == "cpu-smoke"
    assert list(timings["steps"]) == ["bench_sampler", "bench_train", "bench_merge", "rehearsal_assets",
                                      "rehearsal_run", "plan"]
    assert all(s["rc"] == 0 and 0 < s["seconds"] <= s["timeout_s"] for s in timings["steps"].values())
    report = json.loads((out / "gpu_bench.json").read_text())
    assert report["format"] == "remeanflow.gpu-bench/1" and report["smoke"] and report["passed"]
    assert report["sampler"]["runs"]["reference"]["samples_per_s"] > 0 and len(report["train"]) == 4
    for part in ("sampler", "train"):
        assert part in json.loads((out / f"gpu_bench_{part}.json").read_text())
    metrics = json.loads((out / "rehearsal_metrics.json").read_text())
    assert math.isfinite(metrics["fid"])  # the latent samples went through the VAE and Inception
    plan = json.loads((out / "plan512.json").read_text())
    assert plan["format"] == "remeanflow.plan/1" and plan["figures"]["measured"]
    assert "smoke" in plan["figures"]["source"] and plan["couplings"] == 1_281_167 * 4
    assert "not GPU figures" in (out / "plan512.txt").read_text()


def test_gpu_check_usage():
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "/nonexistent/x", "--fast"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_compact_store_benchmark(tmp_path):
    out = tmp_path / "compact.json"
    proc = _run("compact_store.py", "--num-samples", "64", "--chunk", "16", "--shape", "4", "16", "16", "--batch", "8",
                "--batches", "3", "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    per = report["bytes_per_coupling"]
    official = per["official (.npy pair, float32)"]
    assert official == 2 * (4 * 16 * 16 * 4 + 128)
    # float16 endpoints, no noise: a quarter of the official pair, plus label (4 B), id (8 B),
    # digests and the store's metadata (position-bound digests record the chunk layout in the
    # attributes), the last two spread over only 64 couplings here
    assert per["compact"] <= official / 4 + 80 and per["compact"] < per["full"] / 3.5
    assert report["compact_fraction_of_official"] == pytest.approx(per["compact"] / official)
    for name in ("full", "compact"):
        assert report["stream"][name]["samples_per_s_cpu"] > 0
