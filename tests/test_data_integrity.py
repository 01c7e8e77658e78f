"""Outputs stay all-or-nothing when things go wrong: temporaries of killed writers are cleaned up
by the next run, and disk errors (no space, file too large) surface as OSErrors naming the output.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from remeanflow import checkpoints, fileio
from remeanflow.data import toy
from remeanflow.data.preprocess import load_images, preprocess_shard

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid is free (and, this soon, not reused)
    return proc.pid


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------------------------
# Temporaries of killed writers.


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path, caplog):
    out = tmp_path / "part-00000.zarr"
    dead = _dead_pid()
    stale_dir = tmp_path / f".part-00000.zarr.tmp{dead}"
    (stale_dir / "images").mkdir(parents=True)
    (stale_dir / "images" / "c0").write_bytes(b"x" * 1000)
    stale_file = tmp_path / f".part-00000.zarr.tmp{_dead_pid()}"
    stale_file.write_bytes(b"y")
    caplog.set_level(logging.WARNING, logger=fileio.__name__)
    with fileio.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "data").write_text("new")
    assert (out / "data").read_text() == "new"
    assert _temporaries(tmp_path) == []
    assert any(str(dead) in r.getMessage() and "no longer runs" in r.getMessage() for r in caplog.records)


def test_temporaries_of_live_processes_and_other_outputs_are_kept(tmp_path, sleeper):
    out = tmp_path / "labels.csv"
    keep = [
        tmp_path / f".labels.csv.tmp{os.getppid()}",  # a live process (pytest's parent)
        tmp_path / f".labels.csv.tmp{sleeper.pid}",  # a live process that started just now
        tmp_path / f".labels.csv.tmp{_dead_pid()}x",  # not an atomic_path temporary
        tmp_path / f".labels.csv.old.tmp{_dead_pid()}",  # another output's temporary
        tmp_path / f".other.csv.tmp{_dead_pid()}",
    ]
    for p in keep:
        p.write_text("keep")
    with fileio.atomic_path(out) as tmp:
        tmp.write_text("a,b\n")
    assert out.read_text() == "a,b\n"
    assert all(p.read_text() == "keep" for p in keep)


def test_temporary_older_than_the_process_holding_its_pid_is_removed(tmp_path, sleeper):
    # The pid was reused: the live process started long after the temporary was last written.
    stale = tmp_path / f".net.pt.tmp{sleeper.pid}"
    stale.write_bytes(b"old")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    if fileio._process_start_time(sleeper.pid) is None:
        pytest.skip("process start times are not available on this system (no /proc)")
    assert fileio.remove_stale_temporaries(tmp_path / "net.pt") == [stale]
    assert not stale.exists()


_KILLED_JOB = textwrap.dedent(
    """
    import sys, time
    from remeanflow.data import preprocess

    real = preprocess._write_index_arrays

    def stall(*args, **kwargs):  # the images are in the temporary store: say so, then hang
        print("writing", flush=True)
        time.sleep(60)
        real(*args, **kwargs)

    preprocess._write_index_arrays = stall
    preprocess.preprocess_shard(sys.argv[1], sys.argv[2], shard=0, num_shards=1, resolution=8,
                                workers=0, progress=False)
    """
)


def test_killed_preprocessing_job_leaves_no_temporary_after_the_rerun(tmp_path):
    archive = tmp_path / "toy.tar"
    toy.write_toy_archive(archive, num_classes=3, images_per_class=4, size=16)
    parts = tmp_path / "parts"
    out = parts / "part-00000.zarr"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB, str(archive), str(out)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert _temporaries(parts) == [f".part-00000.zarr.tmp{proc.pid}"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert _temporaries(parts) == [f".part-00000.zarr.tmp{proc.pid}"], "SIGKILL cannot clean up"
    assert not out.exists()
    report = preprocess_shard(archive, out, shard=0, num_shards=1, resolution=8, workers=0, progress=False)
    assert report["num_images"] == 12
    assert load_images(out)[0].shape == (12, 3, 8, 8)
    assert _temporaries(parts) == []


# ----------------------------------------------------------------------------------------------
# Disk errors as the primary error.


class _FullDisk:
    """A binary file whose writes fail with ENOSPC after ``room`` bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_torch_save_on_a_full_disk_raises_enospc_naming_the_path(tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(checkpoints, "open", lambda p, mode="r": _FullDisk(real_open(p, mode), 4096),
                        raising=False)
    path = tmp_path / "train" / "net.pt"
    with pytest.raises(OSError) as err:
        checkpoints.atomic_torch_save({"w": torch.zeros(100_000)}, path)
    e = err.value
    assert type(e) is fileio.OutputWriteError and isinstance(e, OSError)
    assert e.errno == errno.ENOSPC and e.filename == str(path)
    assert str(path) in str(e) and "No space left on device" in str(e) and "free on" in str(e)
    assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC  # the original
    assert "unexpected pos" not in str(e)
    assert list(path.parent.iterdir()) == [], "no output and no temporary"


def test_real_file_size_limit_surfaces_as_efbig(tmp_path):
    # No monkeypatching: a process whose file size limit is 64 KiB writes a 400 KB checkpoint.
    path = tmp_path / "net.pt"
    script = textwrap.dedent(
        """
        import resource, signal, sys, torch
        from remeanflow import checkpoints
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        try:
            checkpoints.atomic_torch_save({"w": torch.zeros(100_000)}, sys.argv[1])
        except OSError as e:
            print(type(e).__name__, e.errno, e)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    name, code, message = run.stdout.strip().split(" ", 2)
    assert (name, int(code)) == ("OutputWriteError", errno.EFBIG), run.stdout
    assert str(path) in message and "free on" in message
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_unwraps_a_disk_error_hidden_in_another_exception(tmp_path):
    out = tmp_path / "store.zarr"
    with pytest.raises(OSError) as err:
        with fileio.atomic_path(out) as tmp:
            tmp.mkdir()
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:
                raise RuntimeError("library: chunk write failed") from e
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_names_the_output_of_a_plain_disk_error(tmp_path, monkeypatch):
    out = tmp_path / "heldout.npz"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(fileio.OutputWriteError, match="heldout.npz.*free on") as err:
        with fileio.atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=np.zeros(10))
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [ValueError("bad value"), KeyboardInterrupt()])
def test_other_errors_pass_through_unchanged(tmp_path, exc):
    out = tmp_path / "x.json"
    with pytest.raises(type(exc)) as err:
        with fileio.atomic_path(out) as tmp:
            tmp.write_text("{}")
            try:
                open(tmp_path / "missing")  # an incidental, handled OSError in the chain
            except FileNotFoundError:
                raise exc from None
    assert err.value is exc
    assert list(tmp_path.iterdir()) == []
