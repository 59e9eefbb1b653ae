"""The output head's two chunked primitives beyond the mean loss, against formulas written here in fp64:
the weighted fused cross-entropy (SFT's masked, globally normalized loss) and per-token log-probabilities
with their entropy (DPO, PPO, GRPO), alone and split over 2 tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_helpers import spawn

from neo.parallel.cross_entropy import fused_head_cross_entropy, token_logprobs
from neo.parallel.mappings import copy_to_region

N, H, V = 37, 16, 50  # 37 tokens in chunks of 5 or 7: a remainder in the last chunk


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    target = torch.randint(0, V, (N,), generator=g)
    weights = torch.rand(N, generator=g, dtype=dtype) * (torch.rand(N, generator=g) > 0.3)
    coef = torch.randn(N, generator=g, dtype=dtype)
    return hidden, weight, target, weights, coef


def _reference(hidden, weight, target, weights, coef):
    """fp64 autograd through the full logits: the weighted loss, log p, entropy and their gradients."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.T
    loss = (F.cross_entropy(logits, target, reduction="none") * weights).sum()
    loss_grads = torch.autograd.grad(3.0 * loss, (h, w))
    logp_all = torch.log_softmax(h @ w.T, -1)
    logp = logp_all.gather(-1, target[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    nonlinear = (logp * coef).sum() + logp.exp().sum()  # any function of the log-probabilities
    logp_grads = torch.autograd.grad(nonlinear, (h, w))
    return loss.detach(), loss_grads, logp.detach(), entropy.detach(), logp_grads


@pytest.mark.parametrize("chunk", [5, 7, 1024])
def test_weighted_loss_and_token_logprobs_equal_the_formulas(chunk):
    hidden, weight, target, weights, coef = _inputs()
    ref_loss, ref_loss_grads, ref_logp, ref_entropy, ref_logp_grads = _reference(
        hidden, weight, target, weights, coef
    )
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_head_cross_entropy(h, w, target, None, chunk, token_weights=weights)
    grads = torch.autograd.grad(3.0 * loss, (h, w))
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(grads, ref_loss_grads))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = token_logprobs(h, w, target, None, chunk, entropy=True)
    grads = torch.autograd.grad((logp * coef).sum() + logp.exp().sum(), (h, w))
    assert (logp - ref_logp).abs().max() < 1e-12 and (entropy - ref_entropy).abs().max() < 1e-12
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(grads, ref_logp_grads))
    assert not entropy.requires_grad


def test_weighted_loss_without_gradients_equals_with():
    hidden, weight, target, weights, _ = _inputs()
    with torch.no_grad():
        evaluated = fused_head_cross_entropy(hidden, weight, target, None, 5, token_weights=weights)
    trained = fused_head_cross_entropy(
        hidden.requires_grad_(), weight, target, None, 5, token_weights=weights
    )
    assert abs(evaluated.item() - trained.item()) < 1e-12


def _tp2(rank: int, world: int) -> dict:
    """Each rank holds half of the vocabulary rows; the results must equal the unsplit formulas."""
    hidden, weight, target, weights, coef = _inputs()
    ref_loss, ref_loss_grads, ref_logp, ref_entropy, ref_logp_grads = _reference(
        hidden, weight, target, weights, coef
    )
    group, rows = dist.group.WORLD, V // world
    local = weight[rank * rows : (rank + 1) * rows]
    out = {}
    h, w = hidden.clone().requires_grad_(), local.clone().requires_grad_()
    loss = fused_head_cross_entropy(copy_to_region(h, group), w, target, group, 7, token_weights=weights)
    gh, gw = torch.autograd.grad(3.0 * loss, (h, w))
    out["loss"] = abs(loss.item() - ref_loss.item())
    out["loss_grads"] = max((gh - ref_loss_grads[0]).abs().max().item(),
                            (gw - ref_loss_grads[1][rank * rows : (rank + 1) * rows]).abs().max().item())  # fmt: skip
    h, w = hidden.clone().requires_grad_(), local.clone().requires_grad_()
    logp, entropy = token_logprobs(copy_to_region(h, group), w, target, group, 7, entropy=True)
    gh, gw = torch.autograd.grad((logp * coef).sum() + logp.exp().sum(), (h, w))
    out["logp"] = max((logp - ref_logp).abs().max().item(), (entropy - ref_entropy).abs().max().item())
    out["logp_grads"] = max((gh - ref_logp_grads[0]).abs().max().item(),
                            (gw - ref_logp_grads[1][rank * rows : (rank + 1) * rows]).abs().max().item())  # fmt: skip
    return out


@pytest.mark.multiproc
def test_tensor_parallel_split_equals_the_formulas():
    for errors in spawn(_tp2, 2):
        assert max(errors.values()) < 1e-12, errors
