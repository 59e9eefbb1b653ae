"""Tokenize a corpus into <prefix>.bin + <prefix>.idx for training: ``python launch/preprocess.py --help``."""

from neo.cli.preprocess import console

if __name__ == "__main__":
    console()
