"""Tests of remeanflow.generate: sampling a trained generator to PNGs and grids, its export as
safetensors plus a card, the errors for bad input, the CLI subcommands and the sample_sheet rule.

The shared `tiny_run` is only read: every output goes to tmp_path."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_checkout, save_tiny_vae
from PIL import Image

from remeanflow import checkpoints, generate, networks, provenance, sampling
from remeanflow.fileio import sha256_file, side_digest_path, write_side_digest
from remeanflow.inception import to_uint8

SYNSETS = ["n01000000", "n01000001", "n01000002", "n01000003"]  # the TINY toy run's classes


@pytest.fixture(scope="module")
def net_path(tiny_run):
    return tiny_run[2] / "train" / "stage2" / "net_ema.pt"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def png_info(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[generate.PNG_KEY])


def run(net_path, out, **kw):
    return generate.sample(net_path, out=out, progress=False, **kw)


# -- sampling ----------------------------------------------------------------------------------


def test_samples_are_deterministic_and_regenerable_one_at_a_time(net_path, tmp_path):
    a = run(net_path, tmp_path / "a", classes=[0, "n01000002"], per_class=3, seed=5)
    run(net_path, tmp_path / "b", classes=["n01000002", 0], per_class=3, seed=5)  # other order
    names = sorted(Path(f).name for f in a["files"])
    assert names == [f"{s}_{j}.png" for s in ("n01000000", "n01000002") for j in range(3)]
    for name in names:  # same request -> same bytes (the PNG holds no path or time)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Sample 1 of class 2 alone (another pass composition, same batch) equals it in the bigger request.
    alone = run(net_path, tmp_path / "alone", classes=[2], start=1, per_class=1, seed=5)
    assert [Path(f).name for f in alone["files"]] == ["n01000002_1.png"]
    assert Path(alone["files"][0]).read_bytes() == (tmp_path / "a" / "n01000002_1.png").read_bytes()
    # ... and so does a request with more samples per class and every class (ids do not depend on them).
    more = run(net_path, tmp_path / "more", per_class=4, seed=5)
    assert len(more["files"]) == 16
    assert (tmp_path / "more" / "n01000002_1.png").read_bytes() == (tmp_path / "a" / "n01000002_1.png").read_bytes()
    # The PNG says how to regenerate it.
    info = png_info(tmp_path / "a" / "n01000002_1.png")
    assert info["id"] == 2 * generate.ID_STRIDE + 1 and info["seed"] == 5 and info["steps"] == 1
    assert info["name"] == "n01000002" and info["j"] == 1 and info["batch"] == 64
    assert info["net_sha256"] == checkpoints.net_sha256(net_path) == a["sha256"]
    # Another seed, other images; samples of one class differ.
    other = run(net_path, tmp_path / "c", classes=[0], per_class=1, seed=6)
    assert not np.array_equal(pixels(other["files"][0]), pixels(tmp_path / "a" / "n01000000_0.png"))
    assert not np.array_equal(pixels(tmp_path / "a" / "n01000000_0.png"), pixels(tmp_path / "a" / "n01000000_1.png"))
    assert a["image_shape"] == [3, 8, 8] and a["num_images"] == 6 and a["encoder"] == "StandardRGBEncoder"


def test_pixels_are_the_one_step_samples_of_the_documented_noise(net_path, tmp_path):
    items = [(1, 0), (1, 1), (3, 0), (3, 1)]
    ids = [c * generate.ID_STRIDE + j for c, j in items]
    noise = sampling.per_sample_noise(7, ids, (3, 8, 8))
    labels = torch.tensor([c for c, _ in items])
    net = checkpoints.load_net(net_path)["net"]
    for steps in (1, 3):
        # batch = the request size: the same kernel shapes as this direct computation.
        got = run(net_path, tmp_path / f"k{steps}", classes=[1, 3], per_class=2, seed=7, steps=steps, batch=4)
        assert got["steps"] == steps
        with torch.inference_mode():
            want = to_uint8(sampling.meanflow_sample(net, noise, labels, num_steps=steps))
        for f, w in zip(got["files"], want):
            np.testing.assert_array_equal(pixels(f), w.permute(1, 2, 0).numpy())
    one = pixels(tmp_path / "k1" / "n01000001_0.png")
    assert not np.array_equal(one, pixels(tmp_path / "k3" / "n01000001_0.png"))  # K steps is another sampler


def test_classes_by_index_synset_and_labels_file(net_path, tmp_path):
    by_index = run(net_path, tmp_path / "i", classes=[1, "3"])
    by_name = run(net_path, tmp_path / "n", classes=["n01000001", "n01000003"])
    assert by_index["classes"] == by_name["classes"] == [{"index": 1, "name": "n01000001"},
                                                         {"index": 3, "name": "n01000003"}]
    for f, g in zip(by_index["files"], by_name["files"]):
        assert Path(f).read_bytes() == Path(g).read_bytes()
    assert [c["name"] for c in run(net_path, tmp_path / "all", per_class=1)["classes"]] == SYNSETS
    assert run(net_path, tmp_path / "dup", classes=[2, "n01000002"])["num_images"] == 1  # duplicates once

    # A checkpoint outside its run: classes by index, named by index, until a labels.csv is given.
    loose = tmp_path / "loose" / "net.pt"
    loose.parent.mkdir()
    shutil.copy(net_path, loose)
    bare = run(loose, tmp_path / "bare", classes=[2])
    assert bare["classes"] == [{"index": 2, "name": "2"}] and Path(bare["files"][0]).name == "2_0.png"
    assert np.array_equal(pixels(bare["files"][0]), pixels(tmp_path / "dup" / "n01000002_0.png"))
    with pytest.raises(ValueError, match="no class list was found.*labels.csv"):
        run(loose, tmp_path / "x", classes=["n01000002"])
    labels = net_path.parents[2] / "data" / "labels.csv"
    named = run(loose, tmp_path / "named", classes=["n01000002"], labels_csv=labels)
    assert named["classes"] == [{"index": 2, "name": "n01000002"}]
    assert generate.classes_from_csv(labels).names == SYNSETS
    assert generate.find_run_classes(net_path).names == SYNSETS
    snapshot = next((net_path.parents[1] / "work" / "stage2" / "snapshots").glob("ema-step-*.pt"))
    assert generate.find_run_classes(snapshot).names == SYNSETS  # four levels below the run


def test_grid_layout_rows_are_classes_columns_are_samples(net_path, tmp_path):
    out = tmp_path / "sheet" / "grid.png"
    got = run(net_path, out, grid=True, per_class=2, seed=3)
    scale = generate.grid_scale(8)
    assert scale == 16  # 8 px images shown at 128 px
    cell_w, cell_h = 8 * scale, generate.LABEL_HEIGHT + 8 * scale
    width, height = generate.PAD + 2 * (cell_w + generate.PAD), generate.PAD + 4 * (cell_h + generate.PAD)
    assert tuple(got["grid_size"]) == generate.grid_size(4, 2, 8, 8) == (width, height)
    grid = pixels(out)
    assert grid.shape == (height, width, 3)
    files = run(net_path, tmp_path / "files", per_class=2, seed=3)["files"]
    for k, f in enumerate(files):  # row = class, column = sample, each cell the upscaled sample
        r, c = divmod(k, 2)
        top = generate.PAD + r * (cell_h + generate.PAD) + generate.LABEL_HEIGHT
        left = generate.PAD + c * (cell_w + generate.PAD)
        cell = grid[top : top + 8 * scale, left : left + cell_w]
        np.testing.assert_array_equal(cell, pixels(f).repeat(scale, 0).repeat(scale, 1))
    label = grid[generate.PAD : generate.PAD + generate.LABEL_HEIGHT, generate.PAD : width - generate.PAD]
    assert (label < 128).any() and (label == 255).mean() > 0.5  # dark text on white above each row
    info = png_info(out)
    assert info["names"] == SYNSETS and info["classes"] == [0, 1, 2, 3] and info["js"] == [0, 2]
    assert run(net_path, tmp_path / "again.png", grid=True, per_class=2, seed=3)["grid_size"] == got["grid_size"]
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()


# -- export --------------------------------------------------------------------------------------


def test_export_round_trip_is_bit_exact_and_samples_the_same(net_path, tmp_path):
    out = tmp_path / "export"
    card = generate.export(net_path, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors",
                                                     "model.safetensors.provenance.json"]
    record = provenance.read(out / "model.safetensors")  # the export is a step of the run's lineage
    assert record["inputs"]["checkpoint"][0]["provenance"] == str(net_path) + ".provenance.json"
    import remeanflow

    assert remeanflow.load_generator is generate.load_generator  # the package-level entry point
    assert json.loads((out / "model.json").read_text()) == card
    source = checkpoints.load_net(net_path)
    assert card["format"] == generate.FORMAT and card["format_version"] == generate.FORMAT_VERSION
    assert card["architecture"]["init_kwargs"] == source["init_kwargs"]
    assert card["encoder"] == source["encoder"] and card["classes"]["synsets"] == SYNSETS
    side = json.loads((net_path.parent / "net_ema.pt.provenance.json").read_text())
    prov = card["provenance"]
    assert prov["output_sha256"] == side["output"]["sha256"] == checkpoints.net_sha256(net_path)
    assert prov["config_hash"] == side["config_hash"] and prov["code"] == side["code"]
    assert prov["rule"] == "train_stage2" and card["source"]["checkpoint"] == "train/stage2/net_ema.pt"
    assert card["source"]["training_config_hash"] == source["meta"]["config_hash"]
    assert str(tmp_path) not in json.dumps(card) and str(net_path.parent) not in json.dumps(card)

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t, r, labels = torch.rand(5) * 0.9 + 0.05, torch.rand(5) * 0.05, torch.tensor([0, 1, 2, 3, 1])
    want = source["net"](x, t, r, labels)
    for path in (out, out / "model.safetensors", out / "model.json"):
        loaded = generate.load_generator(path)
        net = loaded["net"]
        assert isinstance(net, networks.Precond) and not net.training
        assert not any(p.requires_grad for p in net.parameters())
        assert torch.equal(net(x, t, r, labels), want)
        assert loaded["card"] == card and loaded["encoder"] == source["encoder"]
        assert loaded["verification"] == {"verified": "source", "source": str(out / card["source"]["path"])}
    for k, v in source["net"].state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k

    # `sample` reads the export: the same pixels (the PNG records the weights' sha256 instead).
    a = run(net_path, tmp_path / "from_ckpt", classes=[3, 0], per_class=2, steps=2)
    b = run(out, tmp_path / "from_export", classes=["n01000003", 0], per_class=2, steps=2)
    assert b["kind"] == "export" and b["sha256"] == card["weights"]["sha256"]
    assert [Path(f).name for f in a["files"]] == [Path(f).name for f in b["files"]]
    for f, g in zip(a["files"], b["files"]):
        np.testing.assert_array_equal(pixels(f), pixels(g))

    # A snapshot (no provenance sidecar) exports too.
    snapshot = next((net_path.parents[1] / "work" / "stage2" / "snapshots").glob("ema-step-*.pt"))
    snap = generate.export(snapshot, tmp_path / "snap")
    assert snap["provenance"] is None and snap["classes"]["synsets"] == SYNSETS
    assert snap["source"]["checkpoint"].startswith("train/work/stage2/snapshots/ema-step-")


# -- what an export can prove (fast: a run folder built in the test) ---------------------------------


def tiny_pixel_net(seed: int) -> networks.Precond:
    torch.manual_seed(seed)
    return networks.build("tiny", img_channels=3)


@pytest.fixture
def small_run(tmp_path):
    """A run folder made in a second: data/ and train/stage2/net_ema.pt with its provenance sidecar."""
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    ckpt = run_dir / "train" / "stage2" / "net_ema.pt"
    ckpt.parent.mkdir(parents=True)
    checkpoints.save_net(ckpt, tiny_pixel_net(0))
    provenance.write(ckpt, rule="train_stage2", config={}, inputs=[])
    return ckpt


def flip_last_byte(path: Path) -> None:
    """Flip a byte inside the tensor data (safetensors: header first, data after it)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


