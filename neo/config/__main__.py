"""``python -m neo.config FILES --explain``: resolve, validate and explain config files."""

from __future__ import annotations

import argparse
import sys

from neo.cli.common import add_config_arguments, report
from neo.config.derived import batch_arithmetic, deepspeed_config, lean_config, to_yaml
from neo.config.load import load_config
from neo.config.reference import reference_markdown
from neo.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neo.config", description="Resolve, validate and explain neo config files."
    )
    add_config_arguments(parser, required=False)
    parser.add_argument("--reference", action="store_true", help="print the config reference (markdown)")
    parser.add_argument("--explain", action="store_true", help="print the resolved config and derived values")
    parser.add_argument("--world-size", type=int, default=None, help="processes the run will use (default 1)")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    if not args.configs:
        parser.error("give at least one config file (or --reference)")
    try:
        cfg = load_config(args.configs, args.overrides, args.world_size)
    except ConfigError as e:
        return report("python -m neo.config", e)
    print(to_yaml(cfg), end="")
    if args.explain:
        import json

        print("# sources (key: file that set it; everything else is a default)")
        sources = cfg.sources  # type: ignore[attr-defined]
        for key, src in sorted(sources.items()):
            if not any(other.startswith(key + ".") for other in sources):
                print(f"#   {key}: {src}")
        print(f"# batch: {batch_arithmetic(cfg)}")
        run_cfg, note = lean_config(cfg)
        if note:
            print(f"# {note}")
        print("# deepspeed config:", json.dumps(deepspeed_config(run_cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


if __name__ == "__main__":
    sys.exit(main())
