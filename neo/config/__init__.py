"""One run, one config: typed sections, YAML merged left to right, validated before anything starts.

    cfg = load_config(["ds_configs/models/pythia-70m.yml", "my_run.yml"], ["optimizer.lr=3e-4"])

Every problem is reported at once, each line naming the key, where it was set and the fix. The
DeepSpeed config dict is derived in exactly one place, ``deepspeed_config``. Run
``python -m neo.config --explain FILES`` to see the resolved config and batch arithmetic.

    schema.py     the dataclasses (each field's comment is its documentation)
    load.py       YAML files + --set overrides, merged, built and validated
    build.py      typed construction of the dataclasses from merged YAML
    checks.py     validation of values and combinations
    derived.py    the DeepSpeed dict, the config a run runs (lean_config), YAML, batch arithmetic
    reference.py  the README's config reference
"""

from neo.config.derived import batch_arithmetic, deepspeed_config, lean_config, to_dict, to_yaml
from neo.config.load import load_config, parse_override
from neo.config.reference import reference_markdown
from neo.config.schema import Config
from neo.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "batch_arithmetic",
    "deepspeed_config",
    "lean_config",
    "load_config",
    "parse_override",
    "reference_markdown",
    "to_dict",
    "to_yaml",
]