def set_card_digest(export_dir: Path) -> None:
    """Make model.json's weights digest match the (edited) weights: a consistent edit."""
    card = json.loads((export_dir / "model.json").read_text())
    card["weights"]["sha256"] = sha256_file(export_dir / "model.safetensors")
    (export_dir / "model.json").write_text(json.dumps(card))


def test_export_records_its_source_and_is_verified_against_it(small_run, tmp_path):
    out = small_run.parents[2] / "export"  # inside the run: moving the run keeps the source reachable
    card = generate.export(small_run, out)
    assert card["source"]["path"] == "../train/stage2/net_ema.pt" and card["source"]["sha256"] == sha256_file(small_run)
    record = provenance.read(out / "model.safetensors")
    assert record["rule"] == "export" and record["output"]["sha256"] == card["weights"]["sha256"]
    assert record["inputs"]["checkpoint"][0]["sha256"] == card["source"]["sha256"]
    loaded = generate.load_generator(out)
    assert loaded["verification"] == {"verified": "source", "source": str(out / "../train/stage2/net_ema.pt")}
    got = run(out, tmp_path / "s", classes=[1])
    assert got["verified"] == "source" and png_info(got["files"][0])["verified"] == "source"
    moved = tmp_path / "moved"
    shutil.move(small_run.parents[2], moved)
    assert generate.load_generator(moved / "export")["verification"]["verified"] == "source"


