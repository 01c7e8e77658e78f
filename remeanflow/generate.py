"""Class-conditional samples from a trained one-step generator, and its export for use elsewhere.

* `sample`: one-step (or K-step MeanFlow) samples of any network file the pipeline writes (a
  stage's EMA net ``train/<stage>/net_ema.pt``, an EMA snapshot
  ``train/work/<stage>/snapshots/ema-step-XXXXXXXX.pt``, in fact any `checkpoints.save_net` file)
  or of an exported generator (below), as one PNG per sample into a folder, or as one labelled
  grid when `out` ends in ``.png`` (other image suffixes are refused: the grid is a PNG).
* `export` / `load_generator`: the generator as ``model.safetensors`` plus a ``model.json`` card
  (architecture, encoder, class list, training provenance), loadable without this project's
  checkpoint format and without pickle.
* `add_sample_parser` / `add_export_parser`: the ``sample`` and ``export`` subcommands of
  ``python -m remeanflow``.

Which sample is which (the contract that makes one sample regenerable on its own):

* Sample j (j = 0, 1, ...) of class index c has the **sample id** ``c * ID_STRIDE + j`` (ID_STRIDE
  = 1,000,000; e.g. id 3000001 is sample 1 of class 3). Its noise is
  ``sampling.per_sample_noise(seed, [id], (C, R, R))`` (numpy Philox keyed by (id, seed), stream
  0), so it depends on neither the other classes asked for, nor their order, nor `per_class`:
  ``start=j, per_class=1`` regenerates sample j alone.
* The net (and the VAE decoder of a latent net) always runs on exactly `batch` rows, the last pass
  padded with zero noise of class 0, and each row's result depends only on its own input at a fixed
  batch shape. A sample's pixels are then the same whichever other samples share its pass; they are
  bit-identical for the same (checkpoint, seed, class, j, steps, batch) on the same device and
  software. Another `batch` (another kernel shape) may change a pixel by one level here and there.
* Every PNG carries a ``remeanflow`` text chunk (JSON: net sha256, what it was verified against,
  class, synset, j, sample id, seed, steps, batch) from which it can be regenerated; it holds no
  path or time, so the same request gives the same bytes. The sha256 is of the bytes loaded (a
  ``.sha256`` side file only while it was taken of that very file).

Class names are the run's synsets in class-index order: from `labels_csv` when given, else from an
exported generator's card, else from the run folder of the checkpoint (the nearest parent folder
holding ``data/images.zarr`` (attribute ``synsets``) or ``data/labels.csv``). Without a class list,
classes can only be given as indices and are named by them.

Export format (``FORMAT`` version ``FORMAT_VERSION``): ``model.safetensors`` holds the net's
state_dict (float32, EDM2 parameter names plus ``unet.emb_noise_t`` / ``unet.emb_noise_r``);
``model.json`` holds ``format``, ``format_version``, ``weights`` (file, sha256, parameter count),
``architecture`` (``networks.Precond`` and its ``init_kwargs``), ``encoder`` (EDM2 encoder settings:
pixels, or SD-VAE latents and their scaling), ``classes`` (synsets, or null), ``sampling`` (how to
draw a sample), ``source`` (the checkpoint's name within its run, its ``path`` relative to the
export folder, sha256 and meta) and ``provenance`` (from the checkpoint's ``.provenance.json``
sidecar: rule, ``output_sha256``, ``config_hash``, ``code``; null for files without one, such as
snapshots). No absolute path is stored, so an export can be moved or shared. Beside them,
``model.safetensors.provenance.json`` (rule ``export``, the source checkpoint as input) links the
export into the run's lineage (`python -m remeanflow provenance`).

What a load checks (docs/using-a-trained-model.md): the weights' bytes against the card's sha256;
then, when the source checkpoint is reachable (at ``source.path``, or given as `source`), the
card's source sha256 against the checkpoint's bytes and its run's provenance record, and the
exported tensors against the checkpoint's net, so weights edited together with the card's digest
are refused, naming both files. Without the source, the export is verified against its own card
only, and `verified` (``card-only``) and a warning say so: a card cannot vouch for itself.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tqdm

from . import checkpoints, figures, networks, provenance, sampling
from . import vae as vae_lib  # `vae` is also sample()'s argument
from .fileio import atomic_path, cached_sha256, file_identity
from .misc import require_int

log = logging.getLogger(__name__)

FORMAT = "remeanflow-generator"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model.json"
ID_STRIDE = 1_000_000  # sample id = class index * ID_STRIDE + j (module docstring)
PNG_KEY = "remeanflow"  # PNG text chunk with what regenerates the image
RUN_SEARCH_DEPTH = 5  # parents of a checkpoint searched for the run's data/ (snapshots sit 4 deep)
EXPORT_RULE = "export"  # the rule name in an export's provenance sidecar
# What a loaded generator's digest was checked against (`Generator.verified`, sample's summary and
# PNG metadata): the checkpoint file itself; an export's weights against its card and the card
# against the source checkpoint (tensor-equal); an export against its own card only (its source not
# reachable: a consistent edit of weights and card is not detectable); nothing (verify=False).
VERIFIED = ("checkpoint", "source", "card-only", "none")

# Labelled grid layout (pixels): each image upscaled by nearest neighbour to at least MIN_CELL,
# a LABEL_HEIGHT strip with the class name above each row, PAD between and around everything.
MIN_CELL = 128
LABEL_HEIGHT = figures.LABEL_PX
PAD = 2

# ----------------------------------------------------------------------------------------------
# Opening a generator: a project checkpoint or an exported folder.


@dataclass(frozen=True)
class Generator:
    """A loaded generator and what is known about it."""

    net: networks.Precond  # eval mode, no grads, on the CPU until moved
    encoder: dict  # EDM2 encoder settings (checkpoints format)
    meta: dict  # the checkpoint's meta (step, stage, training config hash, ...)
    sha256: str  # of the checkpoint file, or of an export's weights file, as read
    kind: str  # "checkpoint" or "export"
    path: Path  # what was opened
    card: dict | None  # an export's model.json
    verified: str  # what `sha256` was checked against: one of VERIFIED


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _export_files(path: Path) -> tuple[Path, Path]:
    """(card, weights) of an exported generator given as its folder, its card or its weights."""
    folder = path if path.is_dir() else path.parent
    return folder / CARD_NAME, folder / WEIGHTS_NAME


def _is_export(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".safetensors" or path.name == CARD_NAME


@contextlib.contextmanager
def _unchanged(path: Path):
    """Raise if `path` is replaced or rewritten while the block hashes and loads it, so that a
    digest taken in the block is the digest of the bytes the block loaded."""
    before = file_identity(path)
    yield
    if file_identity(path) != before:
        raise ValueError(f"{path}: changed while it was being read (another process wrote it); "
                         "run again once that write has finished")


def open_generator(path, *, source=None) -> Generator:
    """Open a project network checkpoint (.pt) or an exported generator (folder, its
    model.safetensors or its model.json; `source`: see `load_generator`). Errors name the file and
    say what was expected. The digest is of the bytes loaded (a `.sha256` side file is reused only
    while it was taken of this very file, `fileio.cached_sha256`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder (expected a remeanflow network checkpoint such as "
            "results/<run>/train/stage2/net_ema.pt, or a folder written by `remeanflow export`)"
        )
    if _is_export(path):
        loaded = load_generator(path, source=source)
        card = loaded["card"]
        return Generator(net=loaded["net"], encoder=loaded["encoder"], meta=loaded["meta"],
                         sha256=card["weights"]["sha256"], kind="export", path=path, card=card,
                         verified=loaded["verification"]["verified"])
    if source is not None:
        raise ValueError(f"{path}: a checkpoint has no source to check it against (source=, --source is for "
                         "exported generators)")
    with _unchanged(path):
        digest = cached_sha256(path)
        loaded = _load_checkpoint(path)
    return Generator(net=loaded["net"], encoder=loaded["encoder"] or {}, meta=loaded["meta"] or {},
                     sha256=digest, kind="checkpoint", path=path, card=None, verified="checkpoint")


def _load_checkpoint(path: Path) -> dict:
    """`checkpoints.load_net` with every failure (not a torch file, another format, a torn file)
    as one ValueError naming the file."""
    try:
        return checkpoints.load_net(path)
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ...
        if isinstance(e, ValueError) and str(path) in str(e):
            raise  # load_net's own message names the file already
        raise ValueError(
            f"{path}: not a remeanflow network checkpoint nor an exported generator ({_first_line(e)})"
        ) from e


# ----------------------------------------------------------------------------------------------
# Class names.


@dataclass(frozen=True)
class ClassList:
    """Class names in class-index order, and where they came from."""

    names: list[str]
    source: str  # file they were read from (for messages)


def classes_from_csv(path) -> ClassList:
    """Synsets in class-index order from a labels.csv (columns index, label, synset, member: one
    row per image). A class index with no image gets its index as its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file (expected a run's data/labels.csv)")
    by_label: dict[int, str] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not {"label", "synset"} <= set(reader.fieldnames or ()):
                raise ValueError(f"columns {reader.fieldnames}")
            for row in reader:
                by_label.setdefault(int(row["label"]), row["synset"])
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a labels.csv with columns index, label, synset, member ({_first_line(e)})") from e
    if not by_label or min(by_label) < 0:
        raise ValueError(f"{path}: no class labels >= 0 in this labels.csv")
    return ClassList([by_label.get(i, str(i)) for i in range(max(by_label) + 1)], str(path))


def classes_from_store(path) -> ClassList:
    """The full synset list of a run's data/images.zarr (its ``synsets`` attribute)."""
    import zarr

    synsets = zarr.open_group(str(path), mode="r").attrs.get("synsets")
    if not isinstance(synsets, list) or not synsets:
        raise ValueError(f"{path}: no 'synsets' attribute")
    return ClassList([str(s) for s in synsets], str(path))


def find_run_classes(checkpoint) -> ClassList | None:
    """The class list of the run a checkpoint belongs to: the nearest of its parent folders (up to
    RUN_SEARCH_DEPTH) with ``data/images.zarr`` (preferred: it lists classes without images too) or
    ``data/labels.csv``. None when there is none."""
    for folder in Path(checkpoint).resolve().parents[:RUN_SEARCH_DEPTH]:
        store, labels = folder / "data" / "images.zarr", folder / "data" / "labels.csv"
        if store.is_dir():
            try:
                return classes_from_store(store)
            except Exception as e:  # noqa: BLE001 - zarr's errors vary; labels.csv is the fallback
                log.warning("%s: cannot read its class list (%s); trying labels.csv", store, _first_line(e))
        if labels.is_file():
            return classes_from_csv(labels)
    return None


def class_list_for(gen: Generator, labels_csv=None) -> ClassList | None:
    """The class list of a generator: `labels_csv`, else its card's, else its run's; checked
    against the net's number of classes."""
    if labels_csv is not None:
        found = classes_from_csv(labels_csv)
    elif gen.card is not None:
        synsets = (gen.card.get("classes") or {}).get("synsets")
        found = ClassList(list(synsets), str(_export_files(gen.path)[0])) if synsets else None
    else:
        found = find_run_classes(gen.path)
    if found is not None and len(found.names) != gen.net.label_dim:
        raise ValueError(
            f"{found.source} lists {len(found.names)} classes but {gen.path} has {gen.net.label_dim}: "
            "not this net's class list (pass the labels.csv of the run that trained it)"
        )
    return found


def resolve_classes(requested, class_list: ClassList | None, label_dim: int) -> list[tuple[int, str]]:
    """(class index, name) for each requested class, in the order asked, duplicates dropped.

    `requested`: None (every class), or one or a sequence of class indices (int, or str of digits)
    and synset names. Names need a class list; an unknown name is an error listing a few known ones.
    """
    names = class_list.names if class_list is not None else None

    def name_of(i: int) -> str:
        return names[i] if names is not None else str(i)

    if label_dim == 0:  # an unconditional net: one row, no labels
        if requested not in (None, [], ()):
            raise ValueError("this net is unconditional (label_dim 0): do not ask for classes")
        return [(0, "unconditional")]
    if requested is None:
        return [(i, name_of(i)) for i in range(label_dim)]
    if isinstance(requested, (str, int, np.integer)):
        requested = [requested]
    out: list[tuple[int, str]] = []
    for item in requested:
        index = _class_index(item, names, class_list, label_dim)
        if index not in [i for i, _ in out]:
            out.append((index, name_of(index)))
    if not out:
        raise ValueError("no classes requested")
    return out


def _class_index(item, names: list[str] | None, class_list: ClassList | None, label_dim: int) -> int:
    if isinstance(item, str) and item.strip().isdigit():
        item = int(item.strip())
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if not 0 <= item < label_dim:
            raise ValueError(f"class index {item} out of range: the net has {label_dim} classes (0..{label_dim - 1})")
        return int(item)
    if not isinstance(item, str):
        raise TypeError(f"a class is an index or a synset name, got {item!r}")
    if names is None:
        raise ValueError(f"class {item!r} given by name, but no class list was found for this net: give class "
                         "indices, or pass the run's data/labels.csv (labels_csv=..., --labels CSV)")
    if item not in names:
        raise ValueError(f"unknown class {item!r}: not in {class_list.source} ({len(names)} classes, e.g. "
                         f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    return names.index(item)


# ----------------------------------------------------------------------------------------------
# Sampling.


def sample_id(class_index: int, j: int) -> int:
    """Sample id of sample j of class `class_index` (module docstring)."""
    return int(class_index) * ID_STRIDE + int(j)


def iter_pixels(
    net: networks.Precond,
    items: list[tuple[int, int]],
    *,
    seed: int,
    steps: int,
    batch: int,
    decode,
    device: torch.device,
    progress: bool = True,
) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """(items of a pass, their uint8 RGB pixels [n, 3, H, W] on the CPU), pass after pass, for the
    samples `items` = [(class index, j), ...] in order.

    `decode`: net output -> uint8 pixels (`vae.make_decoder`). Every net and decoder pass has
    exactly `batch` rows (the last padded with zero noise of class 0), so that a sample does not
    depend on which others share its pass (module docstring)."""
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    starts = range(0, len(items), batch)
    with torch.inference_mode():
        for lo in tqdm.tqdm(starts, desc="sampling", unit="batch", disable=not progress, leave=False):
            part = items[lo : lo + batch]
            noise = torch.zeros(batch, *shape)
            noise[: len(part)] = sampling.per_sample_noise(seed, [sample_id(c, j) for c, j in part], shape)
            labels = torch.zeros(batch, dtype=torch.int64)
            labels[: len(part)] = torch.tensor([c for c, _ in part], dtype=torch.int64)
            x = sampling.meanflow_sample(net, noise.to(device), labels.to(device) if net.label_dim else None,
                                         num_steps=steps)
            yield part, decode(x)[: len(part)].cpu()


def _png_text(info: dict):
    from PIL.PngImagePlugin import PngInfo

    png = PngInfo()
    png.add_text(PNG_KEY, json.dumps(info, sort_keys=True))
    return png


def save_png(pixels: torch.Tensor, path, info: dict) -> None:
    """uint8 [3, H, W] -> PNG (written atomically) with `info` as a JSON text chunk."""
    from PIL import Image

    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=_png_text(info))


def grid_scale(size: int) -> int:
    """Nearest-neighbour upscaling factor of one image of `size` px in a grid (>= MIN_CELL px)."""
    return figures.readable_scale(size, MIN_CELL)


def grid_size(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a labelled grid of rows x cols images of height x width."""
    s = grid_scale(max(height, width))
    return PAD + cols * (width * s + PAD), PAD + rows * (LABEL_HEIGHT + height * s + PAD)


def save_labelled_grid(pixels: torch.Tensor, row_names: list[str], path, info: dict) -> tuple[int, int]:
    """Tile uint8 pixels [rows * cols, 3, H, W] (row-major) into a PNG with one row per name,
    `row_names[r]` written above row r; images upscaled by `grid_scale`. Returns (width, height)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = len(row_names)
    n, _, h, w = pixels.shape
    if rows == 0 or n % rows:
        raise ValueError(f"{n} images do not fill {rows} grid rows")
    cols, s = n // rows, grid_scale(max(h, w))
    big = pixels.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3).permute(0, 2, 3, 1).contiguous().numpy()
    canvas = Image.new("RGB", grid_size(rows, cols, h, w), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r, name in enumerate(row_names):
        top = PAD + r * (LABEL_HEIGHT + h * s + PAD)
        draw.text((PAD, top + 1), name, fill=(0, 0, 0), font=font)
        for c in range(cols):
            canvas.paste(Image.fromarray(big[r * cols + c]), (PAD + c * (w * s + PAD), top + LABEL_HEIGHT))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        canvas.save(f, format="PNG", pnginfo=_png_text(info))
    return canvas.size


def _file_stem(name: str) -> str:
    """A class name as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "class"


def _decoder(gen: Generator, vae_path, device):
    """`vae_lib.make_decoder`, with a latent net without a VAE as an error naming the checkpoint."""
    if gen.encoder.get("class_name") == vae_lib.VAE_ENCODER and vae_path is None:
        raise ValueError(
            f"{gen.path}: the net works in the latent space of {vae_lib.VAE_ENCODER} "
            f"({gen.encoder.get('vae_name', 'an SD VAE')}); pass its VAE as a local diffusers AutoencoderKL "
            "folder (vae=..., --vae DIR) to decode the samples"
        )
    return vae_lib.make_decoder(gen.encoder, vae_path, device)


def _resolve_device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample(
    checkpoint,
    *,
    classes=None,
    per_class: int = 1,
    seed: int = 0,
    steps: int = 1,
    out,
    grid: bool = False,
    vae=None,
    labels_csv=None,
    batch: int = 64,
    device=None,
    progress: bool = True,
    start: int = 0,
    source=None,
) -> dict:
    """Samples of a generator for the given classes, as PNGs or one labelled grid.

    checkpoint: a network checkpoint the pipeline writes (``train/<stage>/net_ema.pt``, an EMA
        snapshot, any `checkpoints.save_net` file) or an exported generator (folder, or its files).
    classes: class indices and/or synset names (one, or a sequence; str digits count as indices);
        None = every class of the net.
    per_class: samples per class, j = start .. start + per_class - 1.
    seed: noise seed; sample j of class c uses sample id c * ID_STRIDE + j (module docstring).
    steps: MeanFlow steps (1 = the one-step generator; K > 1 = `sampling.meanflow_sample`).
    out: a folder, receiving ``<synset-or-index>_<j>.png``; or a ``.png`` file, receiving the
        grid (implies grid). Other image suffixes (.jpg, ...) are refused (`_sheet_or_folder`).
    grid: one PNG with a row per class (its name above it) and a column per sample.
    vae: local diffusers AutoencoderKL folder; required for latent-space nets, unused otherwise.
    labels_csv: a run's data/labels.csv naming the classes (default: the card's class list for an
        export, else the checkpoint's run folder, see `find_run_classes`).
    batch: rows per net pass; with the seed, part of what fixes the pixels (module docstring).
    device: "cpu", "cuda", "cuda:1", ...; default CUDA when available.
    progress: tqdm bar over the batches.
    start: index j of the first sample of each class (start=j, per_class=1: sample j alone).
    source: for an export, the checkpoint it was made from, when not where its card says
        (`load_generator`).

    Returns a summary: checkpoint, kind, sha256, verified (one of VERIFIED), encoder, classes
    [{index, name}], per_class, start, seed, steps, batch, device, image_shape, num_images,
    sample_id (the scheme) and ``files`` (individual PNGs) or ``grid`` + ``grid_size`` (width,
    height), seconds. Each PNG's metadata carries sha256 and verified too.
    """
    t0 = time.time()
    require_int("per_class", per_class, 1, ID_STRIDE + 1)
    require_int("start", start, 0, ID_STRIDE - per_class + 1)
    require_int("steps", steps, 1)
    require_int("batch", batch, 1)
    sampling.per_sample_noise(seed, [], (1,))  # validates the seed before any work
    out = Path(out)
    grid = _sheet_or_folder(out, grid)
    gen = open_generator(checkpoint, source=source)
    chosen = resolve_classes(classes, class_list_for(gen, labels_csv), gen.net.label_dim)
    dev = _resolve_device(device)
    decode = _decoder(gen, vae, dev)
    items = [(c, j) for c, _ in chosen for j in range(start, start + per_class)]
    passes = iter_pixels(gen.net.to(dev), items, seed=seed, steps=steps, batch=batch, decode=decode, device=dev,
                         progress=progress)
    common = dict(net_sha256=gen.sha256, verified=gen.verified, seed=int(seed), steps=int(steps), batch=int(batch),
                  sample_id=f"class_index * {ID_STRIDE} + j")
    summary = dict(checkpoint=str(checkpoint), kind=gen.kind, sha256=gen.sha256, verified=gen.verified,
                   encoder=gen.encoder.get("class_name", vae_lib.PIXEL_ENCODER),
                   classes=[dict(index=c, name=n) for c, n in chosen], per_class=int(per_class), start=int(start),
                   seed=int(seed), steps=int(steps), batch=int(batch), device=str(dev), num_images=len(items),
                   sample_id=common["sample_id"])
    if grid:
        pixels = torch.cat([p for _, p in passes])
        names = [n if n == str(c) else f"{c}: {n}" for c, n in chosen]
        info = dict(common, classes=[c for c, _ in chosen], names=[n for _, n in chosen], js=[start, start + per_class])
        summary.update(image_shape=list(pixels.shape[1:]), grid=str(out),
                       grid_size=list(save_labelled_grid(pixels, names, out, info)))
    else:
        summary.update(_save_individual(passes, dict(chosen), out, common))
    summary["seconds"] = round(time.time() - t0, 3)
    return summary


# Suffixes that name one image file: without --grid such an `out` would be a folder named like an
# image (what `--out grid.png` once made), so .png means the sheet and the others are refused.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _sheet_or_folder(out: Path, grid: bool) -> bool:
    """Whether `out` receives one grid (True) or one PNG per sample (False): a ``.png`` name is the
    grid, with or without `grid`; other image names are refused, naming the flag and suffix to use."""
    suffix = out.suffix.lower()
    if grid and suffix != ".png":
        raise ValueError(f"{out}: with grid=True (--grid), out is the grid's .png file")
    if suffix in IMAGE_SUFFIXES and suffix != ".png":
        raise ValueError(f"{out}: names a {suffix} image, but samples are written as PNG: give a .png file "
                         "for one labelled grid (--grid is then implied), or a folder name without an image "
                         "suffix for one PNG per sample")
    grid = grid or suffix == ".png"
    if grid and out.is_dir():
        raise ValueError(f"{out}: is a folder, but a .png name means one grid image: remove or rename the "
                         "folder, or give a folder name without an image suffix for one PNG per sample")
    if not grid and out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file; without grid, out is the folder for one PNG per sample")
    return grid


def _save_individual(passes, names: dict[int, str], out: Path, common: dict) -> dict:
    """Write each pass's samples as ``<out>/<name>_<j>.png`` as they come -> {files, image_shape}."""
    out.mkdir(parents=True, exist_ok=True)
    files, shape = [], None
    for part, pixels in passes:
        shape = list(pixels.shape[1:])
        for image, (c, j) in zip(pixels, part):
            path = out / f"{_file_stem(names[c])}_{j}.png"
            save_png(image, path, dict(common, class_index=c, name=names[c], j=j, id=sample_id(c, j)))
            files.append(str(path))
    return {"files": files, "image_shape": shape}


# ----------------------------------------------------------------------------------------------
# Export.


def _json_safe(value):
    """A checkpoint's meta as JSON: tensors and other objects as their str."""
    return json.loads(json.dumps(value, default=str))


def _run_record(checkpoint: Path, digest: str) -> dict | None:
    """The provenance sidecar the checkpoint's run wrote (None without one), checked to describe
    the bytes whose sha256 is `digest`: a sidecar that records another digest is about a file that
    was replaced or edited after the run wrote it, and the run vouches for nothing that is there now."""
    record = provenance.read(checkpoint)  # a ValueError naming the sidecar if it is not JSON
    if record is None:
        return None
    recorded = (record.get("output") or {}).get("sha256")
    if recorded != digest:
        raise ValueError(f"{checkpoint}: sha256 {digest}, but its run recorded {recorded} in "
                         f"{provenance.sidecar_path(checkpoint)}: the file was replaced or edited after the run wrote "
                         "it, so the run does not vouch for it; rerun the rule that writes it")
    return record


def _provenance_digest(record: dict | None, checkpoint: Path) -> dict | None:
    """rule, output_sha256, config_hash and code of a checkpoint's provenance record, or None."""
    if record is None:
        return None
    return dict(sidecar=provenance.sidecar_path(checkpoint).name, rule=record.get("rule"),
                wildcards=record.get("wildcards"), output_sha256=(record.get("output") or {}).get("sha256"),
                config_hash=record.get("config_hash"), code=record.get("code"), finished=record.get("finished"))


def _name_in_run(checkpoint: Path) -> str:
    """The checkpoint's path relative to its run folder (no absolute paths in a card)."""
    resolved = checkpoint.resolve()
    for folder in resolved.parents[:RUN_SEARCH_DEPTH]:
        if (folder / "data").is_dir():
            return resolved.relative_to(folder).as_posix()
    return checkpoint.name


def build_card(gen: Generator, weights_sha256: str, class_list: ClassList | None, *, out_dir: Path,
               run_record: dict | None) -> dict:
    """The model.json card of an export of the checkpoint `gen` into `out_dir` (module docstring);
    `run_record`: the checkpoint's provenance sidecar (`_run_record`)."""
    net, checkpoint = gen.net, gen.path
    meta = _json_safe(gen.meta)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS_NAME, "sha256": weights_sha256, "dtype": "float32",
                    "num_parameters": sum(p.numel() for p in net.parameters())},
        "architecture": {"class": "remeanflow.networks.Precond", "init_kwargs": _json_safe(net.init_kwargs)},
        "encoder": gen.encoder or {"class_name": vae_lib.PIXEL_ENCODER},
        "classes": None if class_list is None else {"num_classes": len(class_list.names),
                                                   "synsets": class_list.names},
        "sampling": {
            "method": "MeanFlow average velocity u(x_t, t, r | c); flow x_t = (1-t) x + t n, data at t=0",
            "one_step": "x = n - u(n, t_max, 0 | c), n standard normal [C, R, R], c = class index",
            "t_max": sampling.T_MAX,
            "k_steps": "t_k = 1 - k/K; x <- x - (t_k - t_k+1) u(x, min(t_k, t_max), t_k+1 | c)",
            "noise": "remeanflow.sampling.per_sample_noise: numpy Philox keyed by (sample id, seed), stream 0",
            "sample_id": f"class_index * {ID_STRIDE} + j (remeanflow.generate)",
        },
        # `path` (relative to the export folder) is where `load_generator` looks for the source to
        # check the weights against; it stays valid while export and run move together.
        "source": {"checkpoint": _name_in_run(checkpoint),
                   "path": Path(os.path.relpath(checkpoint.resolve(), out_dir.resolve())).as_posix(),
                   "sha256": gen.sha256, "format": checkpoints.FORMAT, "meta": meta,
                   "training_config_hash": meta.get("config_hash")},
        "provenance": _provenance_digest(run_record, checkpoint),
    }


