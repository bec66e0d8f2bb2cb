"""Strict settings from TOML: checking values against a dataclass's fields, and printing the defaults.

:func:`check_values` reads the field annotations of a dataclass and refuses, with a message naming the setting
and what was expected, every value TOML can give that does not fit: ``int`` fields refuse booleans, floats and
strings; ``float`` fields accept integers (as floats) and refuse booleans, strings and non-finite numbers;
``bool`` fields accept only ``true``/``false`` (not the string ``"false"``); sequence fields
(``Sequence[int]``, ``tuple[int, ...]``, ``list[float]``) refuse scalars and check every element; ``str``
fields with a set of choices refuse the others; a field annotated ``str | dict`` also takes a TOML table.

Choices and one-line documentation come from the field's ``metadata`` (``dataclasses.field(metadata={"doc":
..., "choices": (...)})``) or from the class attributes ``__field_docs__`` / ``__field_choices__`` (dicts
from field name); a ``Literal[...]`` annotation also declares the choices. :func:`print_config` renders every
setting with its default and its doc as a TOML file that :func:`check_values` accepts.

Example::

    @dataclasses.dataclass
    class Cfg:
        __field_docs__ = {"depths": "depths L of the sweep", "init": "initialisation"}
        __field_choices__ = {"init": ("zero", "mean_noise")}
        depths: Sequence[int] = (1, 2)
        init: str = "zero"

    values = check_values(Cfg, tomllib.load(f), where="rates config run.toml")  # ValueError / TypeError
    cfg = Cfg(**values)
    print(print_config(Cfg))
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["check_values", "check_value", "field_choices", "field_docs", "print_config", "toml_value"]

_SEQUENCES = (
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    tuple,
    list,
)


def _fields(cls) -> dict[str, dataclasses.Field]:
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"config: expected a dataclass type, got {cls!r}.")
    return {f.name: f for f in dataclasses.fields(cls)}


def field_docs(cls) -> dict[str, str]:
    """The one-line documentation of each field of the dataclass ``cls`` (``""`` where none)."""
    table = getattr(cls, "__field_docs__", {}) or {}
    return {name: str(f.metadata.get("doc", table.get(name, ""))) for name, f in _fields(cls).items()}


def field_choices(cls) -> dict[str, tuple]:
    """The allowed values of the fields that declare them (metadata, ``__field_choices__`` or ``Literal``)."""
    table = getattr(cls, "__field_choices__", {}) or {}
    hints = typing.get_type_hints(cls)
    out = {}
    for name, f in _fields(cls).items():
        choices = f.metadata.get("choices", table.get(name))
        if choices is None and typing.get_origin(hints.get(name)) is typing.Literal:
            choices = typing.get_args(hints[name])
        if choices is not None:
            out[name] = tuple(choices)
    return out


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "a table"
    return f"a {type(v).__name__}"


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is dict or origin in (dict, collections.abc.Mapping):
        return "a table"
    if tp is type(None):
        return "none"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in _SEQUENCES:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = _describe(args[0]) if args else "values"
        return f"a list of {_plural(inner)}"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a finite number", "finite numbers"), ("a string", "strings"),
                      ("true or false", "booleans"), ("a table", "tables")):  # fmt: skip
        if text == one:
            return many
    return text


class _Mismatch(Exception):
    pass


def _convert(tp, v: Any, choices) -> Any:
    """``v`` converted to the annotation ``tp``; ``_Mismatch`` if it does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return v
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise _Mismatch
    if tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise _Mismatch
    if tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise _Mismatch
            return float(v)
        raise _Mismatch
    if tp is str:
        if isinstance(v, str) and (choices is None or v in choices):
            return v
        raise _Mismatch
    if tp is dict or origin in (dict, collections.abc.Mapping):
        if isinstance(v, dict):
            return dict(v)
        raise _Mismatch
    if tp is type(None):
        if v is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        if any(v == a and type(v) is type(a) for a in typing.get_args(tp)):
            return v
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _convert(alt, v, choices)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in _SEQUENCES or tp in (tuple, list):
        if not isinstance(v, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin is tuple and args and (len(args) != 2 or args[1] is not Ellipsis):  # fixed-length tuple
            if len(args) != len(v):
                raise _Mismatch
            return tuple(_convert(a, x, None) for a, x in zip(args, v))
        inner = args[0] if args else Any
        return tuple(_convert(inner, x, choices) for x in v)
    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _Mismatch
    return v  # an annotation this checker does not know: left to the class's own validation


def check_value(cls, name: str, value: Any, *, where: str = "config") -> Any:
    """``value`` checked against the field ``name`` of the dataclass ``cls`` and converted (sequences to
    tuples, integers to floats for ``float`` fields). ``TypeError`` for a value of the wrong type,
    ``ValueError`` for a string outside the choices or a non-finite number; the message names the setting."""
    fields = _fields(cls)
    if name not in fields:
        raise ValueError(f"{where}: unknown setting {name!r}; known settings: {', '.join(sorted(fields))}.")
    tp = typing.get_type_hints(cls)[name]
    choices = field_choices(cls).get(name)
    try:
        return _convert(tp, value, choices)
    except _Mismatch:
        pass
    expected = _describe(tp)
    if choices is not None:
        expected = "one of " + ", ".join(repr(c) for c in choices) if tp is str else f"{expected} from {choices}"
    got = f"{value!r} ({_kind(value)})"
    bad_float = isinstance(value, float) and not math.isfinite(value)
    bad_choice = choices is not None and isinstance(value, str)
    error = ValueError if bad_float or bad_choice else TypeError
    raise error(f"{where}: {name} must be {expected}, got {got}.")


def check_values(cls, values: Mapping[str, Any], *, where: str = "config") -> dict[str, Any]:
    """Every entry of ``values`` (e.g. a parsed TOML file's top level) checked by :func:`check_value`.

    Unknown keys are a ``ValueError`` listing the known ones. Returns a new dict of converted values, to be
    passed to ``cls(**values)`` (missing keys keep the dataclass defaults).
    """
    if not isinstance(values, Mapping):
        raise TypeError(f"{where}: expected a table of settings, got {_kind(values)}.")
    fields = _fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known settings: {', '.join(sorted(fields))}.")
    return {name: check_value(cls, name, v, where=where) for name, v in values.items()}


def toml_value(v: Any) -> str:
    """``v`` (bool, int, float, str, sequence or dict of these) written as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (JSON escapes are TOML escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"toml_value: cannot write a {type(v).__name__} as TOML ({v!r}).")


def _toml_key(k: str) -> str:
    k = str(k)
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k)


def print_config(cls, values: Mapping[str, Any] | None = None, *, header: str | None = None) -> str:
    """A TOML file listing every setting of the dataclass ``cls`` with its default (or its value in
    ``values``, e.g. ``dataclasses.asdict`` of an instance), each preceded by its one-line doc and choices.

    Fields whose default is ``None`` (TOML has no null) are written as comments.
    """
    fields = _fields(cls)
    docs = field_docs(cls)
    choices = field_choices(cls)
    hints = typing.get_type_hints(cls)
    lines = [f"# {line}" if line else "#" for line in (header or "").splitlines()]
    for name, f in fields.items():
        if values is not None and name in values:
            v = values[name]
        elif f.default is not dataclasses.MISSING:
            v = f.default
        elif f.default_factory is not dataclasses.MISSING:
            v = f.default_factory()
        else:
            v = None
        comment = docs[name]
        extra = f"one of {', '.join(repr(c) for c in choices[name])}" if name in choices else _describe(hints[name])
        lines.append(f"# {comment} ({extra})" if comment else f"# ({extra})")
        lines.append(f"# {name} =" if v is None else f"{name} = {toml_value(v)}")
    return "\n".join(lines) + "\n"
