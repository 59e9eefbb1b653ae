"""Cross-entropy over vocabulary-parallel logits that never gathers the full logits.

Each rank holds logits for its slice of the vocabulary. The loss needs three all-reduces of
[batch, seq]-sized tensors (max, target logit, sum of exponentials) instead of a gather of
[batch, seq, vocab]. With one rank it is ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neo.parallel.mappings import group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        start = group_rank(group) * local_vocab

        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        local_target = target - start
        outside = (local_target < 0) | (local_target >= local_vocab)
        local_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_target, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, outside = ctx.saved_tensors
        grad_input = softmax
        hit = (~outside).to(grad_input.dtype)
        grad_input.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        return grad_input * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss [..] from logits [.., vocab / tp] split across ``group`` (fp32 arithmetic)."""
    if group_size(group) == 1:
        return F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), reduction="none").view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target, group)
