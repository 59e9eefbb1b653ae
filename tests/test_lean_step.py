"""The DeepSpeed step on one data-parallel rank: fp32 ZeRO-1/2 run as ZeRO-0 (they partition nothing there),
and say so; every other case keeps its stage. (The skipped gradient all-reduce: tests/test_ds_compat.py.)"""

from __future__ import annotations

import pytest
from runs import TINY

from neo.config import deepspeed_config, lean_config, load_config


@pytest.mark.parametrize("stage", [1, 2])
def test_fp32_zero_on_one_rank_runs_as_zero0_and_says_so(stage):
    cfg = load_config([TINY], [f"zero.stage={stage}"], world_size=1)
    run, note = lean_config(cfg)
    assert run.zero.stage == 0 and deepspeed_config(run)["zero_optimization"] == {"stage": 0}
    assert f"zero.stage = {stage} with one data-parallel rank partitions nothing: running ZeRO-0" in note
    assert cfg.zero.stage == stage  # the config as written is left alone (it is what config.yml records)
    assert lean_config(run) == (run, None)


@pytest.mark.parametrize(
    "overrides, world",
    [
        (["zero.stage=1"], 2),  # two data-parallel ranks: ZeRO-1 partitions
        (["zero.stage=1", "parallel.tp=2"], 4),  # tp 2 x dp 2
        (["zero.stage=1", "precision.dtype=bf16"], 1),  # bf16: another optimizer wrapper, kept
        (["zero.stage=1", "zero.offload_optimizer=cpu"], 1),  # offload needs ZeRO
        (["zero.stage=1", "zero.single_rank_stage0=false"], 1),  # asked to keep it
        (["zero.stage=3"], 1),
        (["zero.stage=0"], 1),
    ],
)
def test_other_cases_keep_their_stage(overrides, world):
    cfg = load_config([TINY], overrides, world_size=world)
    assert lean_config(cfg) == (cfg, None)


def test_tp2_on_two_processes_has_one_data_parallel_rank():
    cfg = load_config([TINY], ["zero.stage=2", "parallel.tp=2"], world_size=2)
    assert lean_config(cfg)[0].zero.stage == 0