def _write_export_record(weights: Path, checkpoint: Path, digest: str, labels_csv) -> dict:
    """``model.safetensors.provenance.json``: the export as a step of the run's lineage (`python -m
    remeanflow provenance <export>/model.safetensors [--verify]`), with the source checkpoint (sha256
    `digest`, as loaded) as its input. Refuses a checkpoint that changed while it was exported."""
    inputs = {"checkpoint": [str(checkpoint)]}
    if labels_csv is not None:
        inputs["labels"] = [str(labels_csv)]
    record = provenance.write(weights, rule=EXPORT_RULE, config={"format": FORMAT, "format_version": FORMAT_VERSION},
                              inputs=inputs, extra={"card": CARD_NAME})
    recorded = record["inputs"]["checkpoint"][0]["sha256"]
    if recorded != digest:
        raise ValueError(f"{checkpoint}: changed while it was exported (sha256 {digest} when loaded, {recorded} "
                         "after); export again once whatever writes it has finished")
    return record


def export(checkpoint, out_dir, *, labels_csv=None) -> dict:
    """Write a checkpoint's net as ``<out_dir>/model.safetensors`` plus its ``model.json`` card
    and the weights' provenance sidecar (module docstring); returns the card.

    checkpoint: a project network checkpoint (``net_ema.pt``, a snapshot, ...). One with a
        provenance sidecar must still be the file its run recorded (`_run_record`).
    out_dir: the export folder (created; existing model.* files in it are replaced).
    labels_csv: the class list to record; default: the checkpoint's run (`find_run_classes`).
    """
    from safetensors.torch import save_file

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if checkpoint.exists() and _is_export(checkpoint):
        raise ValueError(f"{checkpoint}: already an exported generator (export takes a network checkpoint .pt)")
    gen = open_generator(checkpoint)
    run_record = _run_record(checkpoint, gen.sha256)
    class_list = class_list_for(gen, labels_csv)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file; the export goes to a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in gen.net.state_dict().items()}
    weights = out_dir / WEIGHTS_NAME
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    record = _write_export_record(weights, checkpoint, gen.sha256, labels_csv)
    card = build_card(gen, record["output"]["sha256"], class_list, out_dir=out_dir, run_record=run_record)
    with atomic_path(out_dir / CARD_NAME) as tmp:  # the card last: it marks a complete export
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
    return card


