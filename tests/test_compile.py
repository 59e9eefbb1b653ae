"""model.compile: transformer blocks compiled with torch.compile train as eager ones do, in the plain and the
pipeline form; without inductor's C++ compiler a run says so and stays eager.

Compiling costs tens of seconds on a 2-core CPU, so the runs are the tiny model and few: one eager reference,
one compiled plain run, one compiled 2-stage pipeline (inductor's cache, shared by the runs, makes the later
compiles of the same block cheaper).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from runs import TINY, rel_curve, run_training

STEPS = 10
TRAIN = (
    f"schedule.iterations={STEPS}",
    "schedule.warmup=2",
    "optimizer.lr=3e-3",
    "eval.interval=5",
    "eval.iters=2",
    "logging.interval=5",
    "batch.global_batch_size=8",
    "batch.micro_batch_size=4",
    "checkpoint.save_interval=0",
)


@pytest.fixture(scope="module")
def eager(sample_tokens, tmp_path_factory):
    return run_training(tmp_path_factory.mktemp("eager"), f"data.train_paths=[{sample_tokens}]", *TRAIN)


def test_compiled_blocks_train_as_eager(eager, sample_tokens, tmp_path):
    """10 steps: training and validation losses within fp32 noise (1e-5 relative; observed ~1e-7)."""
    run = run_training(tmp_path, f"data.train_paths=[{sample_tokens}]", *TRAIN, "model.compile=true")
    assert "model.compile: 2 blocks compiled with torch.compile" in run.output
    assert rel_curve(run.losses, eager.losses) <= 1e-5
    assert rel_curve(run.valid_losses, eager.valid_losses) <= 1e-5


@pytest.mark.multiproc
def test_compiled_blocks_under_pipeline_equal_one_process(eager, sample_tokens, tmp_path):
    """pp = 2, each stage compiling its block: the eager one-process curve within the pipeline's 1e-4."""
    pipeline = ("model.compile=true", "parallel.pp=2")
    run = run_training(tmp_path, f"data.train_paths=[{sample_tokens}]", *TRAIN, *pipeline, nproc=2)
    assert "model.compile: 1 block compiled" in run.output and "stage 1: layers" in run.output
    assert rel_curve(run.losses, eager.losses) <= 1e-4
    assert rel_curve(run.valid_losses, eager.valid_losses) <= 1e-4


def _tiny(*overrides: str):
    from neo.config import load_config
    from neo.model.gpt import GPT
    from neo.train import build

    cfg = load_config([TINY], ["model.vocab_size=256", *overrides])
    return cfg, GPT(build.model_args(cfg, SimpleNamespace(vocab_size=256)))


def _compiled(model) -> list[bool]:
    from neo.model.layers import Block

    return [m._compiled_call_impl is not None for m in model.modules() if isinstance(m, Block)]


def test_without_a_cpp_compiler_the_blocks_stay_eager_and_the_log_says_why(monkeypatch):
    import torch._inductor.config as inductor

    from neo.train import build

    cfg, model = _tiny("model.compile=true")
    assert build.compile_blocks(model, cfg, torch.device("cpu")).startswith("neo: model.compile: 2 blocks")
    assert _compiled(model) == [True, True]  # compiling is lazy: nothing ran yet

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "/nonexistent/g++"))  # what a machine without g++ has
    cfg, model = _tiny("model.compile=true")
    note = build.compile_blocks(model, cfg, torch.device("cpu"))
    assert "no working C++ compiler" in note and "the blocks run eager" in note and "CXX" in note
    assert _compiled(model) == [False, False]
    cfg, model = _tiny()
    assert build.compile_blocks(model, cfg, torch.device("cpu")) is None
    assert _compiled(model) == [False, False]


def test_compile_with_zero3_is_refused_by_name():
    from neo.config import ConfigError

    with pytest.raises(ConfigError, match="model.compile = true .* cannot be combined with zero.stage = 3"):
        _tiny("model.compile=true", "zero.stage=3")
