"""Compact coupling stores (`couplings.store_noise: false`): the noise is regenerated from
(sample_id, seed) by every reader, checked against the digest recorded at generation; training on
a compact store is bit-identical to training on the full store of the same couplings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from remeanflow import coupling_set, couplings

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import TRAIN_KW, make_couplings, make_teacher, run_meanflow  # noqa: E402


def _bytes(folder: Path, name: str) -> int:
    return sum(f.stat().st_size for f in folder.glob(f"shard-*.zarr/{name}/**/*") if f.is_file())


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("compact")
    return {"full": make_couplings(root / "full"), "compact": make_couplings(root / "compact", store_noise=False),
            "teacher": make_teacher(root / "teacher.pt"), "root": root}


def test_compact_store_reads_back_the_noise_its_endpoints_were_generated_from(sets):
    full, compact = coupling_set.open_couplings(sets["full"]), coupling_set.open_couplings(sets["compact"])
    assert len(full) == len(compact)
    for i in range(len(full)):
        a, b = full.read_chunk(i), compact.read_chunk(i)
        for key in ("noise", "endpoint", "label", "sample_id", "keep", "distance"):
            assert np.array_equal(a[key], b[key]), (i, key)
            assert a[key].dtype == b[key].dtype, key
    shard = sets["compact"].parent / "shard-00000.zarr"
    assert not (shard / "noise").exists() and couplings.noise_regenerated(couplings.read_shard_attrs(shard))
    assert _bytes(sets["compact"].parent, "noise") == 0 < _bytes(sets["full"].parent, "noise")
    # the merge statistics (distances over regenerated noise) are the full store's
    mf, mc = (json.loads(p.read_text()) for p in (sets["full"], sets["compact"]))
    assert mf["distance_stats"] == mc["distance_stats"] and mf["truncation"] == mc["truncation"]


def test_training_on_a_compact_store_is_bit_identical(sets):
    states = []
    for name in ("full", "compact"):
        root = sets["root"] / f"train-{name}"
        run_meanflow(manifest=sets[name], init=sets["teacher"], out_dir=root / "out", work_dir=root / "work",
                     stage=1, iterations=6, checkpoint_every=3, **TRAIN_KW)
        states.append(torch.load(root / "out" / "train_state.pt", map_location="cpu", weights_only=False))
    for key in ("model", "ema"):
        a, b = states[0][key], states[1][key]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key


def test_noise_from_another_generator_is_detected_and_regenerated(sets, tmp_path, monkeypatch):
    """What a numpy whose Philox/normal stream changed would do: other noise for the same ids."""
    root = tmp_path / "c"
    manifest = make_couplings(root, store_noise=False)
    real = couplings.per_sample_noise
    monkeypatch.setattr(couplings, "per_sample_noise",
                        lambda *a, **k: real(*a, **k) + torch.finfo(torch.float16).eps)
    reader = coupling_set.open_couplings(manifest)
    with pytest.raises(couplings.CorruptChunkError, match=r"chunk 0: noise regenerated from \(sample_id, seed\) "
                                                         r"differs .*numpy"):
        reader.read_chunk(0)
    # a resume regenerates such chunks, so noise and endpoint agree again
    shard = root / "shard-00000.zarr"
    bad = couplings.unmark_corrupt_chunks(shard, index_store=root / "index.zarr")
    assert bad == list(range(couplings.read_shard_attrs(shard)["num_chunks"]))
    from couplings_worker import toy_generate

    couplings.generate_shard(shard, toy_generate, progress=False)
    couplings.verify_shard(shard)