def read_card(path) -> dict:
    """An export's model.json, checked (format, version, the keys a load needs)."""
    card_path, weights = _export_files(Path(path))
    if not card_path.is_file():
        what = f"it has {WEIGHTS_NAME} but" if weights.is_file() else "it"
        raise FileNotFoundError(f"{card_path.parent}: not an exported generator: {what} has no {CARD_NAME} card "
                                "(written by `remeanflow export` beside the weights)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{card_path}: not a generator card ({_first_line(e)})") from e
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"{card_path}: format {found!r}, expected {FORMAT!r}")
    if card.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{card_path}: format_version {card.get('format_version')!r}; this code reads "
                         f"version {FORMAT_VERSION}")
    missing = [k for k in ("weights", "architecture", "encoder") if not isinstance(card.get(k), dict)]
    if missing:
        raise ValueError(f"{card_path}: card lacks {missing}")
    return card


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: not a safetensors file ({_first_line(e)})") from e


def _first_difference(state: dict, reference: dict) -> str | None:
    """What first differs between two state_dicts (names, dtype or any element), or None."""
    if state.keys() != reference.keys():
        return f"the parameter names ({sorted(state.keys() ^ reference.keys())[:3]})"
    for name, value in state.items():
        if value.dtype != reference[name].dtype or not torch.equal(value, reference[name]):
            return f"tensor {name!r}"
    return None


