"""Grouped-query attention under tensor and pipeline parallelism: tp = 2 equals tp = 1 (weights, logits,
loss and every gradient; 2 gloo processes), key/value heads that tp does not divide are refused, and a
Llama-shaped model (GQA, no biases, rotary scaling, sliding window) trains the single-process loss curve
as a 2-stage pipeline x 2 tensor-parallel ranks, and its checkpoint exports to transformers' logits."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from distributed_helpers import spawn
from runs import run_training
from test_tensor_parallel import _model  # the tp = 2 vs tp = 1 comparison every model shape goes through

from neo.model.args import ModelArgs, RopeScaling
from neo.model.gpt import GPT

pytestmark = pytest.mark.multiproc

LLAMA = dict(n_layers=2, hidden_size=64, n_heads=8, vocab_size=256, seq_length=16, norm="rmsnorm",
             activation="swiglu", rotary_pct=1.0, parallel_residual=False, bias=False)  # fmt: skip
SHAPES = {
    "llama-gqa-window-llama3": dict(**LLAMA, n_kv_heads=2, sliding_window=5,
                                    rope_scaling=RopeScaling(type="llama3", original_max_positions=8)),
    "qwen2-qkv-bias-parallel-residual": dict(**{**LLAMA, "parallel_residual": True}, n_kv_heads=4, qkv_bias=True,
                                             loss_chunk_size=5),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SHAPES))
def test_tp2_equals_tp1_with_grouped_query_attention(name):
    for result in spawn(_model, 2, SHAPES[name]):
        assert result["init"] == 0.0, "tp = 2 weights must be exact slices of the tp = 1 initialisation"
        assert result["logits"] < 1e-5 and result["loss"] < 1e-5, result
        assert result["grad"] < 1e-5, result


def _build(rank, world, shape):
    try:
        GPT(ModelArgs(**shape), tp_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


def test_kv_heads_that_tp_does_not_divide_are_refused():
    errors = spawn(_build, 2, dict(**LLAMA, n_kv_heads=1))
    assert all("n_kv_heads = 1 is not divisible by the tensor-parallel size 2" in e for e in errors)


TRAIN = ("schedule.iterations=6", "schedule.warmup=1", "optimizer.lr=3e-3", "eval.interval=3", "eval.iters=2",
         "logging.interval=3", "model.vocab_size=50432", "batch.global_batch_size=8", "model.norm=rmsnorm",
         "model.activation=swiglu", "model.rotary_pct=1.0", "model.parallel_residual=false", "model.bias=false",
         "model.n_kv_heads=2", "model.sliding_window=24", "model.rope_scaling.type=llama3",
         "model.rope_scaling.original_max_positions=32")  # fmt: skip


def test_pipeline_and_tensor_parallel_llama_shape_trains_the_single_process_curve(sample_tokens, tmp_path):
    ref = run_training(
        tmp_path / "ref", f"data.train_paths=[{sample_tokens}]", *TRAIN, "batch.micro_batch_size=4"
    )
    run = run_training(tmp_path / "pp2tp2", f"data.train_paths=[{sample_tokens}]", *TRAIN, "parallel.pp=2",
                       "parallel.tp=2", "batch.micro_batch_size=4", nproc=4)  # fmt: skip
    assert "stage 1: layers" in run.output
    for a, b in ((run.losses, ref.losses), (run.valid_losses, ref.valid_losses)):
        assert len(a) == len(b) and a and max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= 1e-4

    # The pp 2 x tp 2 checkpoint exports (its sliding window makes it a MistralForCausalLM) to transformers'
    # logits.
    import torch
    import transformers

    from neo.checkpoint import load_model
    from neo.export.hf import export_checkpoint

    assert (
        export_checkpoint(str(run.dir / "checkpoints"), str(tmp_path / "hf"))["architecture"]
        == "MistralForCausalLM"
    )
    model, args, _ = load_model(str(run.dir / "checkpoints"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
