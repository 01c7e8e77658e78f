"""Provenance sidecars: `<output>.provenance.json` next to every artifact (docs/architecture.md).

A sidecar records what made the artifact: the rule and wildcards, the config subset the rule
depends on (and its hash), every input with its content hash, the code version (git commit, dirty
flag and a hash of the package sources), package versions, host, devices, times and seeds. Input
hashes are taken from the input's own sidecar while the input is still the file or tree it hashed
(same size, mtime and inode of every file), so a 100 GB store is hashed once, by the rule that
wrote it, and lineage can be followed sidecar to sidecar back to the raw archive.

`verify` re-hashes the artifact and every node of its lineage once and compares each with every
hash recorded for it (its own sidecar's and its consumers'); `python -m remeanflow provenance
<artifact> --verify` exits 0 when all match, 1 when something changed or is missing, 2 when the
artifact has no sidecar.
"""

from __future__ import annotations

import ast
import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

from .fileio import atomic_path, content_hash, file_identity, json_sha256

SUFFIX = ".provenance.json"
FORMAT = "remeanflow-provenance-v1"
PACKAGE_DIR = Path(__file__).resolve().parent
_PACKAGES = ("torch", "numpy", "zarr", "snakemake", "accelerate", "scipy", "pillow", "pandas")


def sidecar_path(artifact) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name.rstrip("/") + SUFFIX)