def test_export_with_a_flipped_byte_is_refused(small_run, tmp_path):
    out = tmp_path / "export"
    generate.export(small_run, out)
    flip_last_byte(out / "model.safetensors")
    with pytest.raises(ValueError, match=r"export/model\.safetensors: sha256 differs from the one recorded in "
                                         r".*export/model\.json"):
        generate.load_generator(out)
    with pytest.raises(ValueError, match="sha256 differs"):
        run(out, tmp_path / "s", classes=[0])
    assert not (tmp_path / "s").exists()


def test_export_edited_consistently_is_refused_naming_the_source(small_run, tmp_path, capsys):
    out = tmp_path / "export"
    generate.export(small_run, out)
    flip_last_byte(out / "model.safetensors")
    set_card_digest(out)
    both = r"export/model\.safetensors: tensor .* differs from the source checkpoint .*train/stage2/net_ema\.pt"
    with pytest.raises(ValueError, match=both):
        generate.load_generator(out)
    assert cli(["sample", out, "--quiet", "--out", tmp_path / "s"]) == 2
    assert "differs from the source checkpoint" in capsys.readouterr().err and not (tmp_path / "s").exists()
    # Source out of reach: the export's own provenance sidecar, when it travels with it, still disagrees.
    far = tmp_path / "far" / "away" / "export"
    shutil.copytree(out, far)
    with pytest.raises(ValueError, match=r"its provenance sidecar .*model\.safetensors\.provenance\.json records "
                                         "other weights"):
        generate.load_generator(far)
    with pytest.raises(ValueError, match=both):  # the source given explicitly
        generate.load_generator(far, source=small_run)


