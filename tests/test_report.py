"""Tests of remeanflow.report and the report rules: input checks, figures, provenance table, and
the page of a real tiny run (self-contained, complete, rendered by a real headless browser, and
`snakemake --report`)."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import run_snakemake
from PIL import Image

from remeanflow import provenance, report
from remeanflow.fileio import sha256_file

STAGES = ("stage1", "stage2")
TARGET = "results/tiny/report/index.html"

# ----------------------------------------------------------------------------------------------
# Helpers.


class PageParser(HTMLParser):
    """Tags with their attributes, and tables as lists of rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: list[list[list[str]]] = []
        self.styles: list[str] = []
        self._cell: list[str] | None = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "style":
            self._in_style = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_style:
            self.styles.append(data)


def parse_page(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


def table_with_header(page: PageParser, first: str) -> list[list[list[str]]]:
    return [t for t in page.tables if t and t[0] and t[0][0] == first]


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def eval_metrics(**top) -> dict:
    rows = [dict(name=n, fd_pixels=1.5 + i, mse_vs_teacher=0.25 * i, nfe=1, num_samples=8)
            for i, n in enumerate(("one_step", "initial_one_step", "teacher_1step", "teacher_endpoint"))]
    return {**dict(format=report.EVAL_FORMAT, rows=rows, fid=None, notes=["FID skipped: no Inception weights"]), **top}


# ----------------------------------------------------------------------------------------------
# Input checks.


def test_eval_format_matches_the_evaluation_module():
    from remeanflow import evaluate

    assert report.EVAL_FORMAT == evaluate.METRICS_FORMAT


def test_read_csv_columns_keeps_nan_and_names_bad_cells(tmp_path):
    good = write_csv(tmp_path / "m.csv", "step,loss,role", ["1,0.5,main", "2,nan,main", "3,inf,guide"])
    cols = report.read_csv_columns(good, ["step", "loss"], text=["role"])
    assert cols["step"].tolist() == [1, 2, 3] and np.isnan(cols["loss"][1]) and np.isinf(cols["loss"][2])
    assert cols["role"].tolist() == ["main", "main", "guide"]
    assert report.nonfinite_notes(cols, ["step", "loss"]) == ["loss: 2 of 3 values are NaN/inf (gaps in the curve)"]

    missing = write_csv(tmp_path / "missing.csv", "step,mse", ["1,0.5"])
    with pytest.raises(ValueError, match=r"missing\.csv: missing column\(s\) \['loss'\]"):
        report.read_csv_columns(missing, ["step", "loss"])
    bad = write_csv(tmp_path / "bad.csv", "step,loss", ["1,0.5", "2,abc"])
    with pytest.raises(ValueError, match=r"bad\.csv: line 3, column 'loss': 'abc' is not a number"):
        report.read_csv_columns(bad, ["step", "loss"])
    empty_cell = write_csv(tmp_path / "empty_cell.csv", "step,loss", ["1,"])
    with pytest.raises(ValueError, match=r"empty_cell\.csv: line 2, column 'loss'"):
        report.read_csv_columns(empty_cell, ["step", "loss"])
    header_only = write_csv(tmp_path / "header_only.csv", "step,loss", [])
    with pytest.raises(ValueError, match=r"header_only\.csv: no data rows"):
        report.read_csv_columns(header_only, ["step", "loss"])
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        report.read_csv_columns(tmp_path / "nowhere.csv", ["step"])


@pytest.mark.parametrize("change, message", [
    (dict(format="other-v9"), r"'format' is 'other-v9', expected 'remeanflow-eval-v1'"),
    (dict(rows=[]), r"'rows' must be a non-empty list"),
    (dict(rows=[dict(name="one_step", fd_pixels=1.0, nfe=1)]), r"rows\[0\] lacks key\(s\) \['mse_vs_teacher'\]"),
    (dict(notes="FID skipped"), r"'notes' must be a list of strings"),
])
def test_read_eval_metrics_errors_name_file_and_key(tmp_path, change, message):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**eval_metrics(), **change}))
    with pytest.raises(ValueError, match=r"metrics\.json: " + message):
        report.read_eval_metrics(path)


