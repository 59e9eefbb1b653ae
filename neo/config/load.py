"""Reading YAML files, merging them left to right with ``--set`` overrides, building and validating.

cfg = load_config(["ds_configs/models/pythia-70m.yml", "my_run.yml"], ["optimizer.lr=3e-4"])
"""

from __future__ import annotations

import os

import yaml

from neo.config.build import _Builder, _shorthand
from neo.config.checks import _check
from neo.config.schema import Config
from neo.errors import ConfigError


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(
            [f"{path}: no such config file. Fix: check the path (configs live in ds_configs/)."]
        )
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{path}: the top level must be a mapping of sections (model:, batch:, ...), "
                f"not a {type(data).__name__}"
            ]
        )
    return data


def _merge(base: dict, new: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``new`` into ``base`` (later wins; lists are replaced), recording who set each key."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, sources, dotted + ".")
        else:
            base[key] = value
            sources[dotted] = source
            if isinstance(value, dict):
                for sub in _flatten(value, dotted + "."):
                    sources[sub] = source


def _flatten(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as YAML (3, true, [1, 2], gpt2)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=3e-4"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    files: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int | None = None,
) -> Config:
    """Merge YAML ``files`` left to right, apply ``key=value`` overrides, build and validate.

    ``world_size`` (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1) resolves the batch arithmetic.
    Raises ``ConfigError`` listing every problem found.
    """
    merged: dict = {}
    sources: dict[str, str] = {}
    for path in files:
        _merge(merged, _shorthand(_read_yaml(path)), path, sources)
    for text in overrides:
        _merge(merged, _shorthand(parse_override(text)), "--set", sources)
    b = _Builder(sources)
    cfg = b.build(Config, merged, "")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    cfg.world_size = world_size
    if not b.type_errors:
        _check(cfg, b)
    if b.problems:
        raise ConfigError(b.problems)
    cfg.sources = sources  # type: ignore[attr-defined]
    return cfg