def test_export_whose_source_changed_is_refused(small_run, tmp_path):
    out = tmp_path / "export"
    generate.export(small_run, out)
    checkpoints.save_net(small_run, tiny_pixel_net(1))  # retrained (its run's sidecar not rewritten)
    with pytest.raises(ValueError, match=r"export/model\.json: made from a checkpoint with sha256 [0-9a-f]{64}, but "
                                         r"its source .*net_ema\.pt has sha256 [0-9a-f]{64}: .*export it again"):
        generate.load_generator(out)
    # The run vouches for the bytes it recorded only: exporting the replaced file is refused too.
    with pytest.raises(ValueError, match=r"net_ema\.pt: sha256 [0-9a-f]{64}, but its run recorded [0-9a-f]{64} "
                                         r"in .*net_ema\.pt\.provenance\.json"):
        generate.export(small_run, tmp_path / "again")


def test_export_without_its_source_loads_verified_against_its_card_only(small_run, tmp_path, caplog, capsys):
    out = tmp_path / "export"
    generate.export(small_run, out)
    shared = tmp_path / "elsewhere" / "deeper" / "shared"  # what a recipient gets: the two files
    shared.mkdir(parents=True)
    for name in ("model.safetensors", "model.json"):
        shutil.copy(out / name, shared)
    with caplog.at_level("WARNING", logger="remeanflow.generate"):
        loaded = generate.load_generator(shared)
    assert loaded["verification"] == {"verified": "card-only", "source": None}
    assert "verified against its own card" in caplog.text and "net_ema.pt" in caplog.text
    got = run(shared, tmp_path / "s", classes=[2])
    assert got["verified"] == "card-only" and png_info(got["files"][0])["verified"] == "card-only"
    # Pointing at the checkpoint restores the full check; a missing one is an error, not a downgrade.
    assert run(shared, tmp_path / "t", classes=[2], source=small_run)["verified"] == "source"
    assert cli(["sample", shared, "--source", small_run, "--quiet", "--out", tmp_path / "u"]) == 0
    assert "export verified against its source checkpoint" in capsys.readouterr().out
    assert cli(["sample", shared, "--quiet", "--out", tmp_path / "v"]) == 0
    assert "verified against its own card only" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such source checkpoint"):
        generate.load_generator(shared, source=tmp_path / "nope.pt")
    # Without the source, a consistent edit is exactly what the card cannot detect (documented).
    flip_last_byte(shared / "model.safetensors")
    set_card_digest(shared)
    assert generate.load_generator(shared)["verification"]["verified"] == "card-only"


