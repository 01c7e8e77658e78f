"""GPU memory and FLOPs of one training step, computed without a GPU.

The project's own step (`train.build_trainer` + `train.queue_step`: forced weight normalisation,
the MeanFlow loss with its JVP in the configured `train.jvp` mode, backward, gradient clipping in
stage 2, Adam, EMA update) runs on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`):
every op computes shapes and dtypes only, nothing is allocated, so any net size and batch can be
modelled on a laptop. Two instruments watch it:

* `StorageTracker`, a TorchDispatchMode that adds each op output's storage bytes once (keyed by
  the storage's `_cdata`) and subtracts them when the storage dies (`weakref.finalize` on the
  Python storage object, which lives exactly as long as the storage). It sees the forward, the
  double backward of jvp="autograd" and the optimizer alike; PyTorch's MemTracker cannot follow
  `torch.autograd.grad` (its module hooks fail, ../shared/REFERENCE.md 2026-12-07).
* FLOPs by the formulas of `torch.utils.flop_counter` (convolutions, matmuls, attention: 2 FLOPs
  per multiply-add; elementwise ops are not counted), applied by the same mode: FlopCounterMode
  itself tracks modules with hooks and fails in the double backward like MemTracker.

What is modelled: every byte the step's ops allocate, exactly as on a real tensor (the test
compares fake and real CPU steps byte for byte). What is not: the CUDA caching allocator's
block sizes (`cuda_bytes` rounds each allocation up to 512 bytes, its smallest granularity, but
not the up-to-1-MiB tails of unsplit large blocks), cuDNN/cuBLAS workspaces, the CUDA context
and fragmentation (reserved minus allocated). bf16 runs under the CPU's autocast (the
accelerator of this process is a CPU one): CUDA's autocast casts the same convolutions and
matmuls to bf16 but keeps a few more reductions (softmax, norms, sums) in float32, so saved
activations of those ops may differ in precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from . import networks, train
from .settings import TrainSettings

CATEGORIES = ("parameters", "gradients", "optimizer", "ema", "activations")  # activations: + temporaries
PRECISIONS = {"fp32": "no", "bf16": "bf16"}  # step precision -> accelerate's mixed_precision
CUDA_GRANULARITY = 512  # bytes: the CUDA caching allocator rounds every block up to this


# ----------------------------------------------------------------------------------------------
# Live storage bytes.


@dataclasses.dataclass
class _Storage:
    nbytes: int
    born: int  # clock at allocation
    died: float = math.inf  # clock at release


class StorageTracker(TorchDispatchMode):
    """Bytes of every storage created by an op while the mode is on, live and at their peak, and
    the FLOPs of the ops run (`torch.utils.flop_counter`'s formulas, without its module hooks).

    A storage is counted once however many tensors view it, from the op that created it until
    its release. Allocation and release events tick a clock, so which storages were live at the
    peak is known afterwards (`live_at_peak`) and can be split into categories.
    """

    def __init__(self):
        super().__init__()
        self.current = 0  # live bytes now
        self.peak = 0  # largest `current` since the last `reset_peak`
        self.current_cuda = 0  # the same with every storage rounded up to CUDA_GRANULARITY
        self.peak_cuda = 0
        self._clock = 0
        self._peak_clock = 0
        self._live: dict[int, _Storage] = {}  # storage._cdata -> record, live storages only
        self._records: list[_Storage] = []
        self.flops = 0  # since the last `reset_peak`

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += int(count(*args, **kwargs, out_val=out))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._allocated(leaf.untyped_storage())
        return out

    def _allocated(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._live:  # a view or an in-place result: its storage is counted already
            return
        self._clock += 1
        record = _Storage(nbytes=storage.nbytes(), born=self._clock)
        self._live[key] = record
        self._records.append(record)
        self.current += record.nbytes
        self.current_cuda += _cuda_bytes(record.nbytes)
        weakref.finalize(storage, self._released, key, record)
        if self.current > self.peak:
            self.peak, self._peak_clock = self.current, self._clock
        self.peak_cuda = max(self.peak_cuda, self.current_cuda)

    def _released(self, key: int, record: _Storage) -> None:
        self._clock += 1
        record.died = self._clock
        if self._live.get(key) is record:
            del self._live[key]
        self.current -= record.nbytes
        self.current_cuda -= _cuda_bytes(record.nbytes)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now, and count FLOPs from zero."""
        self.peak, self.peak_cuda, self._peak_clock = self.current, self.current_cuda, self._clock
        self.flops = 0

    def record_of(self, tensor: torch.Tensor) -> _Storage | None:
        """The record of a live tensor's storage (None: created outside the mode)."""
        return self._live.get(tensor.untyped_storage()._cdata)

    def live_at_peak(self, record: _Storage) -> bool:
        return record.born <= self._peak_clock < record.died

    def peak_by_category(self, owned: dict[str, Iterable[_Storage]]) -> dict[str, int]:
        """The peak split over `owned` (category -> records); the rest is "activations" (activations
        and temporaries). A record claimed by several categories counts in the first."""
        out, seen = {}, set()
        for category, records in owned.items():
            chosen = {id(r): r for r in records if r is not None and id(r) not in seen and self.live_at_peak(r)}
            seen.update(chosen)
            out[category] = sum(r.nbytes for r in chosen.values())
        out["activations"] = self.peak - sum(out.values())
        return out


def _cuda_bytes(nbytes: int) -> int:
    return -(-nbytes // CUDA_GRANULARITY) * CUDA_GRANULARITY


# ----------------------------------------------------------------------------------------------
# The step to measure.


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Predicted cost of one steady-state training step (the second step: Adam state exists)."""

    net: str  # preset name or "custom"
    params: int  # number of parameters of the net
    batch: int  # per-GPU batch
    jvp: str  # train.jvp mode
    precision: str  # "fp32" or "bf16" (autocast)
    stage: int  # 1 or 2 (stage 2 adds the CFG forward and gradient clipping)
    peak_bytes: int  # largest live bytes during the step, everything included
    peak_cuda_bytes: int  # the same with each allocation rounded up to CUDA's 512-byte blocks
    by_category: dict[str, int]  # the peak split into CATEGORIES
    flops: int  # per step (torch.utils.flop_counter's formulas: convolutions, matmuls, attention)
    fake: bool  # traced on fake tensors (True) or run on real CPU tensors
    seconds: float  # wall time of building and tracing both steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _own_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; the
    model runs its own step under the precision it asks for, then gives the caller's state back."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    shared = (PartialState._shared_state, AcceleratorState._shared_state, GradientState._shared_state)
    saved = [dict(s) for s in shared]
    for s in shared:
        s.clear()
    try:
        yield
    finally:
        for s, old in zip(shared, saved):
            s.clear()
            s.update(old)


class _NoMemo(dict):
    def __setitem__(self, key, value) -> None:
        pass


@contextlib.contextmanager
def _unmemoised(fake_mode: FakeTensorMode | None) -> Iterator[None]:
    """Build modules on fake tensors without the fake mode's weak memo of op outputs.

    `Module.to` swaps every fake parameter for a converted one (`torch.utils.swap_tensors`, even
    when the conversion is a no-op), and a swap refuses a tensor that has a weak reference,
    which the memo holds to every fake op output (torch 2.13). Real tensors converted to fake
    need the memo, so it is off only while the nets, EMA and optimiser are built."""
    if fake_mode is None:
        yield
        return
    converter = fake_mode.fake_tensor_converter.meta_converter
    memo, converter.tensor_memo = converter.tensor_memo, _NoMemo()
    try:
        yield
    finally:
        converter.tensor_memo = memo


def _net_kwargs(net_config: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(net_config, str):
        if net_config not in networks.PRESETS:
            raise KeyError(f"unknown network preset {net_config!r}; expected one of {sorted(networks.PRESETS)} "
                           "or a dict of networks.Precond arguments")
        return net_config, dict(networks.PRESETS[net_config])
    if not isinstance(net_config, dict):
        raise TypeError(f"net_config must be a preset name or a dict of Precond arguments, got {type(net_config)}")
    return "custom", dict(net_config)


def _step_inputs(net: networks.Precond, batch: int, stage: int) -> train.StepInputs:
    """Random inputs of the step's shapes (values do not change its memory or FLOPs). Labels are
    one-hot rows already: the range check of class indices reads values, which fake tensors have not."""
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    labels = torch.zeros(batch, net.label_dim) if net.label_dim else None
    t = torch.rand(batch)
    return train.StepInputs(x=torch.randn(shape), noise=torch.randn(shape), labels=labels, t=t, r=t * 0.5,
                            w_pi=2.0 if stage == 2 else 1.0)


def _param_records(tracker: StorageTracker, module: torch.nn.Module) -> list:
    return [tracker.record_of(t) for t in (*module.parameters(), *module.buffers())]


def measure_step(
    net_config: str | dict[str, Any],  # networks preset name, or networks.Precond arguments
    batch: int,  # per-GPU batch
    *,
    jvp: str = "tangent",  # train.jvp mode
    precision: str = "fp32",  # "fp32" or "bf16" (autocast, as the training loop runs on a GPU)
    stage: int = 1,  # 1, or 2 (CFG target, gradient clipping)
    fake: bool = True,  # False: real CPU tensors (allocates everything; for validation)
    settings: TrainSettings | None = None,  # the run's `train` settings (Adam, EMA, clipping); defaults if None
) -> StepCost:
    """Peak memory by category and FLOPs of one training step, as the training loop runs it.

    Two steps run on the same trainer: the first creates Adam's state and the gradients, the
    second is measured, so the figure is the steady state a long run sits in (the gradients of
    the previous step are still live during the forward: `queue_step` frees them only before
    backward).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    name, kwargs = _net_kwargs(net_config)
    settings = dataclasses.replace(settings or TrainSettings(), jvp=jvp, batch_size=batch, compile=None)
    config = train.hyperparameters(settings, stage, seed=0)
    started = time.perf_counter()
    fake_mode = FakeTensorMode() if fake else None
    tracker = StorageTracker()
    with _own_accelerator_state(), fake_mode or contextlib.nullcontext(), tracker:
        torch.manual_seed(0)
        with _unmemoised(fake_mode):
            net, ema = networks.build(**kwargs), networks.build(**kwargs)
            trainer = train.build_trainer(train.make_accelerator(PRECISIONS[precision]), net, ema, config)
        train.queue_step(trainer, _step_inputs(net, batch, stage), 1)
        grads = [tracker.record_of(p.grad) for p in trainer.params if p.grad is not None]
        tracker.reset_peak()
        train.queue_step(trainer, _step_inputs(net, batch, stage), 2)
        grads += [tracker.record_of(p.grad) for p in trainer.params if p.grad is not None]
        state = [tracker.record_of(t) for s in trainer.optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor)]
        owned = {"parameters": _param_records(tracker, trainer.net), "gradients": grads, "optimizer": state,
                 "ema": _param_records(tracker, trainer.ema)}
        by_category = tracker.peak_by_category(owned)
        params = sum(p.numel() for p in trainer.net.parameters())
    return StepCost(net=name, params=params, batch=batch, jvp=jvp, precision=precision, stage=stage,
                    peak_bytes=tracker.peak, peak_cuda_bytes=tracker.peak_cuda, by_category=by_category,
                    flops=tracker.flops, fake=fake,
                    seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# The largest batch that fits a card.


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The largest per-GPU batch whose predicted peak fits a memory budget."""

    batch: int  # 0 when not even batch 1 fits
    cost: StepCost  # the confirming fake run (at `batch`, or at 1 when nothing fits)
    bytes_per_sample: float  # slope of the linear model the search started from
    fixed_bytes: float  # its intercept: parameters, gradients, Adam state, EMA and batch-free temporaries
    runs: int  # fake steps measured


def largest_batch(
    net_config: str | dict[str, Any],  # networks preset name, or networks.Precond arguments
    gpu_mem_bytes: int,  # memory budget of one GPU for the step's own allocations
    jvp: str = "tangent",  # train.jvp mode
    precision: str = "bf16",  # "fp32" or "bf16"
    *,
    stage: int = 1,  # 1 or 2
    settings: TrainSettings | None = None,  # the run's `train` settings
    probes: tuple[int, int] = (4, 8),  # batches of the two runs the line is fitted to
    exact: bool = True,  # also show that batch + 1 does not fit (one more run); False trusts the line there
    max_runs: int = 10,  # fake runs allowed in all before giving up
) -> BatchFit:
    """The largest batch B whose predicted peak (CUDA-rounded) is <= gpu_mem_bytes.

    A fake step costs the same at any batch (shapes only), and its memory is affine in the
    batch (activations scale with it, the model's state does not): two runs fit the line, the
    answer is read off it and confirmed by one more run. Where the line is off by a little
    (rounding, batch-independent temporaries), the search keeps a bracket [largest batch that
    fits, smallest that does not] and proposes from the line through the two nearest runs.
    """
    if gpu_mem_bytes <= 0:
        raise ValueError(f"gpu_mem_bytes must be > 0, got {gpu_mem_bytes}")
    if not (0 < probes[0] < probes[1]):
        raise ValueError(f"probes must be two increasing batches >= 1, got {probes}")
    runs: dict[int, StepCost] = {}

    def peak(batch: int) -> int:
        if batch not in runs:
            if len(runs) >= max_runs:
                raise RuntimeError(f"no answer within {max_runs} fake runs (measured batches {sorted(runs)})")
            runs[batch] = measure_step(net_config, batch, jvp=jvp, precision=precision, stage=stage,
                                       settings=settings)
        return runs[batch].peak_cuda_bytes

    slope = (peak(probes[1]) - peak(probes[0])) / (probes[1] - probes[0])
    fixed = peak(probes[0]) - slope * probes[0]
    if slope <= 0:
        raise RuntimeError(f"peak memory does not grow with the batch ({runs[probes[0]].peak_cuda_bytes} bytes at "
                           f"{probes[0]}, {runs[probes[1]].peak_cuda_bytes} at {probes[1]}): no line to search along")
    lo, hi = 0, math.inf  # the largest batch known to fit, the smallest known not to
    batch, sides = max(1, int((gpu_mem_bytes - fixed) // slope)), []
    while True:
        if batch not in runs:
            sides.append(peak(batch) <= gpu_mem_bytes)
        for b, cost in runs.items():  # every run so far narrows the bracket
            lo, hi = (max(lo, b), hi) if cost.peak_cuda_bytes <= gpu_mem_bytes else (lo, min(hi, b))
        if hi == lo + 1 or hi == 1 or (not exact and lo == batch):
            break
        # Secant through the bracket's ends (the two nearest runs while it is open above); after two
        # answers on the same side, the midpoint: a curved peak would make the secant creep.
        if len(sides) >= 2 and sides[-1] == sides[-2] and hi < math.inf:
            batch = (lo + hi) // 2
        else:
            batch = _propose(runs, gpu_mem_bytes, lo, hi)
    answer = lo
    return BatchFit(batch=answer, cost=runs[max(answer, 1)], bytes_per_sample=slope, fixed_bytes=fixed,
                    runs=len(runs))


def _propose(runs: dict[int, StepCost], budget: int, lo: int, hi: float) -> int:
    """The next batch to measure inside (lo, hi): where the line through the bracket's ends (or the
    two runs nearest the budget, while either end is unmeasured) crosses the budget."""
    if lo in runs and hi in runs:
        (b1, c1), (b2, c2) = (lo, runs[lo]), (hi, runs[hi])
    else:
        (b1, c1), (b2, c2) = sorted(sorted(runs.items(), key=lambda kv: abs(kv[1].peak_cuda_bytes - budget))[:2])
    slope = (c2.peak_cuda_bytes - c1.peak_cuda_bytes) / (b2 - b1)
    guess = b1 + (budget - c1.peak_cuda_bytes) / slope if slope > 0 else lo + 1
    return int(min(max(math.floor(guess), lo + 1), hi - 1))
