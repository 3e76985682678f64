"""Config machinery: YAML + `--set` overrides -> a checked dataclass tree, and the --help-config table.

Unknown keys, wrong types and out-of-range numbers fail at start-up naming the key. Each dataclass's
`ranges` gives every number its allowed values (">= 1", "> 0", "(0, 1]", "[0, 1)", "any"; a list per
element); `check(self, prefix)`, if defined, says the rest (a list's length, a name in a registry).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Literal

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository: configs/ lives here


class ConfigError(ValueError):
    """A config key that is unknown, mistyped or out of range; the message names it."""


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value, hint, key: str):
    """Check `value` against the type hint `hint`; return it (ints widen to floats). Errors name `key`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        return float(value)  # YAML 1.1 reads 2e-4 (no dot in the mantissa) as a string
    if hint is dict and isinstance(value, dict):
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known here: {', '.join(names)})")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def in_range(value: float, spec: str) -> bool:
    """Does `value` satisfy a `ranges` spec: "any", ">= a", "> a", "<= a", "< a", or an interval
    "(a, b]" with [ or ( and ] or ) for closed or open ends? NaN and infinities satisfy only "any"."""
    if spec == "any":
        return True
    if not math.isfinite(value):
        return False
    if spec[0] in "([":
        low, high = (float(x) for x in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        below = value <= high if spec[-1] == "]" else value < high
        return above and below
    op, bound = spec.split()
    return {">=": value >= float(bound), ">": value > float(bound),
            "<=": value <= float(bound), "<": value < float(bound)}[op]


def check_ranges(node, prefix: str = "") -> None:
    """Range-check every number of a config tree; the first value out of range raises ConfigError naming it."""
    ranges = getattr(type(node), "ranges", {})
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                check_ranges(item, f"{key}[{i}].")
        elif f.name in ranges:
            spec = ranges[f.name]
            for name, v in ([(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list)
                            else [(key, value)]):
                if not in_range(v, spec):
                    where = f"in {spec}" if spec[0] in "([" else spec
                    raise ConfigError(f"config key '{name}' must be {where}, got {v!r}")
    if hasattr(node, "check"):  # what `ranges` cannot say: a list's length, a name in a registry
        node.check(prefix)


def find_config(path: str) -> Path:
    """`gsm8k.yaml`, as users type it, also finds configs/gsm8k.yaml."""
    for candidate in (Path(path), ROOT / "configs" / path, ROOT / "configs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {path!r} not found (looked in . and {ROOT / 'configs'})")


def load_config(cls, path: str | None = None, overrides: list[str] = ()):
    """YAML file (optional) + `a.b=value` overrides (values parsed as YAML) -> a checked `cls` config tree."""
    data = {}
    if path:
        file = find_config(path)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of config keys, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        try:  # `key=` (nothing after the =) is the empty string, as a user means it, not YAML's null
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"--set {item}: the value is not valid YAML") from None
    cfg = _build(cls, data)
    check_ranges(cfg)
    return cfg


def config_table(cls) -> str:
    """Every config key as a markdown table (key, default, meaning from the field's comment): docs/config.md."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in _config_rows(cls):
        lines.append(f"| `{key}` | `{default}` | {meaning.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def _config_rows(cls, prefix: str = ""):
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):  # a section: its keys, prefixed
            yield from _config_rows(hint, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        yield prefix + f.name, _yaml_value(default), comments.get(f.name, "")
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections (schedule): the keys its class adds
            own = set(item.__dict__.get("__annotations__", {}))
            yield from (row for row in _config_rows(item, f"{prefix}{f.name}[i].")
                        if row[0].rsplit(".", 1)[-1] in own)


def _field_comments(cls) -> dict[str, str]:
    """field name -> the comment on its line, else the comment lines right above it (joined)."""
    lines = textwrap.dedent("".join(inspect.getsourcelines(cls)[0])).splitlines(keepends=True)
    comment_at = {tok.start[0]: tok.string.lstrip("#").strip()
                  for tok in tokenize.generate_tokens(iter(lines).__next__) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, n = [], node.lineno - 1
            while n in comment_at and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comment_at[n])
                n -= 1
            out[node.target.id] = comment_at.get(node.lineno) or " ".join(above)
    return out


def _yaml_value(value) -> str:
    """A default as one writes it in YAML (1e-5, not 1e-05)."""
    return repr(value).replace("e-0", "e-") if isinstance(value, float) else json.dumps(value)
