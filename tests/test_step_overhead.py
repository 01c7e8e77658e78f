"""Per-step host overhead: fused EMA and weight normalisation (bit-identical to the per-tensor
loops they replace), labels converted once per batch, and no host synchronisation inside the
net's label path or a queued training step (shown on the CPU by making every host read raise)."""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remeanflow import networks, sampling, train

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


_ALLOWED = [False]


@contextlib.contextmanager
def host_reads_allowed():
    """Inside `no_host_reads`: reads of tensors that stay on the host on a GPU too."""
    _ALLOWED[0] = True
    try:
        yield
    finally:
        _ALLOWED[0] = False


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's value reaches Python (each a device sync on a GPU) raises inside,
    except within `host_reads_allowed`."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    saved_nonzero = torch.nonzero

    def guarded(real):
        def read(*args, **kwargs):
            if not _ALLOWED[0]:
                raise RuntimeError("host read of a tensor value")
            return real(*args, **kwargs)
        return read

    try:
        for name, real in saved.items():
            setattr(torch.Tensor, name, guarded(real))
        torch.nonzero = guarded(saved_nonzero)
        yield
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
        torch.nonzero = saved_nonzero


def tiny_net(seed: int = 0) -> networks.Precond:
    torch.manual_seed(seed)
    net = networks.build("tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(torch.rand_like(p) * 3)  # off the unit sphere, non-zero gains
    return net


def loop_normalize_(net: networks.Precond) -> None:
    """The per-layer loop `Precond.normalize_weights_` replaced."""
    for m in net.modules():
        if isinstance(m, networks.MPConv):
            m.normalize_weight_()


def loop_ema_(ema, net, decay: float) -> None:
    """The per-tensor loop `train.update_ema` replaced."""
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - decay)
        for b_ema, b in zip(ema.buffers(), net.buffers()):
            b_ema.copy_(b)


@pytest.mark.parametrize("preset", ["tiny", "toy-16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "channels_last"])
def test_batched_weight_normalisation_is_bit_identical_to_the_loop(preset, dtype):
    torch.manual_seed(1)
    net = networks.build(preset)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(torch.rand_like(p) * 3)
    if dtype == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    else:
        net = net.to(dtype)
    ref = copy.deepcopy(net)
    for _ in range(2):  # the second pass starts on the sphere, as in training
        loop_normalize_(ref)
        net.normalize_weights_()
        for (name, a), b in zip(ref.named_parameters(), net.parameters()):
            assert torch.equal(a, b), name
    assert len(networks._weight_groups(net)) < sum(isinstance(m, networks.MPConv) for m in net.modules())


def test_fused_ema_is_bit_identical_to_the_loop():
    net, ema = tiny_net(0), tiny_net(1)
    ref = copy.deepcopy(ema)
    with torch.no_grad():
        for b in net.buffers():
            b.add_(1.0)  # buffers are copied, not averaged
    for decay in (0.9, 0.9999, 0.0):
        loop_ema_(ref, net, decay)
        train.update_ema(ema, net, decay)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ema.state_dict().values()))
    low = tiny_net(2).to(torch.bfloat16)  # a bf16 net into a float32 EMA
    loop_ema_(ref, low, 0.5)
    train.update_ema(ema, low, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ema.state_dict().values()))
    with pytest.raises(ValueError, match="differ in structure"):
        train.update_ema(ema, networks.build("tiny", num_blocks=2), 0.5)


def test_one_hot_of_indices():
    oh = networks.one_hot(torch.tensor([2, -1, 0, 3]), 4)
    assert oh.dtype == torch.float32 and oh.tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    assert networks.one_hot(torch.zeros(0, dtype=torch.int64), 3).shape == (0, 3)
    with pytest.raises(ValueError, match="vector"):
        networks.one_hot(torch.zeros(2, 1, dtype=torch.int64), 3)


def test_the_net_label_path_reads_nothing_back_with_one_hot_rows():
    net = tiny_net().eval()
    x = torch.randn(3, net.img_channels, net.img_resolution, net.img_resolution)
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.1, 0.5, 0.0])
    labels = torch.tensor([1, -1, 3])
    onehot = networks.one_hot(labels, net.label_dim)
    want = net(x, t, r, labels), net(x, t, r, labels, v_hat=x)[1], net.denoise(x, 2.0, labels)
    with no_host_reads():
        got = net(x, t, r, onehot), net(x, t, r, onehot, v_hat=x)[1], net.denoise(x, 2.0, onehot)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # The check has teeth: class indices are range-checked, a host read.
    with no_host_reads(), pytest.raises(RuntimeError, match="host read"):
        net(x, t, r, labels)


