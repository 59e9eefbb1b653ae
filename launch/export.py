"""Export a checkpoint to Hugging Face transformers, or import one: ``python launch/export.py --help``."""

from neo.cli.export import console

if __name__ == "__main__":
    console()
