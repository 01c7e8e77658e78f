"""Config validation with messages that name the offending key.

The schema is generated from the settings classes (`remeanflow.settings`); `validate` coerces the
strings Snakemake makes of nested `--config` values, checks the schema (numbers finite) and the
cross-field rules of the classes (paths contained), and returns the complete config (missing keys
filled with their defaults).
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from . import settings
from .settings_base import Validator

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
DEFAULT = SCHEMA.parent.parent / "config.yaml"  # the embedded default every run starts from


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
    what = f"config key {_key(err.absolute_path)} = {err.instance!r}: {err.message}"
    if err.validator == "pattern" and err.schema.get("description"):  # a regex alone does not say what is meant
        what += f" ({err.schema['description']})"
    return what


def merge(base: dict, extra: dict) -> dict:
    """Snakemake's merge of config files: nested dicts merged key by key, `extra` wins."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_schema(path=SCHEMA) -> dict:
    return yaml.safe_load(Path(path).read_text())


def validate(config: dict) -> dict:
    """The complete, typed-checked config; ConfigError naming each bad key."""
    coerced = settings.coerce(config)
    validator = Validator(settings.json_schema())  # draft 7 whose numbers are finite
    errors = sorted(validator.iter_errors(coerced), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    try:
        return settings.load(coerced).to_dict()
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n  {e}") from None


def load_files(configfiles, base=DEFAULT) -> dict:
    """The complete validated config of `base` with each of `configfiles` merged over it in order,
    as `snakemake --configfile A B` builds it; ConfigError names a file that cannot be read."""
    merged: dict = {}
    for path in [base, *configfiles]:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
        merged = merge(merged, data)
    return validate(merged)