def count_index_conversions(monkeypatch) -> list[int]:
    """Record every `one_hot` of class indices (wherever it is called from)."""
    calls = []
    real = networks.one_hot

    def counting(labels, label_dim):
        if not labels.dtype.is_floating_point:
            calls.append(labels.shape[0])
        return real(labels, label_dim)

    monkeypatch.setattr(networks, "one_hot", counting)
    monkeypatch.setattr(sampling, "one_hot", counting)
    return calls


def test_samplers_convert_labels_once_per_batch(monkeypatch):
    net, guide = tiny_net(0).eval(), tiny_net(1).eval()
    noise, labels = torch.randn(3, 2, 8, 8), torch.tensor([1, -1, 3])
    onehot = networks.one_hot(labels, net.label_dim)
    with torch.no_grad():
        want = sampling.edm_heun(net, noise, onehot, num_steps=3, guide=guide, guidance=1.5)
        want_u = sampling.meanflow_sample(net, noise, onehot, num_steps=2)
    calls = count_index_conversions(monkeypatch)
    with torch.no_grad():
        got = sampling.edm_heun(net, noise, labels, num_steps=3, guide=guide, guidance=1.5)  # 10 net calls
        assert calls == [3]
        got_u = sampling.meanflow_sample(net, noise, labels, num_steps=2)
    assert calls == [3, 3] and torch.equal(got, want) and torch.equal(got_u, want_u)


def make_trainer(grad_clip):
    acc = train.make_accelerator("no")
    config = {"stage": 2, "batch_size": 4, "lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0,
              "ema_decay": 0.9, "grad_clip": grad_clip, "class_dropout": 0.1, "w_max": 3.0,
              "time_sampler": {"ratio_r_neq_t": 0.5}, "p": 0.5, "c": 1e-2, "jvp": "tangent", "seed": 3, "compile": None}
    return train.build_trainer(acc, tiny_net(0), tiny_net(0), config)


def step_inputs(step: int) -> train.StepInputs:
    g = torch.Generator().manual_seed(step)
    return train.StepInputs(x=torch.randn(4, 2, 8, 8, generator=g), noise=torch.randn(4, 2, 8, 8, generator=g),
                            labels=torch.tensor([0, -1, 3, 1]), t=torch.tensor([0.9, 0.6, 0.4, 0.8]),
                            r=torch.tensor([0.1, 0.6, 0.0, 0.3]), w_pi=1.7, kept_fraction=0.875)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_queued_step_reads_nothing_back_and_logs_the_same_values(grad_clip):
    eager, late = make_trainer(grad_clip), make_trainer(grad_clip)
    rows = [train.train_step(eager, step_inputs(s), s) for s in (1, 2)]
    # Labels are converted on the host before the step is queued (as `draw_step` leaves them).
    labels = [networks.one_hot(step_inputs(s).labels, 4) for s in (1, 2)]
    # Adam keeps its step counters on the host (CPU tensors on a GPU too) and reads them there.
    real_step = late.optimizer.step

    def step_with_host_counters(*args, **kwargs):
        with host_reads_allowed():
            return real_step(*args, **kwargs)

    late.optimizer.step = step_with_host_counters
    pending = []
    for s in (1, 2):
        inputs = step_inputs(s)
        inputs.labels = labels[s - 1]
        with no_host_reads():
            pending.append(train.queue_step(late, inputs, s))
    assert [train.read_metrics(p) for p in pending] == rows
    assert all(torch.equal(a, b) for a, b in zip(eager.ema.state_dict().values(), late.ema.state_dict().values()))


def test_a_nan_step_is_reported_when_its_metrics_are_read():
    trainer = make_trainer(None)
    pending = train.queue_step(trainer, step_inputs(1), 7, fail=True)
    with pytest.raises(train.NonFiniteError, match=r"non-finite loss \(nan\) at step 7"):
        train.read_metrics(pending)


def test_overhead_benchmark_counts_fewer_ops_with_the_same_results(tmp_path):
    out = tmp_path / "overhead.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "step_overhead.py"
    subprocess.run([sys.executable, str(script), "--presets", "tiny", "--step-preset", "tiny", "--batch", "2",
                    "--json", str(out)], check=True, capture_output=True, text=True)
    got = json.loads(out.read_text())
    parts = got["parts"]["tiny"]
    for part in (parts["ema"], parts["weight_norm"], got["whole_step"]["step"]):
        assert part["bit_identical"] and part["after"]["compute"] < part["before"]["compute"]
    assert parts["ema"]["after"]["compute"] == 2  # one fused lerp, one fused copy
