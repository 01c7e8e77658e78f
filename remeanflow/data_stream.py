"""The data-trained baseline of the ablations: real images with fresh independent noise.

Re-MeanFlow's headline claim is that MeanFlow trained on rectified couplings (noise n, teacher
ODE endpoint x) beats MeanFlow trained on the data with independent noise. `train.source: data`
trains exactly as the method does (same loss, net, init, steps, (t, r) draws) but takes its
batches from this stream instead of `loader.CouplingStream`:

* x: the images of `data/images.zarr` (uint8 pixels -> [-1, 1], EDM2's StandardRGBEncoder;
  a latent teacher's net does not fit them and `train_state.check_data_fits_net` refuses it);
* noise: standard normal, drawn afresh for every (epoch, image) from a generator keyed by
  (seed, epoch, image index), so an image meets new noise in every epoch and the draw depends on
  nothing but its position (a resume needs no generator state);
* no truncation (there is no coupling distance) and no coupling fingerprint.

Order: epoch e permutes the image indices with a generator keyed by (seed, e); rank r of W takes
entries r, r + W, ...; a batch is the next `batch_size` of them, crossing epochs. The position
(epoch, offset) is the whole state (`state_dict`); under another number of processes the stream
restarts at the first epoch no saved rank had started, as `loader.open_stream` does.

The batches have `CouplingStream`'s interface: {x, noise, label, sample_id, kept_fraction}, with
sample_id the image index and kept_fraction 1.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .loader import keyed_seed
from .misc import require_int, uint8_to_float

log = logging.getLogger(__name__)

STATE_FORMAT = "remeanflow.data-stream/1"
# Purposes of the keyed generators (loader.keyed_seed); distinct from the coupling stream's.
_ORDER, _NOISE = 21, 22
_STATE_KEYS = ("seed", "rank", "world_size", "batch_size", "total")
# Image sets up to this size are read into memory once; larger ones batch by batch.
IN_MEMORY_BYTES = 4 << 30


class ImageSet:
    """The images and labels of a `preprocess_merge` store, with what training checks of a data
    source: `manifest` holds the shape and class count (`train_state.check_data_fits_net`),
    `manifest_path` names the store in errors, `identity()` enters the checkpoints' config hash."""

    def __init__(self, store):
        self.manifest_path = Path(store)
        if not (self.manifest_path / "zarr.json").is_file():
            raise FileNotFoundError(f"{store}: not an image store (train.source is data: training reads "
                                    "data/images.zarr, written by preprocess_merge)")
        group = zarr.open_group(str(store), mode="r")
        images = group["images"]
        self.labels = np.asarray(group["labels"][...], dtype=np.int64)
        self.total = int(images.shape[0])
        if self.total == 0:
            raise ValueError(f"{store}: no images")
        self.images = images[...] if images.nbytes <= IN_MEMORY_BYTES else images
        self.manifest = {"shape": [int(v) for v in images.shape[1:]], "num_classes": len(group.attrs["synsets"])}
        self.threshold = None

    def __len__(self) -> int:
        return self.total

    def identity(self) -> dict[str, Any]:
        return {"source": "data", "total": self.total, "shape": self.manifest["shape"],
                "labels_sha256": hashlib.sha256(self.labels.tobytes()).hexdigest()}

    def read(self, index: np.ndarray) -> np.ndarray:
        """uint8 images of `index` (any order, repeats allowed), read in index order."""
        unique, inverse = np.unique(index, return_inverse=True)
        rows = self.images[unique] if isinstance(self.images, np.ndarray) else self.images.oindex[unique]
        return np.asarray(rows)[inverse]


def open_images(store) -> ImageSet:
    return ImageSet(store)


def _first_unstarted_epoch(states: list[dict[str, Any]]) -> int:
    return max(int(s["epoch"]) + int(s["offset"] > 0) for s in states)