def _card_source_path(card_path: Path, recorded: dict) -> Path | None:
    """Where the card says its source checkpoint is (``source.path``, relative to the export
    folder), or None for a card without one."""
    return card_path.parent / recorded["path"] if recorded.get("path") else None


def _verify_source(card_path: Path, card: dict, weights: Path, state: dict, source) -> dict:
    """Check the card against the checkpoint it names (`source` overrides where): the checkpoint's
    sha256 is the card's, its run's provenance record agrees, and its net's tensors equal the
    exported ones. -> {verified: "source" | "card-only", source: its path or None}; without a
    reachable source, a warning that only the card vouches for the weights."""
    recorded = card.get("source") or {}
    located = Path(source) if source is not None else _card_source_path(card_path, recorded)
    if located is None or not located.is_file():
        if source is not None:
            raise FileNotFoundError(f"{source}: no such source checkpoint (source=, --source: the checkpoint the "
                                    "export was made from)")
        log.warning("%s: verified against its own card %s only: the source checkpoint %s is not at %s, so weights "
                    "edited together with the card's digest would go unnoticed; pass the checkpoint (source=..., "
                    "--source) to check the weights against it", weights, card_path, recorded.get("checkpoint"),
                    located or "a path the card records")
        return {"verified": "card-only", "source": None}
    with _unchanged(located):
        digest = cached_sha256(located)
        if digest != recorded.get("sha256"):
            raise ValueError(f"{card_path}: made from a checkpoint with sha256 {recorded.get('sha256')}, but its "
                             f"source {located} has sha256 {digest}: the checkpoint was retrained or replaced since the "
                             "export, or the card was edited; export it again, or pass the checkpoint it was made "
                             "from (source=..., --source)")
        _run_record(located, digest)
        reference = _load_checkpoint(located)["net"].state_dict()
    differs = _first_difference(state, reference)
    if differs is not None:
        raise ValueError(f"{weights}: {differs} differs from the source checkpoint {located} that its card {card_path} "
                         "names (the checkpoint itself matches the card): the weights were changed after export and "
                         "the card's digest made to match; do not use this export, export the checkpoint again")
    return {"verified": "source", "source": str(located)}