def test_png_digest_is_of_the_checkpoint_read_not_a_stale_side_file(tmp_path):
    ckpt = tmp_path / "net.pt"
    checkpoints.save_net(ckpt, tiny_pixel_net(0))
    write_side_digest(ckpt)  # a side file with the file's identity, as the pipeline writes them
    stale = side_digest_path(ckpt).read_bytes()
    other = tmp_path / "other.pt"
    checkpoints.save_net(other, tiny_pixel_net(1))
    os.replace(other, ckpt)  # the checkpoint replaced, its side file kept
    side_digest_path(ckpt).write_bytes(stale)
    assert side_digest_path(ckpt).read_text().split()[0] != sha256_file(ckpt)
    got = run(ckpt, tmp_path / "s", classes=[0])
    assert png_info(got["files"][0])["net_sha256"] == got["sha256"] == sha256_file(ckpt)
    assert got["verified"] == "checkpoint"
    card = generate.export(ckpt, tmp_path / "export")  # the card records the bytes read, too
    assert card["source"]["sha256"] == sha256_file(ckpt)


def test_out_with_an_image_suffix_is_one_grid_and_a_folder_is_one_png_per_sample(tmp_path):
    ckpt = tmp_path / "net.pt"
    checkpoints.save_net(ckpt, tiny_pixel_net(0))
    sheet = run(ckpt, tmp_path / "sheet.png", classes=[0, 1], per_class=2)  # no grid=True
    assert (tmp_path / "sheet.png").is_file() and sheet["grid"] == str(tmp_path / "sheet.png")
    run(ckpt, tmp_path / "explicit.png", classes=[0, 1], per_class=2, grid=True)
    assert (tmp_path / "sheet.png").read_bytes() == (tmp_path / "explicit.png").read_bytes()
    for name in ("samples", "samples.v2"):  # a folder, also with a suffix that is no image's
        files = run(ckpt, tmp_path / name, classes=[0, 1], per_class=2)["files"]
        assert (tmp_path / name).is_dir() and sorted(Path(f).name for f in files) == ["0_0.png", "0_1.png",
                                                                                      "1_0.png", "1_1.png"]
    for name in ("sheet.jpg", "sheet.JPEG", "sheet.webp"):
        with pytest.raises(ValueError, match=r"names a \.\w+ image, but samples are written as PNG: give a \.png "
                                             r"file for one labelled grid \(--grid is then implied\), or a folder"):
            run(ckpt, tmp_path / name, classes=[0])
        assert not (tmp_path / name).exists()
    (tmp_path / "old.png").mkdir()  # what `--out old.png` used to create
    with pytest.raises(ValueError, match=r"old\.png: is a folder, but a \.png name means one grid image"):
        run(ckpt, tmp_path / "old.png", classes=[0])
    assert cli(["sample", ckpt, "--classes", "0", "--quiet", "--out", tmp_path / "cli.png"]) == 0
    assert (tmp_path / "cli.png").is_file()


