"""The dtype names neo accepts on command lines and in APIs, and the default device rule.

Imports torch only when a dtype or device is asked for, so that light front ends (--help) stay fast.
"""

from __future__ import annotations

# Short and long names -> torch dtype attribute names.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
DTYPE_NAMES |= {long: long for long in list(DTYPE_NAMES.values())}
SHORT_NAMES = ("fp32", "bf16", "fp16", "fp64")  # what command lines offer


def torch_dtype(name):
    """The torch dtype named ``name`` (fp32/float32, bf16/bfloat16, fp16/float16, fp64/float64); a torch dtype
    or None is returned as it is."""
    if name is None or not isinstance(name, str):
        return name
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(SHORT_NAMES)}")
    return getattr(torch, DTYPE_NAMES[name])


def default_device() -> str:
    """Where inference runs unless told otherwise: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