def _check_export_record(weights: Path, digest: str, card: dict) -> None:
    """The export's own provenance sidecar, when it travels with it, agrees with the weights read
    and the card's source (it is as editable as the card: a consistency check, not a proof)."""
    record = provenance.read(weights)
    if record is None:
        return
    side = provenance.sidecar_path(weights)
    source = ((record.get("inputs") or {}).get("checkpoint") or [{}])[0].get("sha256")
    if (record.get("output") or {}).get("sha256") != digest or source != (card.get("source") or {}).get("sha256"):
        raise ValueError(f"{weights}: its provenance sidecar {side} records other weights or another source checkpoint "
                         "than the card and the weights read: one of the export's files was changed or replaced; "
                         "export the checkpoint again")


def load_generator(path, *, verify: bool = True, source=None) -> dict:
    """Rebuild an exported generator from its files, checked as far as they can be.

    path: the export folder, its model.safetensors or its model.json.
    verify: check the weights' sha256 against the card, the card against its source checkpoint when
        that is reachable (`_verify_source`) and against the export's provenance sidecar when present;
        False: no check at all (verified "none").
    source: the checkpoint the export was made from, when it is not at the card's ``source.path``
        (relative to the export folder); it must exist.
    Returns dict(net=networks.Precond in eval mode without grads (CPU), card, init_kwargs, encoder,
    meta, verification={verified: one of VERIFIED, source: the checkpoint checked against or None}).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such exported generator")
    card = read_card(path)
    card_path = _export_files(path)[0]
    weights = card_path.parent / card["weights"].get("file", WEIGHTS_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing: the card {card_path} names it as the weights file")
    if verify:
        with _unchanged(weights):
            digest = cached_sha256(weights)
            if digest != card["weights"].get("sha256"):
                raise ValueError(f"{weights}: sha256 differs from the one recorded in {card_path}: the weights changed "
                                 "or belong to another export")
            state = _read_weights(weights)
        verification = _verify_source(card_path, card, weights, state, source)
        _check_export_record(weights, digest, card)
    else:
        state, verification = _read_weights(weights), {"verified": "none", "source": None}
    init_kwargs = card["architecture"].get("init_kwargs")
    try:
        net = networks.Precond(**init_kwargs)
        net.load_state_dict(state, strict=True)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{weights}: weights do not match the architecture in {card_path} ({_first_line(e)})") from e
    net.eval().requires_grad_(False)
    return dict(net=net, card=card, init_kwargs=init_kwargs, encoder=card["encoder"],
                meta=(card.get("source") or {}).get("meta") or {}, verification=verification)


# ----------------------------------------------------------------------------------------------
# Command line (hooked into `python -m remeanflow` by __main__).

CLI_ERRORS = (ValueError, FileNotFoundError, ImportError)


def _split_classes(tokens) -> list[str] | None:
    if not tokens:
        return None
    return [part for token in tokens for part in token.replace(",", " ").split()]


def _sample_command(args) -> int:
    try:
        summary = sample(args.checkpoint, classes=_split_classes(args.classes), per_class=args.per_class,
                         seed=args.seed, steps=args.steps, out=args.out, grid=args.grid, vae=args.vae,
                         labels_csv=args.labels, batch=args.batch, device=args.device,
                         progress=not args.quiet, start=args.start, source=args.source)
    except CLI_ERRORS as e:
        print(f"remeanflow sample: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        where = summary.get("grid") or args.out
        checked = {"source": "; export verified against its source checkpoint",
                   "card-only": "; export verified against its own card only (source checkpoint not found)"}
        print(f"wrote {summary['num_images']} samples ({len(summary['classes'])} classes x {args.per_class}, "
              f"{args.steps} step{'s' if args.steps > 1 else ''}) to {where}{checked.get(summary['verified'], '')}")
    return 0


def _export_command(args) -> int:
    try:
        card = export(args.checkpoint, args.out, labels_csv=args.labels)
    except CLI_ERRORS as e:
        print(f"remeanflow export: {e}", file=sys.stderr)
        return 2
    classes = card["classes"]["num_classes"] if card["classes"] else "no class list"
    print(f"wrote {Path(args.out) / WEIGHTS_NAME} (and its provenance sidecar) and {Path(args.out) / CARD_NAME} "
          f"({card['weights']['num_parameters']} parameters, {classes} classes)")
    return 0


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """The ``sample`` subcommand; `func` returns the exit code (0, or 2 for bad input)."""
    p = subparsers.add_parser(
        "sample", help="one-step (or K-step) class-conditional samples of a trained generator as PNGs or a grid",
        description="Generate samples of a network checkpoint (train/<stage>/net_ema.pt, an EMA snapshot) or "
                    "of a folder written by `remeanflow export`: one PNG per sample (<synset>_<j>.png) or, "
                    "with --grid or an --out ending in .png, one labelled grid (a row per class). Sample j of class c always gets the "
                    f"noise of sample id c*{ID_STRIDE}+j under --seed, so --start J --per-class 1 "
                    "regenerates sample J alone (same --batch and device for identical pixels).",
        epilog="exit codes: 0 = written; 2 = bad input (missing or foreign file, unknown class, latent net "
               "without --vae, ...), named on stderr")
    p.add_argument("checkpoint", help="a .pt network checkpoint of the pipeline, or an exported folder")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="class indices and/or synset names, space- or comma-separated (default: every class)")
    p.add_argument("--per-class", type=int, default=1, metavar="N", help="samples per class (default 1)")
    p.add_argument("--start", type=int, default=0, metavar="J", help="index of the first sample of each class")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="noise seed (default 0)")
    p.add_argument("--steps", type=int, default=1, metavar="K", help="MeanFlow sampling steps (default 1)")
    p.add_argument("--grid", action="store_true",
                   help="write one labelled grid PNG to --out instead of files (implied by an --out ending in .png)")
    p.add_argument("--vae", metavar="DIR", help="local diffusers AutoencoderKL folder (required for latent nets)")
    p.add_argument("--labels", metavar="CSV",
                   help="the run's data/labels.csv naming the classes (default: found beside the checkpoint)")
    p.add_argument("--batch", type=int, default=64, help="rows per net pass (default 64)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--source", metavar="CKPT",
                   help="for an export: the checkpoint it was made from, when not where its card says; the weights "
                        "are checked against it (without a reachable source, only against the card)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="output folder (one PNG per sample), or a .png file (one labelled grid)")
    p.set_defaults(func=_sample_command)
    return p


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """The ``export`` subcommand; `func` returns the exit code (0, or 2 for bad input)."""
    p = subparsers.add_parser(
        "export", help="write a checkpoint's generator as model.safetensors plus a model.json card",
        description="Export the net of a checkpoint (e.g. results/<run>/train/stage2/net_ema.pt) to OUT/"
                    f"{WEIGHTS_NAME} and OUT/{CARD_NAME}: architecture, encoder, class list and training "
                    "provenance, plus OUT/model.safetensors.provenance.json. `remeanflow sample OUT ...` and "
                    "`remeanflow.generate.load_generator(OUT)` read it back without the project's checkpoint "
                    "format, checking the weights against the card and, while it is reachable, against the "
                    "source checkpoint (docs/using-a-trained-model.md).",
        epilog="exit codes: 0 = written; 2 = bad input, named on stderr")
    p.add_argument("checkpoint", help="a .pt network checkpoint of the pipeline")
    p.add_argument("out", help="export folder (created)")
    p.add_argument("--labels", metavar="CSV", help="the run's data/labels.csv (default: found beside the checkpoint)")
    p.set_defaults(func=_export_command)
    return p
