"""The train/valid/test split ratio ("969,30,1"): parsed in one place, for the config and the datasets.

Pure Python (no numpy, no torch), so that validating a config stays light.
"""

from __future__ import annotations

from neo.errors import DataError


def parse_split(text: str) -> list[float]:
    """Up to three non-negative shares train,valid,test ("969,30,1"; "98,2" means no test), padded to three."""
    try:
        shares = [float(x) for x in text.replace("/", ",").split(",")]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(x < 0 for x in shares) or sum(shares) <= 0:
        raise DataError(f"split {text!r}: expected up to three non-negative numbers train,valid,test such as "
                        "'969,30,1'")  # fmt: skip
    return shares + [0.0] * (3 - len(shares))
