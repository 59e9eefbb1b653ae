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


def loss_scale(engine) -> float:
    """The fp16 dynamic loss scale now (DeepSpeed's optimizer wrappers keep it in ``cur_scale``)."""
    return float(engine.optimizer.cur_scale)


def pipeline_layer_names(module) -> list[str]:
    """Class names of a PipelineModule's layers, in order (its ``_layer_specs``), for the partitioning log."""
    return [spec.typename.__name__ for spec in module._layer_specs]


def pipeline_parts(module) -> list[int]:
    """Layer index boundaries of the stages of a PipelineModule (``parts``: stage s holds [parts[s], parts[s+1]))."""
    return list(module.parts)