def test_read_coupling_distances_checks_the_histogram(tmp_path):
    manifest = {"truncation": {"mode": "quantile", "quantile": 0.9, "threshold": 2.0, "kept": 9, "dropped": 1},
                "distance_stats": {"histogram": {"counts": [3, 7], "edges": [1.0, 2.0, 3.0]}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    dist = report.read_coupling_distances(path)
    assert dist.threshold == 2.0 and dist.kept_fraction == pytest.approx(0.9)
    manifest["distance_stats"]["histogram"]["edges"] = [1.0, 2.0]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: 'distance_stats\.histogram' needs B >= 1 counts and B \+ 1"):
        report.read_coupling_distances(path)
    del manifest["truncation"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: 'truncation' must be an object"):
        report.read_coupling_distances(path)


def test_png_helpers_reject_other_files(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF89a" + bytes(30))
    with pytest.raises(ValueError, match="fake.png: not a PNG"):
        report.png_data_uri(fake)
    with pytest.raises(ValueError, match="fake.png: not a PNG"):
        report.copy_figure(fake, tmp_path / "copy.png")
    assert not (tmp_path / "copy.png").exists()


# ----------------------------------------------------------------------------------------------
# Figures and tables.


def _train_columns(w_pi: np.ndarray) -> dict[str, np.ndarray]:
    steps = np.arange(1, w_pi.size + 1, dtype=np.float64)
    return dict(step=steps, loss=1 / steps, mse=2 / steps, w_pi=w_pi, grad_norm=np.full(steps.size, 0.5),
                kept_fraction=np.full(steps.size, 0.9))


def test_training_curves_show_w_pi_only_for_a_cfg_stage(tmp_path):
    """Four panels (2x2) without a CFG target, five (3 + 2) with one: the PNG's shape says which."""
    plain = report.plot_training_curves(_train_columns(np.ones(40)), tmp_path / "s1.png", title="s1", grad_clip=None)
    cols = _train_columns(np.linspace(1, 3, 40))
    cols["loss"][5] = np.nan
    notes = report.plot_training_curves(cols, tmp_path / "s2.png", title="s2", grad_clip=1.0, expected_kept=0.9)
    assert plain == [] and notes == ["s2: loss: 1 of 40 values are NaN/inf (gaps in the curve)"]
    w1, h1 = report.png_size(tmp_path / "s1.png")
    w2, h2 = report.png_size(tmp_path / "s2.png")
    assert h1 == h2 and w2 / w1 == pytest.approx(3 / 2, rel=0.02)
    assert Image.open(tmp_path / "s2.png").size == (w2, h2)


def test_metrics_table_shows_fid_when_present():
    page = parse_page(report.metrics_table_html(eval_metrics()))
    header, *rows = page.tables[0]
    assert len(page.tables) == 1 and "FID" not in header
    assert [r[1] for r in rows] == ["one_step", "initial_one_step", "teacher_1step", "teacher_endpoint"]
    assert [float(r[2]) for r in rows] == [1.5, 2.5, 3.5, 4.5] and [float(r[3]) for r in rows] == [0, 0.25, 0.5, 0.75]
    assert "FID skipped" in report.metrics_table_html(eval_metrics())

    sampled = dict(num_samples=2000, fid=12.25, fd_pixels=30.5, nfe=1)
    page = parse_page(report.metrics_table_html(eval_metrics(fid=12.25, sampled=sampled)))
    assert dict(page.tables[1][1:]) == {"samples (uniform classes)": "2000", "FID": "12.25", "FD (pixels)": "30.5",
                                        "NFE": "1"}
    with_fid = eval_metrics()
    with_fid["rows"][0]["fid"] = 7.125
    header, *rows = parse_page(report.metrics_table_html(with_fid)).tables[0]
    assert header[-1] == "FID" and [r[-1] for r in rows] == ["7.125", "—", "—", "—"]
    assert "FID: 3.5" in report.metrics_table_html(eval_metrics(fid=3.5))


def test_provenance_rows_follow_the_lineage_and_flag_stale_inputs(tmp_path):
    source, middle, final = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    source.write_bytes(b"source")
    middle.write_bytes(b"middle")
    provenance.write(middle, rule="make_b", config={"k": 1}, inputs={"a": [str(source)]})
    final.write_bytes(b"final")
    provenance.write(final, rule="make_c", config={"k": 2}, inputs={"b": [str(middle)]})

    rows = report.provenance_rows([final, middle], root=tmp_path)
    assert [r["path"] for r in rows] == ["a.bin", "b.bin", "c.bin"]  # source first, then by finish time
    assert [r["rule"] for r in rows] == ["source", "make_b", "make_c"]
    assert rows[1]["sha256"] == sha256_file(middle) and rows[2]["config_hash"] == provenance.stable_hash({"k": 2})
    assert not any(r["changed"] or r["missing"] for r in rows)

    middle.write_bytes(b"middle, remade")  # b remade after c used it: c is stale
    provenance.write(middle, rule="make_b", config={"k": 1}, inputs={"a": [str(source)]})
    source.unlink()
    rows = {r["path"]: r for r in report.provenance_rows([final], root=tmp_path)}
    assert rows["b.bin"]["changed"] and not rows["c.bin"]["changed"] and rows["a.bin"]["missing"]
    warnings = report.provenance_summary(list(rows.values()))
    assert any("changed after a later step used them: b.bin" in w for w in warnings)
    assert any("missing: a.bin" in w for w in warnings)


# ----------------------------------------------------------------------------------------------
# The report of a real tiny run.


@pytest.fixture(scope="module")
def report_run(tiny_run):
    workdir, cfg, run = tiny_run
    run_snakemake(workdir, cfg, TARGET)
    return workdir, cfg, run


@pytest.mark.slow
def test_report_page_is_self_contained_and_complete(report_run):
    _, _, run = report_run
    text = (run / "report" / "index.html").read_text()
    page = parse_page(text)

    # loads nothing: every image inlined as a PNG, links only within the page, no script or style sheet
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", text, re.IGNORECASE)
    assert not any(tag in ("script", "link", "iframe", "object", "embed") for tag, _ in page.tags)
    assert "url(" not in "".join(page.styles) and "@import" not in "".join(page.styles)
    imgs = [a for tag, a in page.tags if tag == "img"]
    assert len(imgs) == 2 * len(STAGES) + 2
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1], validate=True))).verify()
    assert all(a["href"].startswith("#") for tag, a in page.tags if tag == "a" and "href" in a)

    # the metrics tables hold the values of each checkpoint's metrics.json
    tables = table_with_header(page, "generator")
    assert len(tables) == len(STAGES)
    for stage, table in zip(STAGES, tables):
        metrics = json.loads((run / "eval" / stage / "metrics.json").read_text())
        assert [r[1] for r in table[1:]] == [r["name"] for r in metrics["rows"]]
        for cells, row in zip(table[1:], metrics["rows"]):
            assert float(cells[2]) == pytest.approx(row["fd_pixels"], rel=1e-3, abs=1e-12)
            assert float(cells[3]) == pytest.approx(row["mse_vs_teacher"], rel=1e-3, abs=1e-12)
            assert int(cells[4]) == row["nfe"]
        assert "FID" not in table[0] and "FID skipped" in text

    # the truncation table matches the manifest
    manifest = json.loads((run / "reflow" / "manifest.json").read_text())
    trunc = dict(table_with_header(page, "truncation")[0][1:])
    assert float(trunc["threshold"]) == pytest.approx(manifest["truncation"]["threshold"], rel=1e-3)
    assert int(trunc["kept"]) == manifest["truncation"]["kept"] and int(trunc["couplings"]) == manifest["total"]

    # the provenance table covers the lineage down to the archive, with the recorded hashes
    rows = {r[0]: r for r in table_with_header(page, "artifact")[0][1:]}
    archive_sha = (run / "data" / "raw" / "toy_train.tar.sha256").read_text().split()[0]
    assert rows["data/raw/toy_train.tar"][1] == "download_dataset" and rows["data/raw/toy_train.tar"][2] == archive_sha[:12]
    teacher = provenance.read(run / "teacher" / "net.pt")
    assert rows["teacher/net.pt"][2:4] == [teacher["output"]["sha256"][:12], teacher["config_hash"][:12]]
    assert rows["teacher/net.pt"][4].startswith((teacher["code"]["commit"] or "—")[:10])
    eval_rule = provenance.read(run / "eval" / "stage2" / "metrics.json")["rule"]
    assert {r[1] for r in rows.values()} >= {"toy_source", "download_dataset", "train_teacher", "couplings_shard",
                                            "couplings_merge", "train_stage1", "train_stage2", eval_rule,
                                            "report_stage"}

    # every output has a sidecar; the figures are the report rules' own outputs
    for out in ["report/index.html", "report/figures/teacher_loss.png", "report/figures/coupling_distances.png",
                *(f"report/figures/{s}/{f}.png" for s in STAGES for f in ("samples", "training"))]:
        assert provenance.sidecar_path(run / out).is_file(), out
    for stage in STAGES:
        assert sha256_file(run / "report" / "figures" / stage / "samples.png") == sha256_file(
            run / "eval" / stage / "samples.png")
    assert provenance.read(run / "report" / "index.html")["rule"] == "report"


