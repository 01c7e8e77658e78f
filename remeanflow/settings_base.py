"""The machinery behind the typed settings (`remeanflow.settings`): the `setting(...)` field
declaration, the `Section` base that checks bounds, patterns and choices on construction, and what
is derived from the declarations: JSON schema and its validator, coercion of strings, construction
from plain data and the selection of the fields that enter one rule. Nothing here names a config key.

Numbers are finite everywhere: YAML has `.inf` and `.nan` (and `--config` strings are coerced to
them), JSON and the training code do not, so a non-finite value is refused at validation, naming
the key, for every float setting and every float inside a list (`Validator`, `check_value`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, ClassVar, Literal, Union

import jsonschema
import yaml


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING,
            ge=None, gt=None, le=None, lt=None, pattern: str | None = None,
            rules: tuple[str, ...] | None = None) -> Any:
    """A settings field: default (or `factory` for a nested section), one-line doc, bounds
    (ge/gt/le/lt; for a tuple they bound each item), a regex `pattern` for strings (searched, so
    anchor it), and the rules it enters (None: the section's `RULES`; `()`: none, it changes no
    result)."""
    meta = dict(doc=doc, ge=ge, gt=gt, le=le, lt=lt, pattern=pattern, rules=rules)
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Section:
    """Base of every settings dataclass: bounds are checked on construction, whatever built it."""

    RULES: ClassVar[tuple[str, ...]] = ()  # rules whose outputs every field changes by default

    def __post_init__(self) -> None:
        for f, tp in fields_of(type(self)):
            key, value = type(self).__name__ + "." + f.name, getattr(self, f.name)
            check_value(key, value, f.metadata)
            choices = choices_of(tp)
            items = value if is_variadic(tp) else (value,)
            if choices is not None and any(v not in choices for v in items):
                raise ValueError(f"config key {key} = {value!r}: must be one of {list(choices)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists), nested sections as dicts."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(value):
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def check_value(key: str, value: Any, meta: typing.Mapping) -> None:
    """ValueError naming `key` when `value` (a number or string, or each item of a tuple) is not
    finite, breaks a bound or does not match the pattern."""
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if isinstance(v, str) and meta.get("pattern") and not re.search(meta["pattern"], v):
            raise ValueError(f"config key {key} = {value!r}: must match {meta['pattern']} ({meta.get('doc')})")
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):  # inf passes one-sided bounds, NaN unbounded fields
            raise ValueError(f"config key {key} = {value!r}: {_NOT_FINITE}")
        for name, ok in (("ge", v >= (meta.get("ge") or 0)), ("gt", v > (meta.get("gt") or 0)),
                         ("le", v <= (meta.get("le") or 0)), ("lt", v < (meta.get("lt") or 0))):
            if meta.get(name) is not None and not ok:
                raise ValueError(f"config key {key} = {value!r}: must be {_BOUND_WORDS[name]} {meta[name]}")


_BOUND_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_NOT_FINITE = "must be a finite number (inf and nan are not setting values)"


# ----------------------------------------------------------------------------------------------
# Types -> schema, coercion, construction.


@functools.cache
def fields_of(cls) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def split_optional(tp) -> tuple[Any, bool]:
    """(inner type, nullable) of `Optional[X]` / `X | None`."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def is_variadic(tp) -> bool:
    """`tuple[X, ...]` (optionally `Optional`): a list of any length in the config."""
    inner, _ = split_optional(tp)
    return typing.get_origin(inner) is tuple and typing.get_args(inner)[-1] is Ellipsis


def choices_of(tp) -> tuple | None:
    """The allowed values of a `Literal` (or optional `Literal`) field, or of each item of a
    `tuple[Literal[...], ...]` field, else None."""
    inner, nullable = split_optional(tp)
    if is_variadic(inner):
        inner, nullable = typing.get_args(inner)[0], False
    if typing.get_origin(inner) is not Literal:
        return None
    return (*typing.get_args(inner), None) if nullable else typing.get_args(inner)


def is_section(tp) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _type_schema(tp, meta) -> dict:
    inner, nullable = split_optional(tp)
    origin = typing.get_origin(inner)
    if is_section(inner):
        out = section_schema(inner)
        if nullable:
            out["type"] = ["object", "null"]
        return out
    if origin is Literal:
        choices = list(typing.get_args(inner))
        return {"enum": [*choices, None] if nullable else choices}
    if origin is tuple:
        item = _type_schema(typing.get_args(inner)[0], meta)
        if typing.get_args(inner)[-1] is Ellipsis:  # tuple[X, ...]: any length, no repeats
            return {"type": "array", "items": item, "uniqueItems": True}
        n = len(typing.get_args(inner))
        return {"type": "array", "items": item, "minItems": n, "maxItems": n}
    if origin is dict:
        return {"type": "object", "additionalProperties": section_schema(typing.get_args(inner)[1]),
                "required": ["default"]}
    base = {int: "integer", float: "number", bool: "boolean", str: "string"}[inner]
    out: dict[str, Any] = {"type": [base, "null"] if nullable else base}
    for key, name in (("ge", "minimum"), ("gt", "exclusiveMinimum"), ("le", "maximum"), ("lt", "exclusiveMaximum")):
        if meta.get(key) is not None:
            out[name] = meta[key]
    if meta.get("pattern"):
        out["pattern"] = meta["pattern"]
    return out


