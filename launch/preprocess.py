"""Tokenize a corpus into <prefix>.bin + <prefix>.idx for training. Run with --help for the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from neo.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