@pytest.mark.slow
def test_report_of_a_fetched_teacher_and_bad_input(report_run, tmp_path):
    """Without a teacher log (fetched teacher) the page still renders; a bad metrics file is an
    error naming it, and no page is written."""
    _, _, run = report_run
    stages = {s: report.StageInputs(run / "eval" / s / "metrics.json", run / "train" / s / "metrics.csv",
                                    run / "report" / "figures" / s / "samples.png",
                                    run / "report" / "figures" / s / "training.png") for s in STAGES}
    out = tmp_path / "index.html"
    summary = report.build_report(out, tmp_path / "teacher.png", tmp_path / "couplings.png", run_name="fetched",
                                  manifest=run / "reflow" / "manifest.json", stages=stages, root=run)
    assert out.is_file() and summary["artifacts"] > 10 and report.png_size(tmp_path / "teacher.png")[0] > 0
    assert "teacher/metrics.csv" not in out.read_text()

    bad = tmp_path / "bad_metrics.json"
    bad.write_text(json.dumps({"format": "remeanflow-eval-v0", "rows": []}))
    stages["stage2"] = report.StageInputs(bad, *(getattr(stages["stage2"], f) for f in
                                                 ("train_metrics", "samples_png", "training_png")))
    with pytest.raises(ValueError, match=r"bad_metrics\.json: 'format'"):
        report.build_report(tmp_path / "bad.html", tmp_path / "t.png", tmp_path / "c.png", run_name="bad",
                            manifest=run / "reflow" / "manifest.json", stages=stages)
    assert not any((tmp_path / f).exists() for f in ("bad.html", "t.png", "c.png")), "inputs are checked first"


