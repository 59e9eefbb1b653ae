"""Generate text from a checkpoint of any tp/pp layout: ``python launch/generate.py --help``."""

from neo.cli.generate import console

if __name__ == "__main__":
    console()
