"""Train from YAML configs: ``python launch/train.py CONFIGS``, ``deepspeed launch/train.py CONFIGS``."""

from neo.cli.train import console

if __name__ == "__main__":
    console()