@pytest.mark.slow
def test_snakemake_report_includes_the_figures(report_run, tmp_path):
    workdir, cfg, _ = report_run
    out = tmp_path / "report.html"
    run_snakemake(workdir, cfg, "--report", str(out), TARGET)
    text = out.read_text()
    match = re.search(r"var categories = (\{.*?\});\n", text)
    assert match, "no categories in the Snakemake report"
    categories = json.loads(match.group(1))
    assert categories["Samples"] == {s: [f"results/tiny/report/figures/{s}/samples.png"] for s in STAGES}
    assert categories["Training"] == {s: [f"results/tiny/report/figures/{s}/training.png"] for s in STAGES}
    assert [p for sub in categories["Report"].values() for p in sub] == [TARGET]
    assert {"Teacher", "Couplings"} <= set(categories)
    assert "Training curves of <strong>stage2</strong>" in text  # captions rendered with their wildcards


# -- a real headless browser ---------------------------------------------------------------------

# Debian's chromium; the resolver rule keeps the browser's own background requests off the network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--enable-logging=stderr", "--v=0"]


def chromium_binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (CI=true): apt-get install -y chromium")
        pytest.skip("chromium is not installed")
    return path


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def console_messages(stderr: str) -> list[str]:
    """The page's console output as Chromium logs it (``...:CONSOLE...] "message", source: ...``)."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


@contextlib.contextmanager
def serve(folder: Path):
    """A localhost HTTP server for `folder`; yields (base URL, list of requested paths)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def page_requests(folder: Path, name: str, profile: Path) -> tuple[set[str], subprocess.CompletedProcess]:
    """Load `folder/name` over localhost; the paths it requested besides itself and the favicon."""
    with serve(folder) as (base, requests):
        proc = chromium(f"{base}/{name}", profile, "--dump-dom")
    assert f"/{name}" in requests, f"the browser did not load the page: {proc.stderr[-2000:]}"
    return set(requests) - {f"/{name}", "/favicon.ico"}, proc


@pytest.mark.slow
def test_report_renders_in_a_headless_browser(report_run, tmp_path):
    _, _, run = report_run
    page = run / "report" / "index.html"
    shot = run / "report" / "screenshot.png"
    proc = chromium(page.resolve().as_uri(), tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert console_messages(proc.stderr) == []
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (2000, 1280, 3)
    ink = np.any(image < 200, axis=-1).mean()  # text, tables and figures; a blank page has none
    colours = np.unique(image.reshape(-1, 3), axis=0).shape[0]
    assert ink > 0.02 and colours > 100, (ink, colours)

    # over HTTP the page requests nothing, and the browser's DOM holds every inlined image
    extra, proc = page_requests(page.parent, "index.html", tmp_path / "profile_http")
    assert extra == set() and console_messages(proc.stderr) == []
    assert proc.stdout.count('src="data:image/png;base64,') == 2 * len(STAGES) + 2

    # the two detectors above do see a page that loads a file and logs an error
    control = tmp_path / "control"
    control.mkdir()
    (control / "index.html").write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>c</title></head>'
                                        '<body><img src="missing.png"><script>console.error("control error")'
                                        "</script></body></html>")
    extra, proc = page_requests(control, "index.html", tmp_path / "profile_control")
    assert extra == {"/missing.png"} and any("control error" in m for m in console_messages(proc.stderr))
