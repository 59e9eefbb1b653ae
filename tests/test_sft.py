"""Supervised fine-tuning's loss: answer tokens only, normalized over the global batch, and packing
without cross-talk (in-process, on the plain model; the launcher-level tests are in test_sft_training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neo.model.args import ModelArgs
from neo.model.gpt import GPT
from neo.objectives import MicroBatch
from neo.objectives.sft import SFT, positions_of

ARGS = ModelArgs(n_layers=2, hidden_size=32, n_heads=4, vocab_size=64, seq_length=24, rotary_pct=1.0)


def example(rng: np.random.Generator, length: int, answer_from: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and a loss mask that is 1 from ``answer_from`` on (the assistant's part)."""
    tokens = rng.integers(1, 64, length)
    mask = (np.arange(length) >= answer_from).astype(np.uint8)
    return tokens, mask


def item(parts: list[tuple[np.ndarray, np.ndarray]], width: int) -> dict:
    """One sample of ``width`` tokens holding whole examples back to back, padded with 0 (segment -1)."""
    tokens, mask, segments = (
        np.zeros(width, np.int64),
        np.zeros(width, np.uint8),
        np.full(width, -1, np.int32),
    )
    at = 0
    for i, (t, m) in enumerate(parts):
        tokens[at : at + len(t)], mask[at : at + len(t)], segments[at : at + len(t)] = t, m, i
        at += len(t)
    return {"tokens": tokens, "loss_mask": mask, "segments": segments}


class _Packing:
    def __init__(self, packing: bool):
        self.data = type("D", (), {"packing": packing})()


def per_example_losses(model: GPT, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token nll per row's segment, the segment ids), through the model's own head."""
    out = {}

    def capture(head, hidden, labels):
        targets, weights = labels
        logp, _ = head.token_logprobs(hidden, targets)
        out["nll"] = -(logp * weights)
        return out["nll"].sum()

    model.loss_fn = capture
    loss = model(micro.inputs, labels=micro.labels)
    return loss, out["nll"]


def test_positions_restart_at_each_packed_example():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_of(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_packed_batch_equals_the_examples_one_by_one():
    """Three examples packed in one row give each example's loss and the gradients of running them one by one
    (fp32, 1e-5): attention never crosses an example and positions restart."""
    rng = np.random.default_rng(0)
    parts = [example(rng, 7, 3), example(rng, 9, 4), example(rng, 5, 1)]
    sft = SFT(_Packing(True))
    packed = sft.collate([item(parts, 25)])
    alone = [SFT(_Packing(False)).collate([item([p], 25)]) for p in parts]

    model = GPT(ARGS, seed=1).train()
    loss, nll = per_example_losses(model, packed)
    loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    segments = packed.inputs[2][0]
    packed_each = [nll[0][segments == i].sum() for i in range(3)]

    model.zero_grad()
    alone_each = []
    for micro in alone:
        one, _ = per_example_losses(model, micro)
        one.backward()
        alone_each.append(one.detach())
    for a, b in zip(packed_each, alone_each):
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
    for k, p in model.named_parameters():
        assert (packed_grads[k] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max().clamp_min(1e-6), k


def test_without_the_segment_mask_the_examples_would_leak():
    """Negative control: the same packed row run as one plain sequence gives different losses for examples 2, 3."""
    rng = np.random.default_rng(0)
    parts = [example(rng, 7, 3), example(rng, 9, 4), example(rng, 5, 1)]
    packed = SFT(_Packing(True)).collate([item(parts, 25)])
    plain = MicroBatch(inputs=packed.inputs[0], labels=packed.labels)
    model = GPT(ARGS, seed=1)
    with torch.no_grad():
        _, nll_packed = per_example_losses(model, packed)
        _, nll_plain = per_example_losses(model, plain)
    segments = packed.inputs[2][0]
    assert torch.allclose(nll_packed[0][segments == 0], nll_plain[0][segments == 0])
    assert not torch.allclose(nll_packed[0][segments == 1].sum(), nll_plain[0][segments == 1].sum())


def _step(model: GPT, sft: SFT, micros: list[MicroBatch], dp: int = 1) -> tuple[float, dict]:
    """What DeepSpeed does with the objective's losses: mean over micro-batches (and ranks), backward of each."""
    model.zero_grad()
    micros = sft.start_step(micros, lambda t: t * torch.tensor([1.0, 1.0], dtype=t.dtype) * dp)
    total = 0.0
    for m in micros:
        loss = model(m.inputs, labels=m.labels)
        (loss / len(micros)).backward()
        total += loss.item() / len(micros)
    return total, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("split", [[4], [2, 2], [1, 3], [1, 1, 1, 1]])
def test_the_loss_is_the_mean_over_answer_tokens_of_the_global_batch(split):
    """Four samples with 2, 11, 5 and 17 answer tokens: every split into micro-batches gives the global
    token mean (and its gradients), not a mean of micro-batch means."""
    rng = np.random.default_rng(1)
    samples = [item([example(rng, 20, 20 - n)], 21) for n in (2, 11, 5, 17)]
    sft, model = SFT(_Packing(False)), GPT(ARGS, seed=2).train()
    model.loss_fn = sft.loss
    micros, at = [], 0
    for size in split:
        micros.append(sft.collate(samples[at : at + size]))
        at += size
    loss, grads = _step(model, sft, micros)
    mean_of_tokens, ref = _reference(model, sft, samples)
    assert abs(loss - mean_of_tokens) <= 1e-6 * mean_of_tokens
    assert all((grads[k] - ref[k]).abs().max() <= 1e-6 * ref[k].abs().max().clamp_min(1e-9) for k in ref)
    if len(split) > 1:  # the naive mean of micro-batch means differs
        naive = np.mean([_mean(model, sft, m) for m in micros])
        assert abs(naive - mean_of_tokens) > 1e-3


def _mean(model: GPT, sft: SFT, micro: MicroBatch) -> float:
    with torch.no_grad():
        targets, weights = micro.labels
        return model(micro.inputs, labels=(targets, weights / weights.sum())).item()


def _reference(model: GPT, sft: SFT, samples: list[dict]) -> tuple[float, dict]:
    """Sum of answer-token nll over all samples / number of answer tokens, by plain autograd."""
    model.zero_grad()
    micro = sft.collate(samples)
    targets, weights = micro.labels
    loss = model(micro.inputs, labels=(targets, weights / weights.sum()))
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}
