"""Supervised fine-tuning through the real launchers: the answer-token loss of the global batch whatever the
layout, packing, fine-tuning a pretrained checkpoint, and chat generation from the result."""

from __future__ import annotations

import pytest
from runs import ROOT, make_tokens, rel_curve, run_training

STEPS = 10
TRAIN = (f"schedule.iterations={STEPS}", "schedule.warmup=2", "optimizer.lr=3e-3", "eval.interval=5",
         "eval.iters=2", "logging.interval=5", "objective.type=sft", "model.seq_length=128",
         "data.split=90,10", "batch.global_batch_size=8")  # fmt: skip


@pytest.fixture(scope="module")
def chat_tokens(tmp_path_factory) -> str:
    """The bundled chat sample, rendered with chatml, loss masks on the answers."""
    folder = tmp_path_factory.mktemp("chat")
    return make_tokens(
        folder, "--format", "chat", "--seq-length", "128", source=ROOT / "data" / "sample" / "chat.jsonl"
    )


@pytest.fixture(scope="module")
def reference(chat_tokens, tmp_path_factory):
    """One process, packed, 4 micro-batches of 2: the curve every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("sft_ref")
    return run_training(run_dir, f"data.train_paths=[{chat_tokens}]", *TRAIN, "data.packing=true",
                        "batch.micro_batch_size=2")  # fmt: skip


def test_sft_trains_on_answer_tokens_and_validates_them(reference):
    assert reference.losses[-1] < reference.losses[0] - 1.0 and len(reference.valid_losses) == 2
    assert reference.valid_losses[-1] < reference.valid_losses[0]
    valid = [r for r in reference.records if "valid_loss" in r]
    assert all(r["valid_loss_tokens"] > 0 and r["valid_ppl"] > 1 for r in valid)
    assert "objective sft" in reference.output


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc, layout", [
    (2, ("zero.stage=3", "batch.micro_batch_size=1")),  # dp 2 x 4 accumulation, ZeRO-3
    (2, ("parallel.tp=2", "batch.micro_batch_size=4")),  # tp 2, 2 accumulation
    (2, ("parallel.pp=2", "batch.micro_batch_size=2")),  # pp 2: packed examples cross the stages
], ids=["dp2-zero3-accum4", "tp2", "pp2"])  # fmt: skip
def test_every_layout_gives_the_single_process_curve(reference, chat_tokens, tmp_path, nproc, layout):
    """The micro-batches of a step hold different numbers of answer tokens; the loss is the mean over the
    answer tokens of the whole global batch in every split, so the curves agree (fp32, 1e-4 relative)."""
    run = run_training(tmp_path, f"data.train_paths=[{chat_tokens}]", *TRAIN, "data.packing=true", *layout,
                       nproc=nproc)  # fmt: skip
    assert rel_curve(run.losses, reference.losses) <= 1e-4
    assert rel_curve(run.valid_losses, reference.valid_losses) <= 1e-4
    tokens = [r["loss_tokens"] for r in run.records if "loss_tokens" in r and "loss" in r]
    assert tokens == [r["loss_tokens"] for r in reference.records if "loss_tokens" in r and "loss" in r]


def test_fine_tuning_a_pretrained_checkpoint_and_chatting_with_it(tiny_checkpoint, chat_tokens, tmp_path):
    """finetune.init_from takes the pretrained weights and shape (fresh optimizer, iteration 0), without
    packing; generate --chat renders the prompt with the template the data was made with."""
    import subprocess
    import sys

    from runs import clean_env

    run = run_training(tmp_path, f"data.train_paths=[{chat_tokens}]", *TRAIN, f"finetune.init_from={tiny_checkpoint}",
                       "batch.micro_batch_size=4", "model.seq_length=128")  # fmt: skip
    assert "starting at iteration 0, fresh optimizer" in run.output
    assert run.valid_losses[-1] < run.valid_losses[0]
    cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), str(tmp_path / "checkpoints"), "--chat",
           "--prompt", "What is the capital of France?", "--max-new-tokens", "8", "--seed", "0", "--echo"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("What is the capital of France?")
