"""Train a GPT-NeoX-style model from YAML configs.

    neo-train ds_configs/quickstart.yml                              # one process, CPU or GPU
    python launch/train.py ds_configs/quickstart.yml                 # the same, from a checkout
    deepspeed --num_gpus 8 launch/train.py CONFIGS...                # one node
    torchrun --nproc_per_node 2 launch/train.py CONFIGS...           # one node, also on CPU
    sbatch slurm/train.sbatch CONFIGS...                             # SLURM, one node or many

Exit codes: 0 finished; 2 bad config, data, checkpoint or launch environment; 75 saved after
SIGTERM/SIGUSR1 (requeue me).
"""

from __future__ import annotations

import argparse

from neo.cli.common import add_config_arguments, guarded

PROG = "neo-train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    # the deepspeed launcher passes --local_rank; neo reads LOCAL_RANK from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from neo.config import load_config, to_yaml
        from neo.distributed import read_env

        env = read_env()
        cfg = load_config(args.configs, args.overrides, env.world_size)
        if env.rank == 0:
            print("neo: resolved config\n" + to_yaml(cfg), flush=True)
        from neo.train.loop import train

        return train(cfg)

    return guarded(PROG, body)


def console() -> None:
    """Entry point: ends the process without Python's teardown (see ``neo.distributed.shutdown``)."""
    from neo.distributed import shutdown

    shutdown(main())
