"""Checkpoints verified on load, and bit-identical resume (issue 21, items 1 and 4).

Every torch file the pipeline writes carries a content digest that every load checks: a flipped
byte in tensor data (which `torch.load` accepts: it checks no zip CRC) is refused naming the
file, and a damaged newest training checkpoint is skipped for the newest verified one. Files are
canonical, so that a run resumed after a kill, a damaged checkpoint or a full disk writes the
same bytes as an uninterrupted one -- in process on a tiny net, and through the real workflow
(slow) down to `eval/stage2/metrics.json`.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import struct
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark, run_snakemake

from remeanflow import checkpoints, fileio, networks, train, train_state

sys.path.insert(0, str(Path(__file__).parent))
from test_data_integrity import _FullDisk  # noqa: E402
from train_worker import TRAIN_KW, make_couplings, make_teacher, run_meanflow  # noqa: E402

ITERATIONS = 6


def flip_tensor_byte(path: Path) -> str:
    """Flip one byte in the middle of the largest tensor record of a torch zip file; returns the
    record's name. torch.load still loads the file (it checks no CRC)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)  # local file header: name and extra-field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))
    return info.filename


def tiny_net(seed: int = 0) -> networks.Precond:
    torch.manual_seed(seed)
    return networks.build("tiny")


def adam_after_one_step(net: networks.Precond) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sum(p.square().sum() for p in net.parameters()).backward()
    optimizer.step()
    return optimizer


def train_state_file(path: Path, net: networks.Precond, optimizer: torch.optim.Optimizer) -> dict:
    """What `train_state.write_outputs` saves, for a net and its optimiser (returned unsaved)."""
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return dict(format=train_state.TRAIN_STATE_FORMAT, stage=1, step=1, config={"seed": 0}, config_hash="0" * 64,
                num_processes=1, init_kwargs=dict(net.init_kwargs), encoder={"class_name": "StandardRGBEncoder"},
                model=state, ema=state, optimizer=optimizer.state_dict())


def plain_torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Content digests.


def test_content_digest_covers_dtype_shape_bytes_and_structure():
    base = {"w": torch.zeros(4), "meta": {"step": 1}}
    digest = checkpoints.content_sha256(base)
    assert checkpoints.content_sha256({"w": torch.zeros(4), "meta": {"step": 1}}) == digest
    others = [{"w": torch.zeros(2, 2), "meta": {"step": 1}},  # same bytes, other shape
              {"w": torch.zeros(4, dtype=torch.int32), "meta": {"step": 1}},  # same bytes, other dtype
              {"w": torch.tensor([0.0, 0.0, 0.0, 1e-45]), "meta": {"step": 1}},  # one bit
              {"w": torch.zeros(4), "meta": {"step": 1.0}},  # 1 and 1.0 are other values
              {"w": torch.zeros(4), "meta": {"step": "1"}},
              {"v": torch.zeros(4), "meta": {"step": 1}},
              {"w": [torch.zeros(4)], "meta": {"step": 1}},
              {"w": (torch.zeros(4),), "meta": {"step": 1}}]
    digests = {checkpoints.content_sha256(o) for o in others}
    assert digest not in digests and len(digests) == len(others)
    # a non-contiguous view hashes as its values (no storage layout in the digest)
    assert checkpoints.content_sha256(torch.arange(6.0).reshape(2, 3).t()) == \
        checkpoints.content_sha256(torch.arange(6.0).reshape(2, 3).t().contiguous())


def test_canonical_refuses_what_a_weights_only_load_would_not_read():
    with pytest.raises(TypeError, match=r"/meta/when: a object cannot go into a project torch file"):
        checkpoints.canonical({"meta": {"when": object()}})