class DataStream(Iterator[dict[str, Any]]):
    """Infinite per-process batches of images with fresh noise (module docstring)."""

    def __init__(self, images: ImageSet, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 state: dict[str, Any] | None = None, relayout: list[dict[str, Any]] | None = None):
        require_int("batch_size", batch_size, 1)
        require_int("world_size", world_size, 1)
        require_int("rank", rank, 0, world_size)
        require_int("seed", seed, 0)
        if world_size > images.total:
            raise ValueError(f"{images.manifest_path}: {images.total} images for {world_size} processes")
        self.images, self.batch_size, self.rank, self.world_size = images, int(batch_size), int(rank), int(world_size)
        self.seed, self.epoch, self.offset = int(seed), 0, 0
        self._order: tuple[int, np.ndarray] | None = None
        if state is not None and relayout is not None:
            raise ValueError("pass either state (same layout) or relayout (another layout), not both")
        if state is not None:
            self._check(state, _STATE_KEYS)
            self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        if relayout is not None:
            for s in relayout:
                self._check(s, ("seed", "total"))
            self.epoch = _first_unstarted_epoch(relayout)

    def _settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "total": self.images.total}

    def _check(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a data-stream state (format {STATE_FORMAT!r} expected): {state!r:.200}; a "
                             "checkpoint of coupling training cannot resume data training")
        mine = self._settings()
        diff = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in keys if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"cannot resume the data stream of {self.images.manifest_path}: " + "; ".join(diff))

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "offset": self.offset, **self._settings()}

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's image indices in `epoch`, in drawing order."""
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng(keyed_seed(_ORDER, self.seed, epoch)).permutation(self.images.total)
            self._order = (epoch, perm[self.rank :: self.world_size])
        return self._order[1]

    def noise(self, epoch: int, index: np.ndarray) -> np.ndarray:
        """Fresh standard-normal noise of images `index` in `epoch`, one keyed generator each."""
        shape = self.images.manifest["shape"]
        return np.stack([np.random.default_rng(keyed_seed(_NOISE, self.seed, epoch, int(i)))
                         .standard_normal(shape, dtype=np.float32) for i in index])

    def __next__(self) -> dict[str, Any]:
        index, noise, need = [], [], self.batch_size
        while need:
            order = self.epoch_indices(self.epoch)
            take = order[self.offset : self.offset + need]
            index.append(take)
            noise.append(self.noise(self.epoch, take))
            self.offset += len(take)
            need -= len(take)
            if self.offset >= len(order):
                self.epoch, self.offset = self.epoch + 1, 0
        idx = np.concatenate(index)
        return {
            "x": uint8_to_float(self.images.read(idx)),
            "noise": torch.from_numpy(np.concatenate(noise)),
            "label": torch.from_numpy(self.images.labels[idx]),
            "sample_id": torch.from_numpy(idx.astype(np.int64)),
            "kept_fraction": 1.0,
        }

    def close(self) -> None:  # CouplingStream's interface; nothing runs in the background here
        pass

    def __enter__(self) -> DataStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stream(images: ImageSet, *, batch_size: int, seed: int, rank: int, world: int,
                saved_streams: list[dict[str, Any]] | None = None, ckpt_path=None, step: int | None = None,
                **_coupling_only) -> DataStream:
    """`loader.open_stream` for the data source: `batch_size` is the global batch; saved_streams are
    every rank's `state_dict()` (another number of ranks restarts at the first unstarted epoch, with a
    warning). `_coupling_only` takes the coupling stream's window and prefetch arguments, which mean
    nothing here."""
    kw = dict(batch_size=batch_size // world, rank=rank, world_size=world, seed=seed)
    if saved_streams is None:
        return DataStream(images, **kw)
    if len(saved_streams) == world:
        return DataStream(images, **kw, state=saved_streams[rank])
    if rank == 0:
        log.warning("%s: saved by %d process(es), resumed by %d at step %s: the data stream restarts at epoch %d; the "
                    "run is no longer bit-identical to an uninterrupted one", ckpt_path, len(saved_streams), world,
                    step, _first_unstarted_epoch(saved_streams))
    return DataStream(images, **kw, relayout=saved_streams)
