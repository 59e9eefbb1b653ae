#!/usr/bin/env python
"""Train a GPT-NeoX-style model from YAML configs.

    python launch/train.py ds_configs/quickstart.yml                 # one process, CPU or GPU
    deepspeed --num_gpus 8 launch/train.py CONFIGS...                # one node
    torchrun --nproc_per_node 2 launch/train.py CONFIGS...           # one node, also on CPU
    sbatch slurm/train.sbatch CONFIGS...                             # SLURM, one node or many

Exit codes: 0 finished; 2 bad config or launch environment; 75 saved after SIGTERM/SIGUSR1 (requeue me).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neo.config import ConfigError, add_config_arguments, load_config, to_yaml  # noqa: E402
from neo.distributed import LaunchError, read_env, shutdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        env = read_env()
        cfg = load_config(args.configs, args.overrides, env.world_size)
    except (ConfigError, LaunchError) as e:
        print(f"neo: {e}", file=sys.stderr, flush=True)
        return 2
    if env.rank == 0:
        print("neo: resolved config\n" + to_yaml(cfg), flush=True)

    from neo.checkpoint import CheckpointError
    from neo.data.indexed import DataError
    from neo.data.tokenizer import TokenizerError
    from neo.train.loop import train

    try:
        return train(cfg)
    except (ConfigError, LaunchError, CheckpointError, DataError, TokenizerError) as e:
        print(f"neo: rank {env.rank}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    shutdown(main())
