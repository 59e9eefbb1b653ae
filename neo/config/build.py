"""Typed construction: YAML values checked against the dataclass fields and converted, with the source of each."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``). YAML reads 6e-4 as a string, so floats accept numeric strings."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                return False, value
            return (f.is_integer(), int(f))
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


class _Builder:
    def __init__(self, sources: dict[str, str]):
        self.sources = sources
        self.problems: list[str] = []
        self.type_errors = 0  # values that could not be read; combination checks wait for these

    def where(self, key: str) -> str:
        src = self.sources.get(key)
        return f"(set in {src})" if src else "(default)"

    def build(self, cls, data: Any, prefix: str):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "world_size"]
        if not isinstance(data, dict):
            self.problems.append(
                f"{prefix.rstrip('.')} {self.where(prefix.rstrip('.'))} must be a mapping of "
                f"keys ({', '.join(names)}), got {data!r}"
            )
            return cls()
        kwargs = {}
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = (
                    f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
                )
                self.problems.append(f"unknown key '{dotted}' {self.where(dotted)}.{hint}")
                continue
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                kwargs[key] = self.build(tp, value, dotted + ".")
                continue
            ok, converted = _coerce(value, tp)
            if not ok:
                self.problems.append(f"{dotted} = {value!r} {self.where(dotted)} must be {_describe(tp)}")
                self.type_errors += 1
                continue
            kwargs[key] = converted
        return cls(**kwargs)


def _shorthand(data: dict) -> dict:
    """Accept ``precision: bf16`` for ``precision: {dtype: bf16}``."""
    if isinstance(data.get("precision"), str):
        data = dict(data, precision={"dtype": data["precision"]})
    return data