def _finite_type(validator, types_, instance, schema):
    """Draft 7's `type` keyword, except that inf and NaN are no number: JSON cannot hold them, so
    a config that has one would validate and then fail in the first job that writes it out."""
    if isinstance(instance, float) and not math.isfinite(instance):
        yield jsonschema.ValidationError(_NOT_FINITE)
        return
    yield from jsonschema.Draft7Validator.VALIDATORS["type"](validator, types_, instance, schema)


# The validator of the generated schema (`config.validate`): the schema file stays plain draft 7.
Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"type": _finite_type})


def section_schema(cls) -> dict:
    """JSON schema (draft 7) of one settings class: every key optional (defaults fill it), none unknown."""
    props = {}
    for f, tp in fields_of(cls):
        prop = _type_schema(tp, f.metadata)
        if f.metadata.get("doc"):
            prop = {**prop, "description": f.metadata["doc"]}
        if f.default is not dataclasses.MISSING:
            prop["default"] = plain(f.default)
        props[f.name] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


_NULL_WORDS = ("null", "none", "~", "")


def _coerce_scalar(value: str, tp) -> Any:
    """A string for a typed field -> that type when it parses as one, else unchanged (the schema
    then names the key)."""
    inner, nullable = split_optional(tp)
    if nullable and value.strip().lower() in _NULL_WORDS:
        return None
    if inner is str or typing.get_origin(inner) is Literal and all(isinstance(a, str) for a in typing.get_args(inner)):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if inner is float and isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return value
    return parsed if isinstance(parsed, (int, float, bool, list, dict)) else value


def coerce(config: dict, cls) -> dict:
    """A copy of `config` with strings turned into numbers, booleans or null where the settings
    class `cls` declares such a type: Snakemake passes nested `--config` values as strings."""
    out = dict(config)
    types_ = dict((f.name, tp) for f, tp in fields_of(cls))
    for key, value in config.items():
        tp = types_.get(key)
        if tp is None:
            continue
        inner, _ = split_optional(tp)
        if isinstance(value, str):
            out[key] = _coerce_scalar(value, tp)
        elif isinstance(value, dict) and is_section(inner):
            out[key] = coerce(value, inner)
        elif isinstance(value, dict) and typing.get_origin(inner) is dict:
            item = typing.get_args(inner)[1]
            out[key] = {k: coerce(v, item) if isinstance(v, dict) else v for k, v in value.items()}
        elif isinstance(value, list) and typing.get_origin(inner) is tuple:
            item = typing.get_args(inner)[0]
            out[key] = [_coerce_scalar(v, item) if isinstance(v, str) else v for v in value]
    return out


def build(cls, data: dict | None, base=None):
    """An instance of `cls` from schema-valid plain data; missing keys keep `base`'s values (the
    class defaults when None), so a partial `stage2:` keeps stage 2's own defaults."""
    data, base = data or {}, base if base is not None else cls()
    kwargs = {}
    for f, tp in fields_of(cls):
        if f.name in data:
            kwargs[f.name] = _build_value(tp, data[f.name], getattr(base, f.name))
    return dataclasses.replace(base, **kwargs)


def _build_value(tp, value, base):
    inner, _ = split_optional(tp)
    if value is None:
        return None
    if is_section(inner):
        return build(inner, value, base)
    if typing.get_origin(inner) is tuple:
        return tuple(float(v) if typing.get_args(inner)[0] is float else v for v in value)
    if typing.get_origin(inner) is dict:
        item = typing.get_args(inner)[1]
        return {k: build(item, v) for k, v in value.items()}
    if inner is float and isinstance(value, int):
        return float(value)
    return value


# ----------------------------------------------------------------------------------------------
# What enters each rule.


def _rules_of(f: dataclasses.Field, cls) -> tuple[str, ...]:
    rules = f.metadata.get("rules")
    return cls.RULES if rules is None else rules


def select(obj: Section, rule: str, inherited: bool = False) -> dict[str, Any] | None:
    """The fields of `obj` (nested sections included) that enter `rule`, as plain values; None if none."""
    out = {}
    for f, tp in fields_of(type(obj)):
        enters = inherited and f.metadata.get("rules") is None or rule in _rules_of(f, type(obj))
        value = getattr(obj, f.name)
        inner, _ = split_optional(tp)
        if is_section(inner):
            if value is None:
                if enters:
                    out[f.name] = None
                continue
            sub = select(value, rule, inherited=enters)
            if sub:
                out[f.name] = sub
        elif enters:
            out[f.name] = plain(value)
    return out or None


@functools.cache
def rules_named(root) -> frozenset[str]:
    """Every rule name that a field under the settings class `root` says it enters."""
    names: set[str] = set()

    def walk(cls):
        names.update(cls.RULES)
        for f, tp in fields_of(cls):
            names.update(f.metadata.get("rules") or ())
            inner, _ = split_optional(tp)
            if is_section(inner):
                walk(inner)
            elif typing.get_origin(inner) is dict:
                walk(typing.get_args(inner)[1])

    walk(root)
    return frozenset(names)
