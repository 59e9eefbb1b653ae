"""Evaluate a checkpoint (loss, perplexity, bits per byte, lm-eval): ``python launch/evaluate.py --help``."""

from neo.cli.evaluate import console

if __name__ == "__main__":
    console()
