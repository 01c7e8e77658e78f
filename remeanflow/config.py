"""Config validation with messages that name the offending key (schemas/config.schema.yaml)."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """Raised for a config that does not match the schema; the message lists every bad key."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        keys = ", ".join(_key([*err.absolute_path, k]) for k in extra)
        return f"unknown config key {keys} (allowed here: {', '.join(allowed)})"
    if err.validator == "required":
        return f"config key {_key(err.absolute_path)}: {err.message}"
    return f"config key {_key(err.absolute_path)} = {err.instance!r}: {err.message}"


def load_schema(path=SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def validate(config: dict, schema_path=SCHEMA) -> dict:
    """Check `config` against the schema; raise ConfigError naming each bad key, else return it."""
    schema = load_schema(schema_path)
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    return config


def rule_resources(config: dict, group: str) -> dict:
    """Resources of a rule group, falling back to `resources.default`."""
    return dict(config["resources"].get(group, config["resources"]["default"]))
