"""`provenance --verify`: the artifact itself and every input of its lineage are re-hashed against
what the sidecars recorded; exit 0 = verified, 1 = changed or missing (each named), 2 = no sidecar."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from remeanflow import provenance
from remeanflow.__main__ import main
from remeanflow.fileio import content_hash

REPO = Path(__file__).resolve().parent.parent


def make_chain(root: Path) -> None:
    """Three artifacts with sidecars, written like the workflow does (paths relative to `root`):

    raw/archive.tar, raw/images/ (a directory) --prepare--> data/store.zarr (a directory), data/index.csv
    data/store.zarr, raw/labels.csv           --train-->   model/net.pt
    model/net.pt, data/store.zarr             --evaluate--> eval/metrics.json
    """
    (root / "raw" / "images").mkdir(parents=True)
    (root / "raw" / "archive.tar").write_bytes(b"archive bytes")
    (root / "raw" / "images" / "a.png").write_bytes(b"image a")
    (root / "raw" / "images" / "b.png").write_bytes(b"image b")
    (root / "raw" / "labels.csv").write_text("id,label\n0,1\n1,0\n")
    store = root / "data" / "store.zarr"
    (store / "x").mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (store / "x" / "0").write_bytes(b"chunk 0")
    (store / "x" / "1").write_bytes(b"chunk 1")
    (root / "data" / "index.csv").write_text("0,a.png\n1,b.png\n")  # read by no rule, like labels.csv
    for out in ("data/store.zarr", "data/index.csv"):  # one job, two outputs: as `workflow.step` writes them
        provenance.write(out, rule="prepare", config={"n": 2}, started="2025-01-01T00:00:00+00:00",
                         inputs={"archive": ["raw/archive.tar"], "images": ["raw/images"]})
    (root / "model").mkdir()
    (root / "model" / "net.pt").write_bytes(b"weights")
    provenance.write("model/net.pt", rule="train", config={"lr": 0.1},
                     inputs={"data": ["data/store.zarr"], "labels": ["raw/labels.csv"]})
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text('{"fid": 1.0}\n')
    provenance.write("eval/metrics.json", rule="evaluate", config={},
                     inputs={"model": ["model/net.pt"], "data": ["data/store.zarr"]})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The chain, made once; each test works on its own copy (`chain`)."""
    root = tmp_path_factory.mktemp("chain")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        make_chain(root)
    return root


@pytest.fixture
def chain(built, tmp_path, monkeypatch):
    """A copy of the chain in its own folder, which is also the working directory."""
    root = tmp_path / "run"
    shutil.copytree(built, root)
    monkeypatch.chdir(root)
    return root


