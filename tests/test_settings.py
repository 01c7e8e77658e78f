"""Typed settings: the generated schema, validation and coercion, what enters each rule, presets,
and a throw-away setting that is validated, hashed and reaches the library with no rule edited."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from conftest import REPO, copy_checkout, deep_update

from remeanflow import config as rmf_config
from remeanflow import provenance, settings, settings_base
from remeanflow.workflow import step_params

DEFAULT = yaml.safe_load((REPO / "config.yaml").read_text())


def _rules_and_scripts() -> dict[str, tuple[str | None, str | None, str | None]]:
    """rule name -> (params_of rule, params_of script, script file stem) from rules/*.smk, `use rule`
    derivations inheriting their parent's script."""
    out, parents = {}, {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        text = smk.read_text()
        blocks = re.split(r"^\s*(?=rule \w+:|use rule \w+ as \w+ with:)", text, flags=re.M)
        for block in blocks:
            head = re.match(r"(?:rule (\w+):|use rule (\w+) as (\w+) with:)", block)
            if not head:
                continue
            name = head.group(1) or head.group(3)
            if head.group(2):
                parents[name] = head.group(2)
            params = re.search(r'step=params_of\("(\w+)"(?:, "(\w+)")?\)', block)
            script = re.search(r'script:\s*"\.\./workflow_scripts/(\w+)\.py"', block)
            out[name] = (
                params.group(1) if params else None,
                (params.group(2) or params.group(1)) if params else None,
                script.group(1) if script else None,
            )
    for name, parent in parents.items():
        out[name] = (out[name][0], out[name][1], out[name][2] or out[parent][2])
    return out


# -- schema ------------------------------------------------------------------------------------


def test_schema_file_is_generated_from_the_settings():
    assert (REPO / "schemas" / "config.schema.yaml").read_text() == settings.schema_yaml()
    proc = subprocess.run([sys.executable, "-m", "remeanflow", "schema", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_schema_agrees_with_the_classes_field_by_field():
    schema = settings.json_schema()

    def walk(cls, node, path):
        assert node["additionalProperties"] is False
        assert list(node["properties"]) == [f.name for f in dataclasses.fields(cls)], path
        for f, tp in settings_base.fields_of(cls):
            prop = node["properties"][f.name]
            assert prop["description"].startswith(f.metadata["doc"]), f"{path}{f.name}"
            for bound, key in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"),
                               ("lt", "exclusiveMaximum")):
                if f.metadata[bound] is not None and "items" not in prop:
                    assert prop[key] == f.metadata[bound], f"{path}{f.name}"
            inner, _ = settings_base.split_optional(tp)
            if settings_base.is_section(inner):
                walk(inner, prop, f"{path}{f.name}.")

    walk(settings.Settings, schema, "")


# -- validation --------------------------------------------------------------------------------


def test_the_embedded_default_and_presets_validate_and_fill_defaults():
    full = rmf_config.validate(DEFAULT)
    assert full["train"]["stage2"] == {"iterations": 150, "grad_clip": 1.0, "w_max": 3.0}
    partial = rmf_config.validate({"train": {"stage2": {"iterations": 7}}})
    # a partial stage keeps that stage's own defaults (the paper's stage 2: clip 1.0, w_max 2.5)
    assert partial["train"]["stage2"] == {"iterations": 7, "grad_clip": 1.0, "w_max": 2.5}
    assert partial["couplings"]["heun_steps"] == 32 and partial["evaluate"]["fid_samples"] == 50000
    for preset in ("imagenet64", "imagenet512"):
        rmf_config.validate(deep_update(DEFAULT, yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"train": {"class_dropout": 1.0}}, "train.class_dropout = 1.0: 1.0 is greater than or equal to the maximum"),
        ({"train": {"stage2": {"w_max": None}}}, "train.stage2.w_max must be a number >= 1"),
        ({"train": {"stage1": {"w_max": 2.0}}}, "train.stage1.w_max must be null"),
        ({"teacher": {"train": {"guide_step": 10_000}}}, "teacher.train.guide_step = 10000: must lie in"),
        ({"couplings": {"precision": "fp8"}}, "couplings.precision = 'fp8'"),
        ({"train": {"stage2": {"iterations": "many"}}}, "train.stage2.iterations = 'many'"),
        ({"train": {"lr": "fast"}}, "train.lr = 'fast'"),
        ({"evaluate": {"inception": {"weigths": "x"}}}, "unknown config key evaluate.inception.weigths"),
    ],
)
def test_bad_values_name_the_key(change, message):
    with pytest.raises(rmf_config.ConfigError, match=re.escape(message)):
        rmf_config.validate(deep_update(DEFAULT, change))


@pytest.mark.parametrize(
    "change, refused",
    [
        ({"train": {"lr": 0.0}}, "train.lr = 0.0"),  # gt=0: the bound itself is refused
        ({"download": {"max_seconds": 0}}, "download.max_seconds = 0"),
        ({"train": {"weight_decay": 0.0}}, None),  # ge=0: the bound itself is accepted
        ({"dataset": {"max_bad_fraction": 1.0}}, None),  # le=1 likewise
        ({"train": {"betas": [0.0, 0.5]}}, None),  # ge on each item of a tuple
        ({"train": {"betas": [0.5, 1.0]}}, "train.betas.1 = 1.0"),  # lt=1 on each item
    ],
)
def test_a_value_at_its_bound_is_refused_only_when_the_bound_is_exclusive(change, refused):
    if refused is None:
        rmf_config.validate(deep_update(DEFAULT, change))
    else:
        with pytest.raises(rmf_config.ConfigError, match=re.escape(refused)):
            rmf_config.validate(deep_update(DEFAULT, change))


def test_sections_check_their_bounds_on_construction_too():
    with pytest.raises(ValueError, match=r"TrainSettings.lr = 0.0: must be > 0"):
        settings.TrainSettings(lr=0.0)
    assert settings.TrainSettings(weight_decay=0.0).weight_decay == 0.0
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="TrainSettings.eps .*must be a finite number"):
            settings.TrainSettings(eps=bad)
        with pytest.raises(ValueError, match="TrainSettings.betas .*must be a finite number"):
            settings.TrainSettings(betas=(0.9, bad))
    with pytest.raises(ValueError, match=r"Settings.run_name = '\.\.': must match"):
        settings.Settings(run_name="..")


# Snakemake passes nested --config values as strings: ".inf" is coerced like "1e-4" is
@pytest.mark.parametrize("change, key", [
    ({"train": {"lr": ".inf"}}, "train.lr = inf"),
    ({"train": {"lr": float("inf")}}, "train.lr = inf"),  # a config file's .inf
    ({"train": {"time_sampler": {"p_mean": ".nan"}}}, "train.time_sampler.p_mean = nan"),  # no bounds at all
    ({"train": {"eps": "-inf"}}, "train.eps = -inf"),
    ({"train": {"betas": ["0.9", ".nan"]}}, "train.betas.1 = nan"),
    ({"train": {"stage2": {"grad_clip": ".inf"}}}, "train.stage2.grad_clip = inf"),  # optional
    ({"couplings": {"fixed_threshold": float("nan")}}, "couplings.fixed_threshold = nan"),
])
def test_non_finite_numbers_are_refused_naming_the_key(change, key):
    with pytest.raises(rmf_config.ConfigError, match=re.escape(key) + ": must be a finite number"):
        rmf_config.validate(deep_update(DEFAULT, change))


@pytest.mark.parametrize("run_name", ["..", ".", "", "a/b", "/abs", "a\\b", "x y"])
def test_run_name_is_one_plain_path_component(run_name):
    with pytest.raises(rmf_config.ConfigError, match=re.escape(f"run_name = {run_name!r}") + ".*one plain path"):
        rmf_config.validate({**DEFAULT, "run_name": run_name})


def test_run_names_with_dots_inside_are_fine():
    for run_name in ("..x", "a.b", "v1.0-seed_2", ".hidden"):
        assert rmf_config.validate({**DEFAULT, "run_name": run_name})["run_name"] == run_name


@pytest.mark.parametrize("results_dir, inside", [
    ("results", True), ("./results/", True), ("a/../results", True), (".", True), ("out/runs", True),
    ("..", False), ("../x", False), ("a/../../x", False), ("/tmp/results", False), ("//results", False),
])
def test_results_dir_stays_inside_the_working_directory_unless_opted_out(results_dir, inside):
    config = {**DEFAULT, "results_dir": results_dir}
    if inside:
        rmf_config.validate(config)
    else:
        with pytest.raises(rmf_config.ConfigError, match=re.escape(f"results_dir = {results_dir!r}: must be a "
                                                                    "relative path inside the working directory")
                           + ".*results_dir_outside_workdir: true"):
            rmf_config.validate(config)
    full = rmf_config.validate({**config, "results_dir_outside_workdir": True})
    assert full["results_dir"] == results_dir
    assert settings.rule_config(settings.load(full), "train_stage1") == settings.rule_config(
        settings.load(rmf_config.validate(DEFAULT)), "train_stage1")  # where outputs go changes no result


def test_an_empty_results_dir_is_refused_even_when_opted_out():
    for opt_out in (False, True):
        with pytest.raises(rmf_config.ConfigError, match="results_dir = '': must name a folder"):
            rmf_config.validate({**DEFAULT, "results_dir": "", "results_dir_outside_workdir": opt_out})


def test_nested_config_strings_are_coerced_to_the_declared_types():
    # what Snakemake makes of --config 'train={stage2: {iterations: 200}, lr: 1e-4, compile: null}'
    given = {"train": {"stage2": {"iterations": "200", "grad_clip": "null"}, "lr": "1e-4", "compile": "null",
                       "betas": ["0.9", "0.95"], "snapshot_every": "None"},
             "couplings": {"fast_path": "true", "guidance": "2"}, "dataset": {"source": "null"}}
    full = rmf_config.validate(deep_update(DEFAULT, given))
    assert full["train"]["stage2"]["iterations"] == 200 and full["train"]["stage2"]["grad_clip"] is None
    assert full["train"]["lr"] == 1e-4 and full["train"]["compile"] is None and full["train"]["betas"] == [0.9, 0.95]
    assert full["train"]["snapshot_every"] is None
    assert full["couplings"]["fast_path"] is True and full["couplings"]["guidance"] == 2.0
    assert full["dataset"]["source"] is None
    assert settings.coerce({"run_name": "123"})["run_name"] == "123"  # a string field stays a string


def test_nested_config_override_reaches_snakemake(tmp_path):
    from conftest import run_snakemake

    proc = run_snakemake(tmp_path, None, "-n", "--config", "train={stage2: {iterations: 200}}", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_snakemake(tmp_path, None, "-n", "--config", "train={stage2: {iterations: lots}}", check=False)
    assert proc.returncode != 0 and "train.stage2.iterations = 'lots'" in proc.stdout + proc.stderr


def test_presets_list_only_what_they_change():
    # keys a preset shows with the default value as the place to fill in, next to its comment
    placeholders = {"evaluate.vae", "evaluate.ref_stats.source", "evaluate.ref_stats.sha256",
                    "evaluate.inception.sha256"}

    def leaves(node, path=""):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{path}{k}.")
            else:
                yield f"{path}{k}", v

    default = dict(leaves(rmf_config.validate(DEFAULT)))
    for preset in ("imagenet64", "imagenet512"):
        for key, value in leaves(yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())):
            if key.startswith("resources.") or key in placeholders:
                continue
            assert key not in default or default[key] != value, f"{preset}: {key} repeats the default {value!r}"


# -- what enters each rule ---------------------------------------------------------------------


def test_every_rule_passes_one_params_value_for_its_own_name_and_script():
    rules = _rules_and_scripts()
    assert len(rules) >= 18
    for name, (params_rule, params_script, script) in rules.items():
        assert params_rule == name, f"rule {name}: params_of names {params_rule!r}"
        assert params_script == script, f"rule {name}: code version of {params_script!r} but runs {script!r}"
    assert settings.rules_named() <= set(rules), settings.rules_named() - set(rules)


def test_rule_config_holds_exactly_what_changes_the_rule():
    s = settings.load(rmf_config.validate(DEFAULT))
    merge = settings.rule_config(s, "couplings_merge")
    assert merge == {"couplings": {"truncation_quantile": 0.9, "fixed_threshold": None}}
    shard = settings.rule_config(s, "couplings_shard")["couplings"]
    assert "truncation_quantile" not in shard and "processes" not in shard and shard["heun_steps"] == 8
    stage1 = settings.rule_config(s, "train_stage1")
    assert "stage1" in stage1["train"] and "stage2" not in stage1["train"]
    assert stage1["couplings"] == s.couplings.sampler.to_dict() and stage1["seed"] == 0
    for not_results in ("processes", "checkpoint_every", "snapshot_every"):
        assert not_results not in stage1["train"]
    assert settings.rule_config(s, "report") == {}


def test_step_params_carry_the_rule_settings_and_its_code_version():
    params = step_params("couplings_merge", "couplings_merge", settings.load(rmf_config.validate(DEFAULT)))
    assert params["settings"] == {"couplings": {"truncation_quantile": 0.9, "fixed_threshold": None}}
    assert params["code"] == provenance.script_code_hash(REPO / "workflow_scripts" / "couplings_merge.py")


def test_import_closure_follows_the_scripts_imports():
    names = lambda script: {f.relative_to(provenance.PACKAGE_DIR).as_posix()  # noqa: E731
                            for f in provenance.import_closure(REPO / "workflow_scripts" / f"{script}.py")}
    merge = names("couplings_merge")
    assert {"couplings.py", "meanflow.py", "workflow.py", "__init__.py"} <= merge  # meanflow: the threshold
    assert "networks.py" not in merge and "data/preprocess.py" not in merge
    preprocess = names("preprocess_shard")
    assert {"data/preprocess.py", "data/imagenet_tar.py", "data/__init__.py"} <= preprocess
    assert "meanflow.py" not in preprocess and "data/toy.py" not in preprocess
    assert {"checkpoints.py", "heldout.py", "evaluate.py", "vae.py", "inception.py"} <= names("evaluate_merge")
    assert {"train.py", "train_state.py", "loader.py", "accel.py"} <= names("train_stage")


# -- a throw-away setting ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_throwaway_setting_is_validated_hashed_and_reaches_the_library(tmp_path):
    """One line added to TrainSettings in a copy of the checkout, nothing else edited."""
    repo = copy_checkout(tmp_path / "repo")
    path = repo / "remeanflow" / "settings.py"
    anchor = '    window_chunks: int = setting(16, "shuffle buffer, in coupling chunks", ge=1)\n'
    text = path.read_text()
    assert anchor in text
    path.write_text(text.replace(anchor, anchor + '    warmup: int = setting(0, "throw-away test setting", ge=0)\n'))
    env = dict(os.environ, PYTHONPATH=str(repo))
    probe = textwrap.dedent("""
        import json, sys, yaml
        from remeanflow import config, settings, train
        from remeanflow.workflow import step_params
        assert settings.__file__.startswith(sys.argv[1]), settings.__file__
        default = yaml.safe_load(open("config.yaml"))
        out = {}
        try:
            config.validate({**default, "train": {**default["train"], "warmup": -1}})
        except config.ConfigError as e:
            out["error"] = str(e)
        full = config.validate({**default, "train": {**default["train"], "warmup": "5"}})  # as --config gives it
        s, s0 = settings.load(full), settings.load(config.validate(default))
        out["value"] = s.train.warmup
        out["params"] = step_params("train_stage1", "train_stage", s)["settings"]["train"].get("warmup")
        base = step_params("train_stage1", "train_stage", s0)
        out["other_rules_same"] = all(
            step_params(r, r, s) == step_params(r, r, s0)
            for r in ("couplings_shard", "couplings_merge", "init_time_embedding"))
        out["hash_changed"] = base != step_params("train_stage1", "train_stage", s)
        # the object the workflow script hands train.train_meanflow, and the JSON every rank rebuilds
        out["library"] = train.train_meanflow.__annotations__["settings"]
        out["rank_copy"] = settings.build(settings.TrainSettings, s.train.to_dict()).warmup
        out["schema"] = settings.json_schema()["properties"]["train"]["properties"]["warmup"]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", probe, str(repo)], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert "train.warmup = -1" in out["error"]
    assert out["value"] == 5 and out["params"] == 5 and out["rank_copy"] == 5
    assert out["hash_changed"] and out["other_rules_same"]
    assert out["library"] == "TrainSettings"
    assert out["schema"] == {"type": "integer", "minimum": 0, "description": "throw-away test setting", "default": 0}
    # Snakemake itself (the copy's Snakefile and rules, unedited) validates the new key
    smk = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path / "w"),
           "--cores", "1", "-n"]
    # cwd: `python -m` puts it first on sys.path, before PYTHONPATH
    bad = subprocess.run([*smk, "--config", "train={warmup: lots}"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "train.warmup = 'lots'" in bad.stdout + bad.stderr
    good = subprocess.run([*smk, "--config", "train={warmup: 5}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert good.returncode == 0, good.stdout + good.stderr
    for smk_file in (REPO / "rules").glob("*.smk"):
        assert (repo / "rules" / smk_file.name).read_bytes() == smk_file.read_bytes()
