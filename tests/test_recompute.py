"""Activation recomputation (``parallel.activation_checkpoint``): the gradients are those of a run that keeps
every activation (fp32, 1e-6), with dropout on, alone and split over 2 tensor-parallel ranks; "selective"
recomputes the attention core and nothing else."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import spawn

from neo.model.args import ModelArgs
from neo.model.gpt import GPT
from neo.parallel import random as tp_random

ARGS = ModelArgs(
    n_layers=3, hidden_size=32, n_heads=4, vocab_size=128, attention_dropout=0.2, hidden_dropout=0.1
)
MODES = [("none", 1), ("full", 1), ("full", 2), ("selective", 1)]


def grads(mode: str, every_n: int, group=None, rank: int = 0) -> tuple[float, dict]:
    """Loss and every gradient of one training step with dropout, from the same weights and random streams."""
    model = GPT(ARGS, tp_group=group, seed=7, recompute=mode, every_n=every_n).train()
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)  # the default stream: the same on every rank (replicated dropout)
    tp_random.seed(100 + rank)  # the split-heads stream: one per tensor-parallel rank
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def worst(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


@pytest.mark.parametrize("mode, every_n", MODES[1:])
def test_recomputation_gives_the_gradients_of_keeping_everything(mode, every_n):
    ref_loss, ref = grads("none", 1)
    loss, got = grads(mode, every_n)
    assert loss == ref_loss and worst(got, ref) <= 1e-6


def test_without_replaying_the_split_heads_stream_the_gradients_would_differ(monkeypatch):
    """Negative control: selective recomputation whose recomputation draws fresh masks gets other gradients."""
    from torch.utils.checkpoint import checkpoint

    _, ref = grads("none", 1)
    monkeypatch.setattr(tp_random, "checkpoint", lambda fn, *a: checkpoint(fn, *a, use_reentrant=False,
                                                                           preserve_rng_state=False))  # fmt: skip
    _, got = grads("selective", 1)
    assert worst(got, ref) > 1e-3


def test_selective_recomputes_only_the_attention_core(monkeypatch):
    from neo.model.layers import MLP, Attention

    calls = {"core": 0, "mlp": 0}
    core, mlp = Attention._attend, MLP.forward
    monkeypatch.setattr(
        Attention,
        "_attend",
        staticmethod(lambda *a, **k: calls.__setitem__("core", calls["core"] + 1) or core(*a, **k)),
    )
    monkeypatch.setattr(
        MLP, "forward", lambda self, *a: calls.__setitem__("mlp", calls["mlp"] + 1) or mlp(self, *a)
    )
    grads("selective", 1)
    assert calls == {"core": 2 * ARGS.n_layers, "mlp": ARGS.n_layers}  # the core twice, the MLP once


def _tp2(rank: int, world: int) -> dict:
    """On 2 ranks attention dropout draws from the per-rank stream: recomputation must replay it too."""
    ref_loss, ref = grads("none", 1, dist.group.WORLD, rank)
    out = {}
    for mode, every_n in MODES[1:]:
        loss, got = grads(mode, every_n, dist.group.WORLD, rank)
        out[f"{mode}{every_n}"] = max(abs(loss - ref_loss), worst(got, ref))
    return out


@pytest.mark.multiproc
def test_recomputation_under_tensor_parallelism():
    for errors in spawn(_tp2, 2):
        assert max(errors.values()) <= 1e-6, errors
