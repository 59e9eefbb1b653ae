"""Pipeline parallelism (DeepSpeed PipelineModule from neo's layer specs) equals the single-process run."""

from __future__ import annotations

import re

import pytest
from runs import BF16_FIRST_STEPS, rel_curve, run_training

pytestmark = pytest.mark.multiproc

STEPS = 10
TRAIN = (
    f"schedule.iterations={STEPS}",
    "schedule.warmup=2",
    "optimizer.lr=3e-3",
    "eval.interval=5",
    "eval.iters=2",
    "logging.interval=5",
    "batch.global_batch_size=8",
)


def reference(tmp_path_factory, sample_tokens, *extra: str):
    return run_training(
        tmp_path_factory.mktemp("pp_ref"),
        f"data.train_paths=[{sample_tokens}]",
        *TRAIN,
        "batch.micro_batch_size=4",
        *extra,
    )


@pytest.fixture(scope="module")
def ref(sample_tokens, tmp_path_factory):
    return reference(tmp_path_factory, sample_tokens)


@pytest.mark.parametrize(
    "nproc, extra",
    [
        (2, ("parallel.pp=2", "batch.micro_batch_size=4")),  # 2 micro-batches in flight
        # 8 micro-batches in flight, each stage's blocks recomputed in backward
        (2, ("parallel.pp=2", "batch.micro_batch_size=1", "parallel.activation_checkpoint=full")),
        (2, ("parallel.pp=2", "zero.stage=1", "zero.single_rank_stage0=false", "batch.micro_batch_size=2")),
        (4, ("parallel.pp=2", "batch.micro_batch_size=2")),  # pp 2 x dp 2
        # pp 2 x tp 2, the attention core recomputed
        (
            4,
            (
                "parallel.pp=2",
                "parallel.tp=2",
                "batch.micro_batch_size=4",
                "parallel.activation_checkpoint=selective",
            ),
        ),
        (  # pp2 x tp2 x dp2, sequence parallel: DeepSpeed sends each rank's own part of the sequence
            8,
            (
                "parallel.pp=2",
                "parallel.tp=2",
                "zero.stage=1",
                "batch.micro_batch_size=2",
                "parallel.sequence_parallel=true",
            ),
        ),
        (2, ("parallel.pp=2", "parallel.partition_method=uniform", "batch.micro_batch_size=4")),
    ],
    ids=["pp2", "pp2-8micro", "pp2-zero1", "pp2xdp2", "pp2xtp2", "pp2xtp2xdp2-sp", "pp2-uniform"],
)
def test_pipeline_equals_single_process(ref, sample_tokens, tmp_path, nproc, extra):
    """fp32, 10 steps: train and validation losses within 1e-4 relative of one process."""
    run = run_training(tmp_path, f"data.train_paths=[{sample_tokens}]", *TRAIN, *extra, nproc=nproc)
    assert "pipeline partitioning" in run.output and "stage 1: layers" in run.output
    assert rel_curve(run.losses, ref.losses) <= 1e-4
    assert rel_curve(run.valid_losses, ref.valid_losses) <= 1e-4


@pytest.mark.parametrize("layers, pp, method", [(3, 2, "type:Block"), (5, 3, "parameters")])
def test_uneven_and_tied_pipelines_equal_single_process(
    sample_tokens, tmp_path_factory, tmp_path, layers, pp, method
):
    """Uneven splits (3 blocks on 2 stages, 5 blocks on 3 stages) with the embedding tied to the head."""
    shape = (f"model.n_layers={layers}", "model.tie_embeddings=true")
    base = reference(tmp_path_factory, sample_tokens, *shape)
    run = run_training(
        tmp_path,
        f"data.train_paths=[{sample_tokens}]",
        *TRAIN,
        *shape,
        f"parallel.pp={pp}",
        f"parallel.partition_method={method}",
        "batch.micro_batch_size=2",
        nproc=pp,
    )
    assert f"stage {pp - 1}: layers" in run.output
    assert rel_curve(run.losses, base.losses) <= 1e-4
    assert rel_curve(run.valid_losses, base.valid_losses) <= 1e-4


def test_zero2_with_pipeline_is_refused_before_launch(sample_tokens, tmp_path):
    run = run_training(
        tmp_path, f"data.train_paths=[{sample_tokens}]", "parallel.pp=2", "zero.stage=2", nproc=2, check=False
    )
    assert run.returncode != 0 and not run.records
    assert "cannot be combined with pipeline parallelism" in run.output
    assert not re.search(r'File ".*/(neo|launch|deepspeed)/', run.output), (
        "no traceback from neo or DeepSpeed"
    )


def test_pipeline_bf16_trains(ref, sample_tokens, tmp_path):
    """bf16 pipeline (ZeRO-1: DeepSpeed's bf16 pipeline with ZeRO-0 cannot resume) tracks fp32 within 2%."""
    run = run_training(
        tmp_path,
        f"data.train_paths=[{sample_tokens}]",
        *TRAIN,
        "parallel.pp=2",
        "zero.stage=1",
        "precision.dtype=bf16",
        "batch.micro_batch_size=4",
        *BF16_FIRST_STEPS,
        nproc=2,
    )
    assert len(run.losses) == 5 and rel_curve(run.losses, ref.losses[:5]) <= 0.02