@pytest.mark.parametrize("kind", ["net", "train_state"])
def test_a_flipped_byte_in_tensor_data_is_refused_naming_the_file_and_the_remedy(tmp_path, kind):
    net = tiny_net()
    path = tmp_path / f"{kind}.pt"
    if kind == "net":
        checkpoints.save_net(path, net)
        load, remedy = checkpoints.load_net, "rerun the rule that wrote it"
    else:
        checkpoints.atomic_torch_save(train_state_file(path, net, adam_after_one_step(net)), path)
        load, remedy = (lambda p: train_state.load_start(p, stage=2)), "rerun stage 1"
    load(path)  # intact: loads
    flip_tensor_byte(path)
    checkpoints.torch_load(path)  # torch.load alone does not notice
    with pytest.raises(checkpoints.ContentDigestError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: content does not match the digest recorded when it was written")
    assert remedy in message


def test_a_file_without_a_content_digest_is_refused(tmp_path):
    """Written by older code: its bytes cannot be checked, so it is not used."""
    net = tiny_net()
    path = tmp_path / "net.pt"
    torch.save(dict(format=checkpoints.FORMAT, init_kwargs=dict(net.init_kwargs),
                    state_dict=net.state_dict(), encoder={}, meta={}), path)
    with pytest.raises(checkpoints.ContentDigestError, match=rf"{path}: no content_sha256 recorded \(written by an "
                                                             r"older remeanflow.*rerun the rule that wrote it"):
        checkpoints.load_net(path)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_verified_one(tmp_path, caplog):
    def write(step: int) -> Path:
        path = tmp_path / f"ckpt-{step:08d}.pt"
        checkpoints.atomic_torch_save(dict(format=train_state.CHECKPOINT_FORMAT, step=step,
                                           model={"w": torch.full((64,), float(step))}), path)
        return path

    def newest() -> tuple[Path | None, dict | None, list[str]]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="remeanflow.train_state"):
            path, obj = train_state._newest_checkpoint(tmp_path)
        return path, obj, [r.getMessage() for r in caplog.records]

    paths = [write(step) for step in (2, 4, 6)]
    flip_tensor_byte(paths[2])
    torch.save(dict(format=train_state.CHECKPOINT_FORMAT, step=4, model={}), paths[1])  # no digest: older code
    path, obj, messages = newest()
    assert path == paths[0] and obj["step"] == 2 and checkpoints.CONTENT_KEY not in obj
    assert len(messages) == 2
    assert messages[0].startswith(f"{paths[2]}: content does not match") and "older verified checkpoint" in messages[0]
    assert messages[1].startswith(f"{paths[1]}: no content_sha256 recorded")
    flip_tensor_byte(paths[0])
    path, obj, messages = newest()
    assert (path, obj) == (None, None) and messages[2].startswith(f"{paths[0]}: content does not match")  # start over


# ----------------------------------------------------------------------------------------------
# Canonical files.


def test_save_load_save_of_a_train_state_is_byte_identical(tmp_path):
    net = tiny_net()
    first = train_state_file(tmp_path, net, adam_after_one_step(net))
    checkpoints.atomic_torch_save(first, tmp_path / "a.pt")

    # Back into a fresh net and Adam, as a resume does, and saved again.
    loaded = checkpoints.verify_content(tmp_path / "a.pt", checkpoints.torch_load(tmp_path / "a.pt"))
    again = tiny_net(seed=1)
    again.load_state_dict(loaded["model"])
    optimizer = torch.optim.Adam(again.parameters(), lr=1e-3, betas=(0.9, 0.99))
    optimizer.load_state_dict(loaded["optimizer"])
    second = train_state_file(tmp_path, again, optimizer)
    checkpoints.atomic_torch_save(second, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()

    # What this guards against: pickle shares equal strings by identity, and the loaded Adam
    # state's keys are other string objects than an uninterrupted run's literals.
    assert plain_torch_save(first) != plain_torch_save(second)


def test_tensors_sharing_a_storage_are_saved_apart(tmp_path):
    base = torch.arange(8.0)
    obj = {"a": base, "b": base[4:], "c": base.view(2, 4).t()}
    out = checkpoints.canonical(obj)
    ptrs = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(ptrs) == 3 and all(t.is_contiguous() and t.storage_offset() == 0 for t in out.values())
    assert all(torch.equal(out[k], obj[k]) for k in obj)
    assert out["a"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # the first is not copied


# ----------------------------------------------------------------------------------------------
# Resumed training writes the uninterrupted run's bytes.


class _Clock:
    """`train`'s clock, one second per reading: the metrics' samples_per_s (kept in checkpoints
    and metrics.csv) is the one wall-clock value of a run; with it fixed, whole files compare."""

    def __init__(self):
        self._ticks = itertools.count()

    def perf_counter(self) -> float:
        return float(next(self._ticks))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"manifest": make_couplings(root / "couplings"), "teacher": make_teacher(root / "teacher.pt")}


def train_tiny(data, root: Path, iterations: int = ITERATIONS) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "time", types.SimpleNamespace(perf_counter=_Clock().perf_counter))
        return run_meanflow(manifest=data["manifest"], init=data["teacher"], out_dir=root / "out",
                            work_dir=root / "work", stage=1, iterations=iterations, checkpoint_every=2,
                            keep_checkpoints=3, snapshot_every=2, **TRAIN_KW)