def cli(*args: str, capsys) -> tuple[int, str]:
    code = main(["provenance", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def only(problems: list[dict]) -> dict:
    assert len(problems) == 1, problems
    return problems[0]


def test_unchanged_chain_verifies(chain, capsys):
    assert provenance.verify("eval/metrics.json") == []
    # Snakemake's marker in a directory output is not content, as when it was recorded
    (chain / "data" / "store.zarr" / ".snakemake_timestamp").touch()
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 0, out
    assert "verified" in out and "unchanged" in out
    for path in ("raw/archive.tar", "raw/images", "raw/labels.csv", "data/store.zarr", "model/net.pt"):
        assert path in out
    # without --verify the lineage is printed and nothing is checked
    code, out = cli("eval/metrics.json", capsys=capsys)
    assert code == 0 and "verified" not in out


def test_artifact_itself_edited(chain, capsys):
    recorded = provenance.read("eval/metrics.json")["output"]["sha256"]
    with open("eval/metrics.json", "a") as f:
        f.write('{"fid": 0.1}\n')
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem == {"kind": "changed", "path": "eval/metrics.json", "recorded": recorded,
                       "current": content_hash("eval/metrics.json"), "recorded_by": ["eval/metrics.json"],
                       "same_job_as": None}
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1
    assert "CHANGED  eval/metrics.json" in out and recorded in out and content_hash("eval/metrics.json") in out


def test_input_edited(chain, capsys):
    recorded = content_hash("raw/labels.csv")
    with open("raw/labels.csv", "a") as f:
        f.write("2,1\n")
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "changed" and problem["path"].endswith("raw/labels.csv")
    assert problem["recorded"] == recorded and problem["current"] == content_hash("raw/labels.csv")
    assert [Path(p) for p in problem["recorded_by"]] == [chain / "model" / "net.pt"]
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1 and "raw/labels.csv" in out and "model/net.pt" in out


def test_input_deleted(chain, capsys):
    recorded = content_hash("raw/archive.tar")
    Path("raw/archive.tar").unlink()
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "missing" and problem["path"].endswith("raw/archive.tar")
    assert problem["recorded"] == recorded and problem["current"] is None
    assert [Path(p) for p in problem["recorded_by"]] == [chain / "data" / "store.zarr"]
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1
    assert "MISSING" in out and "raw/archive.tar" in out and "now      missing" in out


def test_artifact_with_sidecar_deleted(chain):
    """An intermediate deleted while its sidecar stays: one entry, naming every recorder."""
    Path("model/net.pt").unlink()
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "missing" and problem["path"].endswith("model/net.pt")
    assert {Path(p).name for p in problem["recorded_by"]} == {"metrics.json", "net.pt"}


def test_directory_input_one_file_changed(chain, capsys):
    """The store is recorded by its own sidecar and by both consumers: one entry naming all three,
    the store hashed like when it was recorded (`content_hash` of the directory)."""
    recorded = provenance.read("data/store.zarr")["output"]["sha256"]
    Path("data/store.zarr/x/1").write_bytes(b"chunk 1, edited")
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "changed" and problem["path"].endswith("data/store.zarr")
    assert problem["recorded"] == recorded and problem["current"] == content_hash("data/store.zarr")
    assert {str(Path(p).relative_to(chain) if Path(p).is_absolute() else p) for p in problem["recorded_by"]} == {
        "data/store.zarr", "model/net.pt", "eval/metrics.json"}
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1 and "data/store.zarr" in out


def test_source_directory_one_file_changed(chain):
    Path("raw/images/b.png").write_bytes(b"image b, edited")
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "changed" and problem["path"].endswith("raw/images")
    # a file added to it changes it too
    Path("raw/images/b.png").write_bytes(b"image b")
    Path("raw/images/c.png").write_bytes(b"image c")
    assert only(provenance.verify("eval/metrics.json"))["path"].endswith("raw/images")


def test_other_output_of_a_job_in_the_lineage(chain, capsys):
    """data/index.csv is read by no rule, but made by the job that made data/store.zarr: checked
    against its own sidecar, and named with the lineage node it came with."""
    recorded = provenance.read("data/index.csv")["output"]["sha256"]
    assert [p.name for p in provenance.same_job_outputs("data/store.zarr")] == ["index.csv"]
    assert provenance.same_job_outputs("model/net.pt") == []
    with open("data/index.csv", "a") as f:
        f.write("2,c.png\n")
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "changed" and problem["path"].endswith("data/index.csv")
    assert problem["recorded"] == recorded and problem["recorded_by"] == [problem["path"]]
    assert problem["same_job_as"].endswith("data/store.zarr")
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1 and "data/index.csv" in out and "not in the lineage" in out
    Path("data/index.csv").unlink()
    assert only(provenance.verify("eval/metrics.json"))["kind"] == "missing"


def test_regenerated_input_is_stale_for_its_consumers(chain):
    """An input recorded from its sidecar (`hash_source: sidecar`) whose content and sidecar were
    both rewritten since: consistent with its own sidecar, not with what its consumers recorded."""
    old = provenance.read("model/net.pt")["output"]["sha256"]
    assert provenance.read("eval/metrics.json")["inputs"]["model"][0]["hash_source"] == "sidecar"
    Path("model/net.pt").write_bytes(b"other weights")
    provenance.write("model/net.pt", rule="train", config={"lr": 0.2},
                     inputs={"data": ["data/store.zarr"], "labels": ["raw/labels.csv"]})
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "changed" and problem["path"].endswith("model/net.pt")
    assert problem["recorded"] == old and problem["current"] == content_hash("model/net.pt")
    assert problem["recorded_by"] == ["eval/metrics.json"]


def test_input_sidecar_edited_to_match_edited_content(chain):
    """Editing an input and its sidecar's hash alike still fails: its consumers recorded the old hash."""
    Path("model/net.pt").write_bytes(b"tampered")
    side = provenance.sidecar_path("model/net.pt")
    record = json.loads(side.read_text())
    record["output"]["sha256"] = content_hash("model/net.pt")
    side.write_text(json.dumps(record))
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["path"].endswith("model/net.pt") and problem["recorded_by"] == ["eval/metrics.json"]


def test_input_sidecar_deleted(chain):
    """An input recorded from its sidecar whose sidecar is gone: its lineage cannot be followed."""
    provenance.sidecar_path("data/store.zarr").unlink()
    problem = only(provenance.verify("eval/metrics.json"))
    assert problem["kind"] == "missing" and problem["path"].endswith("data/store.zarr" + provenance.SUFFIX)
    assert problem["recorded"] is None


def test_each_node_hashed_once(chain, monkeypatch, capsys):
    calls = []
    real = provenance.content_hash
    monkeypatch.setattr(provenance, "content_hash", lambda p: calls.append(Path(p).resolve()) or real(p))
    assert cli("eval/metrics.json", "--verify", capsys=capsys)[0] == 0
    assert sorted(calls) == sorted({*calls}) and len(calls) == 7  # 3 artifacts, 3 sources, data/index.csv


def test_json_lists_problems_with_kind(chain, capsys):
    with open("raw/labels.csv", "a") as f:
        f.write("2,1\n")
    Path("raw/archive.tar").unlink()
    Path("eval/metrics.json").write_text("{}\n")
    code, out = cli("eval/metrics.json", "--verify", "--json", capsys=capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["verified"] is False and doc["lineage"]["rule"] == "evaluate"
    kinds = {Path(p["path"]).name: p["kind"] for p in doc["problems"]}
    assert kinds == {"metrics.json": "changed", "labels.csv": "changed", "archive.tar": "missing"}
    for p in doc["problems"]:
        assert set(p) == {"kind", "path", "recorded", "current", "recorded_by", "same_job_as"} and p["recorded_by"]
        assert p["same_job_as"] is None
    code, out = cli("model/net.pt", "--verify", "--json", capsys=capsys)  # a sub-lineage
    assert code == 1 and {Path(p["path"]).name for p in json.loads(out)["problems"]} == {"labels.csv", "archive.tar"}
    Path("raw/archive.tar").write_bytes(b"archive bytes")
    Path("raw/labels.csv").write_text("id,label\n0,1\n1,0\n")
    code, out = cli("model/net.pt", "--verify", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["verified"] is True and json.loads(out)["problems"] == []
    code, out = cli("model/net.pt", "--json", capsys=capsys)
    assert code == 0 and json.loads(out)["problems"] is None


def test_unreadable_sidecar_exits_1(chain, capsys):
    provenance.sidecar_path("model/net.pt").write_text("{not json")
    code, out = cli("eval/metrics.json", "--verify", capsys=capsys)
    assert code == 1 and "unreadable sidecar" in out and "model/net.pt" + provenance.SUFFIX in out


def test_no_sidecar_exits_2(chain, capsys):
    for target in ("raw/labels.csv", "does/not/exist"):
        code, out = cli(target, "--verify", capsys=capsys)
        assert code == 2 and "no provenance sidecar" in out
    with pytest.raises(FileNotFoundError):
        provenance.verify("raw/labels.csv")
    with pytest.raises(SystemExit) as e:  # usage error
        main(["provenance", "--no-such-option", "x"])
    assert e.value.code == 2


def test_moved_tree_verifies_where_it_is_now(chain, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere" / "run"
    shutil.move(chain, moved)
    monkeypatch.chdir(tmp_path)
    target = moved / "eval" / "metrics.json"
    assert provenance.verify(target) == []
    (moved / "raw" / "archive.tar").unlink()
    problem = only(provenance.verify(target))
    assert problem["kind"] == "missing" and Path(problem["path"]) == moved / "raw" / "archive.tar"


def test_cli_subprocess(chain):
    cmd = [sys.executable, "-m", "remeanflow", "provenance", "eval/metrics.json", "--verify"]

    def run(*args):
        return subprocess.run(args or cmd, check=False, capture_output=True, text=True, timeout=120)

    out = run()
    assert out.returncode == 0, out.stderr
    assert "unchanged" in out.stdout
    with open("raw/labels.csv", "a") as f:
        f.write("2,1\n")
    out = run()
    assert out.returncode == 1 and "CHANGED" in out.stdout and "raw/labels.csv" in out.stdout
    out = run(*cmd[:4], "raw/labels.csv", "--verify")
    assert out.returncode == 2 and "no provenance sidecar" in out.stderr
    out = run(*cmd[:4], "--help")
    assert out.returncode == 0 and "exit codes: 0" in out.stdout


@pytest.mark.slow
def test_real_run_edited_labels_and_deleted_archive(tiny_run, tmp_path):
    """Acceptance: on a copy of a finished run, an edited labels.csv and a deleted dataset archive
    make `provenance --verify` of the final metrics exit non-zero, naming each."""
    _, _, run = tiny_run
    copy = tmp_path / "results" / "tiny"
    shutil.copytree(run, copy)
    labels, archive = copy / "data" / "labels.csv", copy / "data" / "raw" / "toy_train.tar"
    with open(labels, "a") as f:
        f.write("999,0\n")
    archive.unlink()
    out = subprocess.run([sys.executable, "-m", "remeanflow", "provenance", str(copy / "eval" / "stage2" / "metrics.json"),
                          "--verify"], check=False, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr
    assert f"CHANGED  {labels}" in out.stdout and f"MISSING  {archive}" in out.stdout
    out = subprocess.run([sys.executable, "-m", "remeanflow", "provenance", str(copy / "eval" / "stage2" / "metrics.json"),
                          "--verify", "--json"], check=False, capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 1
    problems = {p["path"]: p["kind"] for p in json.loads(out.stdout)["problems"]}
    assert problems == {str(labels): "changed", str(archive): "missing"}
