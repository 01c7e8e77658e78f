"""The GPU-less step cost model (`remeanflow.step_cost`): the storage tracker's accounting, and
the prediction on fake tensors equal, byte for byte, to the same tracker on a real CPU step."""

from __future__ import annotations

import pytest
import torch

from remeanflow import networks, step_cost

NET, BATCH = "tiny", 4


def test_tracker_counts_each_storage_once_and_releases_it():
    tracker = step_cost.StorageTracker()
    with tracker:
        x = torch.empty(1000)  # 4000 bytes
        view = x.view(10, 100)  # same storage: nothing new
        x.add_(1)  # in place: nothing new
        y = x + 1  # 4000 more
        del y
        z = torch.empty(250)  # 1000 bytes, after the peak
        a, b = torch.ones(3, 4), torch.ones(4, 5)
        tracker.reset_peak()
        c = a @ b
    assert view.untyped_storage()._cdata == x.untyped_storage()._cdata
    assert tracker.current == 4000 + 1000 + 48 + 80 + 60
    assert tracker.peak == tracker.current  # reset, then only grew
    assert tracker.flops == 2 * 3 * 4 * 5  # counted since the reset only
    assert tracker.current_cuda == 4096 + 1024 + 3 * 512  # each rounded up to 512-byte blocks
    del x, view, z, a, b, c
    assert tracker.current == 0 and tracker.current_cuda == 0


def test_tracker_splits_the_peak_into_categories():
    tracker = step_cost.StorageTracker()
    with tracker:
        kept = torch.empty(100)  # 400 bytes, "state"
        temp = torch.empty(200)  # 800 bytes, freed before the end
        record = tracker.record_of(kept)
        del temp
        torch.empty(50)  # 200 bytes, freed at once: after the peak
    assert tracker.peak == 1200
    assert tracker.peak_by_category({"state": [record]}) == {"state": 400, "activations": 800}


@pytest.fixture(scope="module")
def fake_and_real():
    """Both JVP modes on the same small net and batch, fake and real (fp32)."""
    return {(jvp, fake): step_cost.measure_step(NET, BATCH, jvp=jvp, fake=fake)
            for jvp in ("tangent", "autograd") for fake in (True, False)}


@pytest.mark.parametrize("jvp", ["tangent", "autograd"])
def test_fake_step_predicts_the_real_cpu_step_exactly(fake_and_real, jvp):
    fake, real = fake_and_real[jvp, True], fake_and_real[jvp, False]
    assert fake.fake and not real.fake
    assert fake.peak_bytes == real.peak_bytes
    assert fake.peak_cuda_bytes == real.peak_cuda_bytes
    assert fake.by_category == real.by_category
    assert fake.flops == real.flops > 0


def test_categories_are_the_training_state(fake_and_real):
    cost = fake_and_real["tangent", True]
    net = networks.build(NET)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in net.buffers())
    cat = cost.by_category
    assert cat["parameters"] == cat["ema"] == param_bytes + buffer_bytes
    # FROZEN parameters get neither a gradient nor Adam moments; Adam adds a 4-byte step per tensor.
    assert 0 < cat["gradients"] < param_bytes
    assert 2 * cat["gradients"] <= cat["optimizer"] <= 2 * cat["gradients"] + 4 * len(list(net.parameters()))
    assert cat["activations"] > 0 and sum(cat.values()) == cost.peak_bytes
    assert cost.params == sum(p.numel() for p in net.parameters())


def test_double_backward_costs_more_than_the_tangent_pass(fake_and_real):
    tangent, autograd = fake_and_real["tangent", True], fake_and_real["autograd", True]
    assert autograd.by_category["activations"] > tangent.by_category["activations"]
    assert autograd.flops > tangent.flops


def _stub_cost(batch: int, peak: int) -> step_cost.StepCost:
    return step_cost.StepCost(net="stub", params=0, batch=batch, jvp="tangent", precision="bf16", stage=1,
                              peak_bytes=peak, peak_cuda_bytes=peak, by_category={}, flops=0, fake=True, seconds=0.0)


def _stub_measure(monkeypatch, peak) -> list[int]:
    calls: list[int] = []

    def measure(net_config, batch, **kwargs):
        calls.append(batch)
        return step_cost.StepCost(net="stub", params=0, batch=batch, jvp="tangent", precision="bf16", stage=1,
                                  peak_bytes=peak(batch), peak_cuda_bytes=peak(batch), by_category={}, flops=0,
                                  fake=True, seconds=0.0)

    monkeypatch.setattr(step_cost, "measure_step", measure)
    return calls


def _curved_peak(batch: int) -> int:
    """Slightly super-linear: what a line fitted at small batches misses."""
    return 2_000 + 100 * batch + batch * batch // 64


@pytest.mark.parametrize("budget", [1_000, 2_150, 5_000, 10_000, 123_456])
def test_largest_batch_is_the_largest_that_fits(monkeypatch, budget):
    calls = _stub_measure(monkeypatch, _curved_peak)
    fit = step_cost.largest_batch(NET, budget, probes=(4, 8))
    want = max((b for b in range(1, 100_000) if _curved_peak(b) <= budget), default=0)
    assert fit.batch == want
    assert fit.cost.batch == max(want, 1) and fit.cost.peak_cuda_bytes <= budget or want == 0
    assert fit.runs == len(set(calls)) == len(calls) <= 8  # no batch measured twice
    assert fit.bytes_per_sample == pytest.approx((_curved_peak(8) - _curved_peak(4)) / 4)


def test_largest_batch_trusting_the_line_still_fits(monkeypatch):
    """exact=False skips the run above the answer: the answer still fits, one run fewer."""
    _stub_measure(monkeypatch, lambda b: 1_000 + 100 * b)  # exactly linear: the line's answer is right
    fit = step_cost.largest_batch(NET, 5_050, exact=False, probes=(4, 8))
    assert (fit.batch, fit.runs) == (40, 3)
    fit = step_cost.largest_batch(NET, 5_050, exact=True, probes=(4, 8))
    assert (fit.batch, fit.runs) == (40, 4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="precision"):
        step_cost.measure_step(NET, 2, precision="fp8")
    with pytest.raises(KeyError, match="unknown network preset"):
        step_cost.measure_step("no-such-net", 2)
    with pytest.raises(ValueError, match="gpu_mem_bytes"):
        step_cost.largest_batch(NET, 0)
