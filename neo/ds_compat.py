"""Every DeepSpeed internal neo relies on, in one place.

neo drives DeepSpeed through its public API where one exists. Where it does not, the private attribute
or patch is wrapped here, with the reason neo needs it; tests/test_ds_compat.py exercises each one, so
that a DeepSpeed upgrade that moves one fails in one place, loudly. Tested with DeepSpeed 0.19
(pyproject.toml states the range).
"""

from __future__ import annotations

import torch


def gathered_parameters(params: list[torch.nn.Parameter]):
    """ZeRO-3: a context in which every rank holds the full values of ``params`` (read only).

    Public API (``deepspeed.zero.GatheredParameters``), kept here so that the checkpoint writer does not
    import DeepSpeed itself."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