# -- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_are_errors_naming_the_file(net_path, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt: no such file"):
        run(missing, tmp_path / "o")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"notes\.txt: not a remeanflow network checkpoint"):
        run(text, tmp_path / "o")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.pt: not a remeanflow network checkpoint"):
        run(foreign, tmp_path / "o")
    state_only = tmp_path / "state.pt"
    torch.save(checkpoints.load_net(net_path)["net"].state_dict(), state_only)
    with pytest.raises(ValueError, match=r"state\.pt: not a remeanflow network checkpoint"):
        run(state_only, tmp_path / "o")
    with pytest.raises(ValueError, match=r"unknown class 'n09999999'.*4 classes, e\.g\. n01000000, n01000001"):
        run(net_path, tmp_path / "o", classes=["n01000001", "n09999999"])
    with pytest.raises(ValueError, match=r"class index 4 out of range: the net has 4 classes"):
        run(net_path, tmp_path / "o", classes=[4])
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("index,label,synset,member\n0,0,a,a/0.JPEG\n1,1,b,b/0.JPEG\n")
    with pytest.raises(ValueError, match=r"labels\.csv lists 2 classes but .*net_ema\.pt has 4"):
        run(net_path, tmp_path / "o", labels_csv=bad_labels)
    with pytest.raises(ValueError, match=r"grid\.jpg: with grid=True"):
        run(net_path, tmp_path / "grid.jpg", grid=True)
    with pytest.raises(ValueError, match="per_class must be an integer"):
        run(net_path, tmp_path / "o", per_class=0)
    assert not (tmp_path / "o").exists()  # nothing written by a failed request

    # Export folders: no card, card without weights, weights changed, not an export at all.
    out = tmp_path / "export"
    generate.export(net_path, out)
    no_card = tmp_path / "no_card"
    no_card.mkdir()
    shutil.copy(out / "model.safetensors", no_card)
    with pytest.raises(FileNotFoundError, match=r"no_card: not an exported generator: it has model\.safetensors "
                                                r"but has no model\.json"):
        run(no_card, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no model.json"):
        generate.load_generator(no_card / "model.safetensors")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(out / "model.json", no_weights)
    with pytest.raises(FileNotFoundError, match=r"no_weights/model\.safetensors: missing: the card"):
        run(no_weights, tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty: not an exported generator"):
        run(empty, tmp_path / "o")
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    other = generate.export(next((net_path.parents[1] / "work" / "stage2" / "snapshots").glob("*.pt")),
                            tmp_path / "other")
    assert other["weights"]["sha256"] != json.loads((out / "model.json").read_text())["weights"]["sha256"]
    shutil.copy(tmp_path / "other" / "model.safetensors", changed / "model.safetensors")
    with pytest.raises(ValueError, match=r"changed/model\.safetensors: sha256 differs from the one recorded"):
        generate.load_generator(changed)
    (changed / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"changed/model\.json: not a generator card"):
        generate.load_generator(changed)
    (changed / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match=r"format 'something-else', expected 'remeanflow-generator'"):
        generate.load_generator(changed)
    with pytest.raises(ValueError, match="already an exported generator"):
        generate.export(out, tmp_path / "again")


# -- a latent net through a small VAE ------------------------------------------------------------


def test_latent_net_decodes_through_the_vae(tmp_path):
    pytest.importorskip("diffusers", reason="the 'vae' extra (diffusers) is not installed")
    vae_dir = save_tiny_vae(tmp_path / "tiny-vae")
    net = networks.build("tiny", img_channels=4)  # 4 x 8 x 8 latents -> 3 x 16 x 16 pixels
    encoder = dict(class_name="StabilityVAEEncoder", vae_name="tiny-test-vae", raw_mean=[5.81, 3.25, 0.12, -2.15],
                   raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=[0.0] * 4, final_std=[0.5] * 4, batch_size=8)
    latent = tmp_path / "latent.pt"
    checkpoints.save_net(latent, net, encoder=encoder)

    with pytest.raises(ValueError, match=r"latent\.pt: the net works in the latent space of StabilityVAEEncoder "
                                         r"\(tiny-test-vae\); pass its VAE"):
        run(latent, tmp_path / "o", classes=[0])
    got = run(latent, tmp_path / "files", classes=[0, 3], per_class=2, vae=vae_dir)
    assert got["image_shape"] == [3, 16, 16] and got["encoder"] == "StabilityVAEEncoder"
    assert all(pixels(f).shape == (16, 16, 3) for f in got["files"])
    alone = run(latent, tmp_path / "alone", classes=[3], start=1, vae=vae_dir)
    assert Path(alone["files"][0]).read_bytes() == (tmp_path / "files" / "3_1.png").read_bytes()
    grid = run(latent, tmp_path / "grid.png", classes=[0, 3], per_class=2, vae=vae_dir, grid=True)
    assert tuple(grid["grid_size"]) == generate.grid_size(2, 2, 16, 16) == Image.open(tmp_path / "grid.png").size
    # The export keeps the encoder settings; sampling it still needs the VAE.
    card = generate.export(latent, tmp_path / "export")
    assert card["encoder"] == encoder and card["classes"] is None and card["provenance"] is None
    with pytest.raises(ValueError, match="pass its VAE"):
        run(tmp_path / "export", tmp_path / "o", classes=[0])
    again = run(tmp_path / "export", tmp_path / "from_export", classes=[0, 3], per_class=2, vae=vae_dir)
    for f, g in zip(got["files"], again["files"]):
        np.testing.assert_array_equal(pixels(f), pixels(g))


# -- command line ------------------------------------------------------------------------------------


def cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="remeanflow")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_sample_parser(sub)
    generate.add_export_parser(sub)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_sample_and_export(net_path, tmp_path, capsys):
    assert cli(["sample", net_path, "--classes", "0,n01000003", "--per-class", "2", "--seed", "4", "--quiet",
                "--out", tmp_path / "cli"]) == 0
    assert "wrote 4 samples (2 classes x 2, 1 step)" in capsys.readouterr().out
    direct = run(net_path, tmp_path / "direct", classes=[0, 3], per_class=2, seed=4)
    for f in direct["files"]:
        assert (tmp_path / "cli" / Path(f).name).read_bytes() == Path(f).read_bytes()
    assert cli(["sample", net_path, "--grid", "--steps", "2", "--quiet", "--json", "--out", tmp_path / "g.png"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and tuple(summary["grid_size"]) == generate.grid_size(4, 1, 8, 8)
    assert cli(["export", net_path, tmp_path / "exp"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert cli(["sample", tmp_path / "exp", "--classes", "n01000001", "--quiet", "--out", tmp_path / "e"]) == 0
    # Bad input: exit code 2 and the reason on stderr.
    assert cli(["sample", net_path, "--classes", "n0404", "--quiet", "--out", tmp_path / "x"]) == 2
    assert "unknown class 'n0404'" in capsys.readouterr().err
    assert cli(["sample", tmp_path / "missing.pt", "--out", tmp_path / "x"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    assert cli(["export", tmp_path / "missing.pt", tmp_path / "y"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    for command in ("sample", "export"):
        with pytest.raises(SystemExit):
            cli([command, "--help"])
        assert "usage: remeanflow " + command in capsys.readouterr().out


# -- the workflow rule -----------------------------------------------------------------------------


def test_sample_sheet_rule_is_on_request_only(tiny_run, tmp_path):
    _, cfg, run_dir = tiny_run
    repo = copy_checkout(tmp_path / "checkout")
    snakefile = repo / "Snakefile"
    text = snakefile.read_text()
    if "rules/samples.smk" not in text:  # until the Snakefile includes it
        snakefile.write_text(text.replace('include: "rules/report.smk"\n',
                                          'include: "rules/report.smk"\ninclude: "rules/samples.smk"\n'))
    work = tmp_path / "work"
    shutil.copytree(run_dir, work / "results" / "tiny")  # copy2: mtimes kept, so nothing upstream is stale
    shutil.copy(cfg, work / cfg.name)

    def snakemake(*args: str) -> str:
        # mtime triggers only: the copy need not match code edited since the session's tiny_run was built
        cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(snakefile), "--directory", str(work),
               "--cores", "2", "--rerun-triggers", "mtime", "--configfile", str(work / cfg.name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
        return proc.stdout + proc.stderr

    assert "rule sample_sheet:" not in snakemake("-n")  # not part of the default target
    target = "results/tiny/samples/sheet.png"
    assert "rule sample_sheet:" in snakemake(target)
    sheet = work / target
    assert Image.open(sheet).size == generate.grid_size(4, 2, 8, 8)
    record = json.loads((work / (target + ".provenance.json")).read_text())
    assert record["rule"] == "sample_sheet" and record["extra"]["samples"]["per_class"] == 2
    assert png_info(sheet)["names"] == SYNSETS
    assert not (run_dir / "samples").exists()  # the shared run untouched
