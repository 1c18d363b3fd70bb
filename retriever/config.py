"""The one settings loader of every process: defaults <- environment <- flags.

A settings class is a frozen dataclass, one object per process, passed down in narrow pieces;
this is the only module that reads the environment. `load(cls, prefix, environ, **overrides)`
builds it: each field `x` comes from the variable `prefix + X` (or `prefix + metadata["env"]`;
`metadata["aliases"]` are whole variable names read when that one is unset; `metadata["lower"]`:
the value is lower-cased), parsed as the
type of the field's default (bool: 1/0, true/false, yes/no, on/off; tuple: `os.pathsep`-separated
strings; int, float, str), then the overrides win (a CLI's flags; None values are ignored).
`check(settings, rules, prefix)` runs each field's rule and raises ValueError
"PREFIX_X must be Y, got Z"; a field declared `repr=False` (a secret) is never shown.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class S:
    ...     port: int = 1
    >>> load(S, "APP_", {"APP_PORT": "8"}).port, load(S, "APP_", {"APP_PORT": "8"}, port=9).port
    (8, 9)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import fields
from typing import Any, Callable, Mapping, TypeVar

_S = TypeVar("_S")
Rule = tuple[Callable[[Any], bool], str]  # (predicate on the value, what the value must be)
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def env_name(cls: type, prefix: str, field_name: str) -> str:
    """The environment variable of a field: (RetrieverSettings, "SPECDRAFT_", "indexes") -> SPECDRAFT_INDEX_DIRS."""
    for f in fields(cls):
        if f.name == field_name:
            return prefix + f.metadata.get("env", field_name.upper())
    raise KeyError(field_name)


def load(cls: type[_S], prefix: str, environ: Mapping[str, str] | None = None, **overrides: object) -> _S:
    """Defaults <- `prefix`ed variables of `environ` (default: the process's) <- overrides."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        name = env_name(cls, prefix, f.name)
        raw = next((environ[n] for n in (name, *f.metadata.get("aliases", ())) if n in environ), None)
        if raw is not None:
            values[f.name] = parse(name, _kind(f), raw.strip().lower() if f.metadata.get("lower") else raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = tuple(v)
    return cls(**values)


def check(settings: object, rules: Mapping[str, Rule], prefix: str) -> None:
    """Raises ValueError "PREFIX_X must be Y, got Z" at the first field breaking its rule."""
    for f in fields(settings):  # type: ignore[arg-type]
        rule = rules.get(f.name)
        value = getattr(settings, f.name)
        if rule is not None and not rule[0](value):
            shown = repr(value) if f.repr else "a value not shown (it may hold a secret)"
            raise ValueError(f"{env_name(type(settings), prefix, f.name)} must be {rule[1]}, got {shown}")


def parse(name: str, kind: type, raw: str) -> object:
    """One variable's text as `kind`; ValueError naming the variable."""
    text = raw.strip()
    if kind is tuple:
        return tuple(p for p in text.split(os.pathsep) if p)
    if kind is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(f"{name} must be 0 or 1 (or true/false), got {raw!r}")
        return _BOOLS[text.lower()]
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    return raw


def _kind(f: dataclasses.Field) -> type:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return tuple if isinstance(default, tuple) else type(default)


# ---------------------------------------------------------------- rules


def integer(lo: int, hi: int | None = None) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v and (hi is None or v <= hi)


def number(lo: float, inclusive: bool = True) -> Callable[[object], bool]:
    """A finite number >= lo (> lo when not inclusive)."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v >= lo if inclusive else v > lo))


def one_of(*choices: object) -> Rule:
    return (lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


def boolean(v: object) -> bool:
    return isinstance(v, bool)


def replace(settings: _S, **changes: object) -> _S:
    """A copy with some fields changed (checked again)."""
    return dataclasses.replace(settings, **changes)  # type: ignore[type-var]


__all__ = ["Rule", "boolean", "check", "env_name", "integer", "load", "number", "one_of", "parse",
           "replace"]
