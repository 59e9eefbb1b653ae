"""The config reference (the README's table), generated from the dataclasses and their comments."""

from __future__ import annotations

import dataclasses
import typing

from neo.config.build import _describe
from neo.config.derived import to_dict
from neo.config.schema import Config


def _field_comments(cls) -> dict[str, str]:
    """Each field's comment in the source of the class and of the dataclasses it extends (``model:`` is
    ``ModelArgs`` plus a few keys): trailing (``x: int = 1  # ...``) or on the lines above."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls) -> dict[str, str]:
    import inspect
    import re

    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "class ", "@", "return")):
            text = " ".join([*pending, m.group(2) or ""]).strip()
            if text:
                comments[m.group(1)] = text
        pending = []
    return comments


def reference_markdown() -> str:
    """The config reference (README's table), generated from the dataclasses and their comments."""
    defaults = to_dict(Config())
    out = []
    for f in dataclasses.fields(Config):
        if f.name == "world_size":
            continue
        tp = typing.get_type_hints(Config)[f.name]
        if not dataclasses.is_dataclass(tp):
            doc = (
                "extra DeepSpeed config keys, merged last (neo refuses keys it derives itself)"
                if f.name == "deepspeed"
                else "seed of the weights, the data order and dropout"
            )
            out.append(f"| `{f.name}` | {_describe(tp)} | `{defaults[f.name]}` | {doc} |")
            continue
        stack = [(f"{f.name}.", tp, defaults[f.name])]
        while stack:
            prefix, cls, values = stack.pop(0)
            notes = _field_comments(cls)
            hints = typing.get_type_hints(cls)
            for sub in dataclasses.fields(cls):
                if dataclasses.is_dataclass(hints[sub.name]):
                    stack.append((f"{prefix}{sub.name}.", hints[sub.name], values[sub.name]))
                    continue
                default = values[sub.name]
                out.append(
                    f"| `{prefix}{sub.name}` | {_describe(hints[sub.name]).replace('|', '/')} | `{default}` | "
                    f"{notes.get(sub.name, '')} |"
                )
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(out) + "\n"