def stable_hash(obj) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (config subsets, fingerprints)."""
    return json_sha256(obj)


def _module_file(name: str) -> Path | None:
    """File of `remeanflow.<name>` (a module or a package's __init__), None if it is not a module."""
    target = PACKAGE_DIR.joinpath(*name.split(".")) if name else PACKAGE_DIR
    for f in (target.with_suffix(".py"), target / "__init__.py"):
        if f.is_file():
            return f
    return None


def _package_name(f: Path) -> str:
    """Dotted name inside remeanflow of the package that holds file `f` ('' for the top)."""
    return ".".join(f.relative_to(PACKAGE_DIR).parent.parts)


def _imported(path: Path, package: str | None) -> frozenset[str]:
    """Names inside remeanflow that a source file imports (also inside functions), dotted; a
    `from X import y` adds X.y too, which is kept only where it is a module. Parsed once per file
    version: every rule's code version walks the same modules when the workflow is loaded."""
    stat = path.stat()
    return _imported_source(str(path), stat.st_mtime_ns, stat.st_size, package)


@functools.lru_cache(maxsize=None)
def _imported_source(path: str, mtime_ns: int, size: int, package: str | None) -> frozenset[str]:
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "remeanflow" or alias.name.startswith("remeanflow."):
                    found.add(alias.name.removeprefix("remeanflow").lstrip("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only inside the package
                if package is None:
                    continue
                parts = package.split(".") if package else []
                base = parts[: len(parts) - node.level + 1]
                mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "remeanflow" or node.module.startswith("remeanflow.")):
                mod = node.module.removeprefix("remeanflow").lstrip(".")
            else:
                continue
            found.add(mod)
            found.update(f"{mod}.{a.name}".lstrip(".") for a in node.names)
    return frozenset(found)


def import_closure(script) -> list[Path]:
    """Files of `remeanflow/` that `script` reaches through imports, found statically in the source
    (the packages' `__init__.py` included: importing a submodule runs them). Sorted."""
    seen: set[Path] = set()
    todo = [(Path(script), None)]
    while todo:
        path, package = todo.pop()
        for name in _imported(path, package):
            parts = name.split(".") if name else []
            for i in range(len(parts) + 1):  # the module and every package above it
                f = _module_file(".".join(parts[:i]))
                if f is not None and f not in seen:
                    seen.add(f)
                    todo.append((f, _package_name(f)))
    return sorted(seen)


def code_hash(files: list[Path] | None = None) -> str:
    """Hash of package sources: `files` (e.g. an `import_closure`), or all of `remeanflow/`."""
    files = sorted(PACKAGE_DIR.rglob("*.py")) if files is None else files
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# Modules in every closure whose effect on a rule's outputs is entirely the settings values it
# hands the rule, which are the rule's other params value: leaving them out means that adding a
# setting reruns only the rules that setting enters.
NOT_CODE_VERSION = ("settings.py", "settings_base.py")


def script_code_hash(script) -> str:
    """Code version of a workflow script: the hash of its import closure inside `remeanflow/`
    (less `NOT_CODE_VERSION`).

    Snakemake's code trigger sees a script's own text, not the modules it imports; rules pass this
    as a `params:` value, so editing a module reruns exactly the rules whose scripts reach it.
    """
    files = [f for f in import_closure(script) if f.relative_to(PACKAGE_DIR).as_posix() not in NOT_CODE_VERSION]
    return code_hash(files)


def git_state(repo=None) -> dict:
    """Commit and dirty flag of the checkout that holds the package (None outside git)."""
    repo = Path(repo or PACKAGE_DIR.parent)

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    return {"commit": head.stdout.strip(), "dirty": dirty}


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> list[str]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return []
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [f"cpu ({os.cpu_count()} cores)"]


def read(artifact) -> dict | None:
    """The artifact's sidecar record, None without one; ValueError naming it if it is not JSON."""
    p = sidecar_path(artifact)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"provenance: unreadable sidecar {p}: {e}") from e


def describe_input(path) -> dict:
    """Path, content hash and sidecar link. The hash is taken from the input's own sidecar only
    while the input is the very file (or tree) that sidecar hashed (`fileio.file_identity`), so a
    100 GB store is not hashed again by every consumer; a replaced or edited input is hashed now."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"provenance: input {path} does not exist")
    side = read(path)
    recorded = (side or {}).get("output", {})
    if recorded.get("sha256") and recorded.get("identity") == file_identity(path):
        digest, source = recorded["sha256"], "sidecar"
    else:
        digest, source = content_hash(path), "computed"
    entry = {"path": str(path), "sha256": digest, "hash_source": source}
    if side is not None:
        entry["provenance"] = str(sidecar_path(path))
    return entry


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write(
    artifact,
    *,
    rule: str,
    config: dict,
    inputs: dict[str, list[str]] | list[str] = (),
    wildcards: dict | None = None,
    seeds: dict | None = None,
    started: str | None = None,
    rule_code_hash: str | None = None,
    extra: dict | None = None,
) -> dict:
    """Write `<artifact>.provenance.json` for a finished artifact and return the record."""
    artifact = Path(artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"provenance: artifact {artifact} does not exist")
    named = inputs if isinstance(inputs, dict) else {"input": list(inputs)}
    identity = file_identity(artifact)  # before hashing: a write meanwhile makes the record unusable as a cache
    record = {
        "format": FORMAT,
        "rule": rule,
        "wildcards": dict(wildcards or {}),
        "output": {"path": str(artifact), "sha256": content_hash(artifact), "kind": "dir" if artifact.is_dir() else "file",
                   "identity": identity},
        "config": config,
        "config_hash": stable_hash(config),
        "inputs": {name: [describe_input(p) for p in paths] for name, paths in named.items()},
        "code": {**git_state(), "package_hash": code_hash(), "rule_code_hash": rule_code_hash},
        "packages": package_versions(),
        "workdir": os.getcwd(),
        "host": socket.gethostname(),
        "devices": devices(),
        "started": started,
        "finished": now(),
        "seeds": dict(seeds or {}),
        "extra": dict(extra or {}),
    }
    with atomic_path(sidecar_path(artifact)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


# -- lineage ------------------------------------------------------------------------------------


def _root(artifact: Path, record: dict) -> Path:
    """Folder that the record's relative paths are relative to: found by matching the recorded
    output path against where the artifact is now (so a moved results tree still resolves), else
    the recorded working directory."""
    recorded = Path(record["output"]["path"])
    if recorded.is_absolute():
        return Path("/")
    here = artifact.resolve()
    parts = len(recorded.parts)
    if here.parts[-parts:] == recorded.parts:
        return Path(*here.parts[:-parts])
    return Path(record.get("workdir") or ".")


def current_hash(path, hashes: dict | None = None) -> str | None:
    """`content_hash` of `path` now (None if it does not exist); `hashes` (resolved path -> hash)
    caches it, so a file or store reached along several edges is hashed once."""
    path = Path(path)
    key = str(path.resolve())
    if hashes is not None and key in hashes:
        return hashes[key]
    digest = content_hash(path) if path.exists() else None
    if hashes is not None:
        hashes[key] = digest
    return digest


def lineage(artifact, seen: set | None = None, hashes: dict | None = None) -> dict:
    """Tree of sidecars from `artifact` back to artifacts without one (raw archives, user files).
    Artifacts already in `seen` (resolved paths; shared across calls if given) are not expanded again.
    A node with a sidecar carries its recorded hash; one without, its hash now (cached in `hashes`).
    A child carries what its consumer recorded about it: `role`, `recorded_sha256`, `hash_source`."""
    _seen = set() if seen is None else seen
    artifact = Path(artifact)
    record = read(artifact)
    node = {"path": str(artifact), "rule": None, "sha256": None, "inputs": []}
    if record is None:
        node["sha256"] = current_hash(artifact, hashes)
        node["missing"] = node["sha256"] is None
        return node
    node.update(rule=record["rule"], sha256=record["output"]["sha256"], config_hash=record["config_hash"],
                commit=record["code"].get("commit"), dirty=record["code"].get("dirty"), finished=record.get("finished"))
    key = str(artifact.resolve())
    if key in _seen:
        node["repeated"] = True
        return node
    _seen.add(key)
    root = _root(artifact, record)
    for name, entries in record["inputs"].items():
        for entry in entries:
            child = lineage(root / entry["path"], _seen, hashes)
            child["role"] = name
            child["recorded_sha256"] = entry["sha256"]
            child["hash_source"] = entry.get("hash_source")
            node["inputs"].append(child)
    return node


def _job_key(record: dict) -> str:
    """What every output of one job shares in its sidecar (`workflow.step` writes them together)."""
    return stable_hash([record.get("rule"), record.get("wildcards"), record.get("started"), record.get("inputs")])


def same_job_outputs(artifact, record: dict | None = None, index: dict | None = None) -> list[Path]:
    """Other outputs of the job that made `artifact`, found beside it: sidecars in its folder with
    the same rule, wildcards, start time and inputs (e.g. `labels.csv` beside `images.zarr`).
    `index` caches each folder's sidecars by job (folder -> job key -> artifacts)."""
    artifact = Path(artifact)
    record = read(artifact) if record is None else record
    index = {} if index is None else index
    folder = str(artifact.parent.resolve())
    if folder not in index:
        jobs: dict[str, list[Path]] = {}
        for side in sorted(artifact.parent.glob("*" + SUFFIX)):
            try:
                other = json.loads(side.read_text())
            except (OSError, ValueError):
                continue  # an unreadable sidecar is no evidence of a sibling
            jobs.setdefault(_job_key(other), []).append(side.with_name(side.name[: -len(SUFFIX)]))
        index[folder] = jobs
    me = artifact.resolve()
    return [p for p in index[folder].get(_job_key(record), []) if p.resolve() != me]


def verify(artifact, hashes: dict | None = None) -> list[dict]:
    """Check the artifact and every input of its lineage against what the sidecars recorded.

    Each distinct path is hashed once (`content_hash`, so a directory is hashed like when it was
    recorded) and compared with every hash recorded for it: the one in its own sidecar
    (`output.sha256`) and the one each consumer recorded among its `inputs`. An input recorded with
    `hash_source: sidecar` is thereby checked both ways: its sidecar must still say what the
    consumer recorded, and its content must still match its sidecar. Such an input whose sidecar
    has gone is reported too: its lineage can no longer be followed.

    The other outputs of every job in the lineage (`same_job_outputs`, e.g. `labels.csv`, written
    with `images.zarr` but read by no rule) are checked against their own sidecars too: a job's
    outputs stand or fall together. Their problems name the lineage node in `same_job_as`.

    Returns the problems, lineage first, one per (path, recorded hash, current hash):
    ``{"kind": "changed" | "missing", "path", "recorded", "current" (None if missing),
    "recorded_by": [artifacts whose sidecars recorded that hash; the path itself for its own],
    "same_job_as": None, or the lineage node made by the same job}``.
    An empty list means everything verified. Raises FileNotFoundError if `artifact` has no sidecar.
    """
    hashes = {} if hashes is None else hashes
    tree = lineage(artifact, hashes=hashes)
    if tree["rule"] is None:
        raise FileNotFoundError(f"provenance: {artifact} has no sidecar ({sidecar_path(artifact)})")
    problems: dict[tuple, dict] = {}
    made: list[str] = []  # lineage nodes with a sidecar, in walk order

    def claim(path: str, recorded: str | None, by: str, *, sidecar_gone: bool = False,
              same_job_as: str | None = None) -> None:
        if sidecar_gone:
            target = str(sidecar_path(path))
            now_hash = None
        else:
            target = path
            now_hash = current_hash(path, hashes)
            if now_hash is not None and now_hash == recorded:
                return
        key = (str(Path(target).resolve()), recorded, now_hash)
        entry = problems.setdefault(key, {"kind": "missing" if now_hash is None else "changed", "path": target,
                                          "recorded": recorded, "current": now_hash, "recorded_by": [],
                                          "same_job_as": same_job_as})
        if by not in entry["recorded_by"]:
            entry["recorded_by"].append(by)

    def walk(node: dict) -> None:
        if node["rule"] is not None and not node.get("repeated"):
            claim(node["path"], node["sha256"], node["path"])
            made.append(node["path"])
        for child in node["inputs"]:
            claim(child["path"], child["recorded_sha256"], node["path"])
            if child["hash_source"] == "sidecar" and child["rule"] is None:
                claim(child["path"], None, node["path"], sidecar_gone=True)
            walk(child)

    walk(tree)
    in_lineage = {str(Path(p).resolve()) for p in made}
    index: dict = {}
    for path in made:
        for other in same_job_outputs(path, index=index):
            if str(other.resolve()) not in in_lineage:
                in_lineage.add(str(other.resolve()))
                claim(str(other), read(other)["output"]["sha256"], str(other), same_job_as=path)
    return list(problems.values())


def format_problems(problems: list[dict]) -> str:
    """Human-readable list of `verify` problems: kind, path, recorded hash and by whom, hash now."""
    lines = []
    for p in problems:
        by = ", ".join("its own sidecar" if b == p["path"] else b for b in p["recorded_by"])
        lines.append(f"  {p['kind'].upper():8s} {p['path']}")
        if p.get("same_job_as"):
            lines.append(f"           (not in the lineage: made by the job that made {p['same_job_as']})")
        if p["recorded"] is None:  # an input's sidecar that is gone
            lines.append(f"           provenance sidecar of an input, recorded as its hash source by {by}")
            continue
        lines.append(f"           recorded {p['recorded']} by {by}\n"
                     f"           now      {p['current'] or 'missing'}")
    return "\n".join(lines)


def format_tree(node, indent: str = "") -> str:
    label = f"{node['path']}  [{node['rule'] or 'source'}]  sha256 {str(node.get('sha256'))[:12]}"
    if node.get("commit"):
        label += f"  commit {node['commit'][:10]}{'+dirty' if node.get('dirty') else ''}"
    if node.get("missing"):
        label += "  (missing)"
    lines = [indent + label]
    for child in node["inputs"]:
        lines.append(format_tree(child, indent + "    "))
    return "\n".join(lines)
