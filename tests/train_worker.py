"""Run `train_meanflow` in its own process (the kill-and-resume and DDP tests), plus the small
coupling set and teacher the loader/training tests share.

Usage: python train_worker.py MANIFEST INIT OUT_DIR WORK_DIR [--stage S] [--iterations N]
       [--batch-size B] [--checkpoint-every K] [--lr LR] [--sleep SECONDS] [--summary PATH]

`--sleep` slows every batch down (by wrapping `CouplingStream.__next__`), which widens the window
in which a test can SIGKILL the run between two checkpoints. Runs single-threaded so that its
floating-point results equal an in-process run of the tests (also single-threaded). `--summary P`
writes the returned summary (plus a checksum of this process's trained weights) to `P.rank<r>`
for every process and to `P` for the main one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from couplings_worker import toy_generate  # noqa: E402

# The 'tiny' net: 2 x 8 x 8 images, 4 classes.
SHAPE = (2, 8, 8)
NUM_CLASSES = 4
FINGERPRINT = {"teacher_sha256": "a" * 64, "sampler": {"steps": 3}, "seed": 5}
# Settings shared by the tests and the worker, so that an in-process run equals a worker run.
TRAIN_KW = dict(batch_size=8, lr=1e-3, ema_decay=0.9, seed=3, window_chunks=2, progress=False,
                time_sampler={"ratio_r_neq_t": 0.5})
# Keywords of `train.train_meanflow` itself; the others are fields of the settings.
RUN_KEYS = {"manifest", "init", "out_dir", "work_dir", "stage", "seed", "expected_fingerprint", "keep_checkpoints",
            "mixed_precision", "progress", "on_stale_work_dir", "fail_at_step"}


def train_settings(stage: int = 1, **flat):
    """TrainSettings from flat keywords (fields of TrainSettings, of the stage's StageSettings, and
    time_sampler as a dict); the other stage gets valid placeholder settings."""
    from remeanflow.settings import StageSettings, TimeSamplerSettings, TrainSettings

    own = StageSettings(**{k: flat.pop(k) for k in ("iterations", "grad_clip", "w_max") if k in flat})
    if "time_sampler" in flat:
        flat["time_sampler"] = TimeSamplerSettings(**flat["time_sampler"])
    if "betas" in flat:
        flat["betas"] = tuple(flat["betas"])
    other = StageSettings(w_max=None if stage == 2 else 2.0)
    return TrainSettings(**flat, stage1=own if stage == 1 else other, stage2=own if stage == 2 else other)


def run_meanflow(**kw):
    """`train.train_meanflow` called with flat keywords (see `train_settings`)."""
    from remeanflow import train

    run = {k: kw.pop(k) for k in list(kw) if k in RUN_KEYS}
    return train.train_meanflow(train_settings(run.get("stage", 1), **kw), **run)


def hyperparameters(stage: int, seed: int, **flat) -> dict:
    """`train.hyperparameters` of flat keywords."""
    from remeanflow import train

    return train.hyperparameters(train_settings(stage, **flat), stage, seed)


def make_couplings(root: Path, *, num_samples: int = 96, chunk: int = 8, num_shards: int = 2,
                   quantile: float | None = 0.9, fixed_threshold: float | None = None,
                   store_noise: bool = True) -> Path:
    """A merged coupling set of `num_samples` couplings in chunks of `chunk`; returns the manifest
    (`store_noise=False`: compact shard stores, the same couplings)."""
    from remeanflow import coupling_set as CS
    from remeanflow import couplings as C
    from remeanflow import reflow_index as R

    root.mkdir(parents=True, exist_ok=True)
    index = root / "index.zarr"
    R.build_index(index, mode="random", num_samples=num_samples, num_classes=NUM_CLASSES, seed=0)
    paths = [root / f"shard-{k:05d}.zarr" for k in range(num_shards)]
    for k, path in enumerate(paths):
        C.create_shard_store(path, index_store=index, shard=k, num_shards=num_shards, chunk=chunk, shape=SHAPE,
                             noise_dtype="float16", endpoint_dtype="float32", seed=5, fingerprint=FINGERPRINT,
                             store_noise=store_noise)
        C.generate_shard(path, toy_generate, progress=False)
    manifest = root / "manifest.json"
    CS.merge_shards(paths, manifest, index_store=index, quantile=quantile, fixed_threshold=fixed_threshold,
                    progress=False)
    return manifest


def make_teacher(path: Path, seed: int = 0) -> Path:
    """A 'tiny' net with non-zero gains (EDM2 initialises them to 0, which hides every layer but
    the skip path) and its time embedding copied from the teacher's, saved with `save_net`."""
    from remeanflow import checkpoints, networks

    torch.manual_seed(seed)
    net = networks.build("tiny")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:  # out_gain and emb_gain
                param.copy_(0.5 + torch.rand([], generator=g))
    net.init_time_embedding_()
    checkpoints.save_net(path, net, meta={"role": "test teacher"})
    return path


def main() -> None:
    from remeanflow import loader, train

    ap = argparse.ArgumentParser(description=__doc__)
    for name in ("manifest", "init", "out_dir", "work_dir"):
        ap.add_argument(name)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=TRAIN_KW["batch_size"])
    ap.add_argument("--checkpoint-every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=TRAIN_KW["lr"])
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--summary", default=None, help="write the returned summary here as JSON")
    args = ap.parse_args()

    torch.set_num_threads(1)
    if args.sleep:
        next_batch = loader.CouplingStream.__next__

        def slow_next(self):
            time.sleep(args.sleep)
            return next_batch(self)

        loader.CouplingStream.__next__ = slow_next

    # Keep a handle on the trained net (every rank has its own copy) to compare ranks afterwards.
    trained = {}
    update_ema = train.update_ema

    def capture(ema, net, decay):
        trained["net"] = net
        update_ema(ema, net, decay)

    train.update_ema = capture

    kw = dict(TRAIN_KW, batch_size=args.batch_size, lr=args.lr)
    summary = run_meanflow(
        manifest=args.manifest, init=args.init, out_dir=args.out_dir, work_dir=args.work_dir, stage=args.stage,
        iterations=args.iterations, checkpoint_every=args.checkpoint_every,
        w_max=2.0 if args.stage == 2 else None, grad_clip=1.0 if args.stage == 2 else None, **kw,
    )
    if args.summary:
        if "net" in trained:
            digest = hashlib.sha256()
            for value in trained["net"].state_dict().values():
                digest.update(value.detach().cpu().numpy().tobytes())
            summary["model_sha256"] = digest.hexdigest()
        text = json.dumps(summary, default=str)
        Path(f"{args.summary}.rank{summary['rank']}").write_text(text)
        if summary["rank"] == 0:
            Path(args.summary).write_text(text)


if __name__ == "__main__":
    main()