def run_files(root: Path) -> dict[str, bytes]:
    """Every file of a run but the `.sha256` side files (they record inode and mtime)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(fileio.SIDE_SUFFIX)}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    train_tiny(data, root)
    return run_files(root)


# Interruptions: each leaves tmp_path as the failed run left it and returns the step the rerun
# resumes from and the checkpoint it must skip (None: none).


def _killed(data, root, monkeypatch):
    train_tiny(data, root, iterations=4)  # what a SIGKILL during step 5 leaves, plus the outputs of step 4
    shutil.rmtree(root / "out")
    return 4, None


def _newest_checkpoint_damaged(data, root, monkeypatch):
    _killed(data, root, monkeypatch)
    flip_tensor_byte(root / "work" / "ckpt-00000004.pt")
    return 2, root / "work" / "ckpt-00000004.pt"


def _disk_full_writing(name: str, resume_at: int):
    def interrupt(data, root, monkeypatch):
        real_open = open

        def full_open(p, mode="r"):  # no room for `name`'s temporary, plenty for the others
            return _FullDisk(real_open(p, mode), 0 if Path(p).name.startswith(f".{name}.tmp") else 1 << 40)

        monkeypatch.setattr(checkpoints, "open", full_open, raising=False)
        with pytest.raises(fileio.OutputWriteError, match=f"No space left on device while writing .*{name}"):
            train_tiny(data, root)
        monkeypatch.undo()
        return resume_at, None

    return interrupt


@pytest.mark.parametrize("interrupt", [_killed, _newest_checkpoint_damaged, _disk_full_writing("ckpt-00000004.pt", 2),
                                       _disk_full_writing("train_state.pt", ITERATIONS)],
                         ids=["killed", "damaged-newest-checkpoint", "disk-full-checkpoint", "disk-full-outputs"])
def test_a_resumed_run_writes_the_uninterrupted_runs_bytes(data, uninterrupted, tmp_path, monkeypatch, caplog,
                                                           interrupt):
    resume_at, damaged = interrupt(data, tmp_path, monkeypatch)
    caplog.clear()
    with caplog.at_level("WARNING", logger="remeanflow.train_state"):
        summary = train_tiny(data, tmp_path)
    skipped = [r.getMessage() for r in caplog.records if "content does not match" in r.getMessage()]
    assert [m.startswith(f"{damaged}: content does not match") for m in skipped] == ([True] if damaged else [])
    assert summary["resumed_from"] == resume_at
    resumed = run_files(tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    assert [name for name in resumed if resumed[name] != uninterrupted[name]] == []
    assert all(checkpoints.net_sha256(p) == fileio.sha256_file(p) for p in tmp_path.rglob("*.pt")
               if fileio.side_digest_path(p).exists())


# ----------------------------------------------------------------------------------------------
# The real workflow.


def _content_without_timing(path: Path) -> str:
    """A training checkpoint's content digest with the metrics' samples_per_s (wall clock) zeroed."""
    obj = checkpoints.verify_content(path, checkpoints.torch_load(path))
    obj["metrics"][:, train_state.METRICS_COLUMNS.index("samples_per_s")] = 0
    return checkpoints.content_sha256(obj)


@pytest.mark.slow
def test_stage1_killed_with_a_damaged_newest_checkpoint_resumes_to_the_same_bytes_through_stage2(tiny_run, tmp_path):
    """A kill during stage 1 after its last checkpoint was written, and that checkpoint then
    damaged: `--rerun-incomplete` resumes from the checkpoint before it (saying so), and every
    file down to eval/stage2/metrics.json equals the uninterrupted run's, digests included."""
    from conftest import run_snakemake

    src, cfg, reference = tiny_run
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir, symlinks=True)
    run = workdir / "results" / "tiny"
    # What the kill leaves: stage 1's checkpoints and snapshots, no outputs, nothing downstream.
    for part in ("train/stage1", "train/stage2", "train/work/stage2", "eval/stage1", "eval/stage2", "report"):
        shutil.rmtree(run / part)
    newest = max((run / "train/work/stage1").glob("ckpt-*.pt"))
    flip_tensor_byte(newest)

    run_snakemake(workdir, workdir / cfg.name, "--rerun-incomplete", "results/tiny/eval/stage2/metrics.json")
    log = (run / "logs" / "train_stage1.log").read_text()
    skipped = newest.relative_to(workdir)  # the rule runs in workdir
    assert f"WARNING remeanflow.train_state: {skipped}: content does not match" in log
    assert f"resuming from {skipped.with_name('ckpt-00000004.pt')} at step 4 of 8" in log

    compared = 0
    for ref in sorted(p for part in ("train", "eval/stage2") for p in (reference / part).rglob("*") if p.is_file()):
        name = ref.relative_to(reference).as_posix()
        got = run / name
        if ref.name.endswith((".provenance.json", fileio.SIDE_SUFFIX, "metrics.csv")) or "/trackers/" in name:
            continue  # wall-clock times and file identities
        if ref.name.startswith("ckpt-"):
            assert _content_without_timing(got) == _content_without_timing(ref), name
        else:
            assert got.read_bytes() == ref.read_bytes(), name
        compared += 1
    assert compared >= 8
    metrics = json.loads((run / "eval/stage2/metrics.json").read_text())
    assert metrics == json.loads((reference / "eval/stage2/metrics.json").read_text())
    for net in ("train/stage1/net_ema.pt", "train/stage2/net_ema.pt", "train/stage1/train_state.pt"):
        assert fileio.sha256_file(run / net) == fileio.sha256_file(reference / net)


def test_checkpoint_verify_benchmark_runs(tmp_path):
    result = load_benchmark("checkpoint_verify").main(["--gib", "0.002", "--repeats", "1", "--dir", str(tmp_path),
                                                       "--json", str(tmp_path / "out.json")])
    assert set(result["ratio_to_load"]) == {"load", "load_verify", "digest", "file_sha256"}
    assert result["ratio_to_load"]["load"] == 1.0 and result["gib"] > 0.001
