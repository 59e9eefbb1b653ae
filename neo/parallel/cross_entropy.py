"""Cross-entropy over vocabulary-parallel logits that never gathers the full logits.

Each rank holds logits for its slice of the vocabulary. The loss needs three all-reduces of
[tokens]-sized tensors (max, target logit, sum of exponentials) instead of a gather of
[tokens, vocab]. With one rank it is ``F.cross_entropy``.

``fused_head_cross_entropy`` goes one step further for training: it takes the hidden states and the
output head's weight, and runs head and loss over chunks of tokens, computing the gradients of both
inputs as it goes (the softmax minus the one-hot target is all the backward pass needs). The full
[tokens, vocab] logits, their fp32 copy and their gradient are never held: at a 50k vocabulary those
are ~0.6 MB per token, more than the rest of a small model's activations. The matmul FLOPs are the
same as head + loss; on a CPU the training step is 8-12% faster (bench/results/train_step-fused-loss-*),
from not streaming the logits through memory several times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from neo.parallel.mappings import group_rank, group_size


def _at_least_fp32(x: torch.Tensor, copy: bool = False) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32), copy=copy)


def _softmax_and_loss(logits: torch.Tensor, target: torch.Tensor, group):
    """Per-token loss of fp32 (or fp64) ``logits`` [n, vocab / tp]; overwrites ``logits`` with the softmax.

    Returns (loss [n], softmax, local target index [n], whether the target is outside this rank's slice [n]).
    """
    local_vocab = logits.shape[-1]
    logits_max = logits.max(dim=-1).values
    if group_size(group) > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits.sub_(logits_max.unsqueeze(-1))

    local_target = target - group_rank(group) * local_vocab
    outside = (local_target < 0) | (local_target >= local_vocab)
    local_target = local_target.masked_fill(outside, 0)
    target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)

    exp = shifted.exp_()
    sum_exp = exp.sum(dim=-1)
    if group_size(group) > 1:
        dist.all_reduce(target_logit, group=group)
        dist.all_reduce(sum_exp, group=group)
    return sum_exp.log() - target_logit, exp.div_(sum_exp.unsqueeze(-1)), local_target, outside


def _subtract_target_(
    softmax: torch.Tensor, local_target: torch.Tensor, outside: torch.Tensor
) -> torch.Tensor:
    """softmax - one_hot(target): the gradient of the per-token loss with respect to the logits."""
    hit = (~outside).to(softmax.dtype)
    return softmax.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group):
        loss, softmax, local_target, outside = _softmax_and_loss(
            _at_least_fp32(logits, copy=True), target, group
        )
        ctx.save_for_backward(softmax, local_target, outside)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, outside = ctx.saved_tensors
        return _subtract_target_(softmax, local_target, outside) * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group=None) -> torch.Tensor:
    """Per-token loss [..] from logits [.., vocab / tp] split across ``group`` (fp32 arithmetic)."""
    if group_size(group) == 1:
        return F.cross_entropy(
            _at_least_fp32(logits).flatten(0, -2), target.flatten(), reduction="none"
        ).view_as(target)
    return _VocabParallelCrossEntropy.apply(logits, target, group)


class _FusedHeadCrossEntropy(torch.autograd.Function):
    """Mean (or weighted sum) loss of ``hidden @ weight.T`` against ``target``, chunk by chunk, gradients
    computed in forward.

    The gradients are kept in fp32 (``weight``'s) and ``hidden``'s dtype at a scale near 1 until backward
    multiplies them by ``grad_output / n`` (or ``grad_output * max(token_weights)``): an fp16 loss scale is
    applied there, and the small softmax values never pass through a 1/n factor in half precision.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group, chunk: int,
                token_weights: torch.Tensor | None = None):  # fmt: skip
        n, want_weight_grad = hidden.shape[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if want_weight_grad else None
        losses = hidden.new_empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32))
        top = None
        if token_weights is not None:  # weights relative to the largest, so the stored gradients stay near 1
            top = token_weights.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
            relative = _at_least_fp32(token_weights) / top
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            x = hidden[start:end]
            logits = _at_least_fp32(x @ weight.t())
            losses[start:end], softmax, local_target, outside = _softmax_and_loss(
                logits, target[start:end], group
            )
            grad_logits = _subtract_target_(softmax, local_target, outside)
            if top is not None:
                grad_logits.mul_(relative[start:end].unsqueeze(-1))
            grad_logits = grad_logits.to(weight.dtype)
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])  # a partial sum when tp > 1
            if grad_weight is None:
                continue
            if weight.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad_logits.t(), x)
            else:
                grad_weight += grad_logits.t() @ x
        ctx.grads, ctx.weight_dtype = (grad_hidden, grad_weight), weight.dtype
        if top is None:
            ctx.factor = 1.0 / n
            return losses.mean()
        ctx.factor = top
        return (losses * _at_least_fp32(token_weights)).sum()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "fused_head_cross_entropy: backward ran twice over the same graph (retain_graph). "
                "Fix: set model.loss_chunk_size=0 for the unfused head and loss."
            )
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        scale = _at_least_fp32(grad_output) * ctx.factor
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(ctx.weight_dtype)
        return grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight, None, None, None, None


def _chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group, chunk: int,
                  token_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The fused forward without gradients (evaluation): mean (or weighted sum) loss, one chunk of logits at a
    time."""
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk):
        logits = _at_least_fp32(hidden[start : start + chunk] @ weight.t())
        losses = _softmax_and_loss(logits, target[start : start + chunk], group)[0]
        if token_weights is not None:
            losses = losses * _at_least_fp32(token_weights[start : start + chunk])
        total += losses.sum()
    return total if token_weights is not None else total / hidden.shape[0]


def fused_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group=None,
                             chunk: int = 1024, token_weights: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Mean next-token loss of the output head ``weight`` [vocab / tp, h] on ``hidden`` [.., h]; with
    ``token_weights`` [..], the weighted sum of the per-token losses instead (a loss mask times a
    normalization, for SFT).

    Equal to ``vocab_parallel_cross_entropy(hidden @ weight.T, target, group).mean()`` (or ``(... *
    token_weights).sum()``); under TP, ``hidden`` must come through ``copy_to_region`` (its backward sums the
    ranks' partial gradients).
    """
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    if token_weights is not None:
        token_weights = token_weights.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedHeadCrossEntropy.apply(hidden, weight, target, group, chunk, token_weights)
    return _chunked_loss(hidden, weight, target, group, chunk, token_weights)


def _logprobs_and_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group, entropy: bool):
    """log p(target) [n], entropy [n] (-sum p log p over the TP group; None unless asked: a log over every
    logit costs more than the rest) and the softmax of one chunk."""
    nll, softmax, local_target, outside = _softmax_and_loss(_at_least_fp32(x @ weight.t()), target, group)
    ent = None
    if entropy:
        ent = -torch.special.xlogy(softmax, softmax).sum(-1)
        if group_size(group) > 1:
            dist.all_reduce(ent, group=group)
    return -nll, ent, (softmax, local_target, outside)


class _TokenLogProbs(torch.autograd.Function):
    """log p(target) per token of ``hidden @ weight.T``, chunk by chunk; backward recomputes each chunk's
    softmax, so neither pass holds [tokens, vocab] logits, and any function of the log-probabilities (DPO's,
    PPO's) can be differentiated through it (one more head matmul than the fused loss)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group, chunk: int,
                entropy: bool):  # fmt: skip
        n = hidden.shape[0]
        out = hidden.new_empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32))
        ent = torch.zeros_like(out)
        for start in range(0, n, chunk):
            sl = slice(start, min(start + chunk, n))
            out[sl], e, _ = _logprobs_and_entropy(hidden[sl], weight, target[sl], group, entropy)
            if e is not None:
                ent[sl] = e
        ctx.save_for_backward(hidden, weight, target)
        ctx.group, ctx.chunk = group, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, target = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for start in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(start, min(start + ctx.chunk, hidden.shape[0]))
            _, _, (softmax, local_target, outside) = _logprobs_and_entropy(hidden[sl], weight, target[sl], ctx.group,
                                                                           False)  # fmt: skip
            # d log p / d logits = one_hot - softmax
            grad_logits = _subtract_target_(softmax, local_target, outside).mul_(
                -_at_least_fp32(grad_logp[sl]).unsqueeze(-1)
            )
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[sl] = grad_logits @ weight  # a partial sum when tp > 1
            grad_weight += grad_logits.t().to(grad_weight.dtype) @ hidden[sl].to(grad_weight.dtype)
        need_w = ctx.needs_input_grad[1]
        return grad_hidden, (grad_weight.to(weight.dtype) if need_w else None), None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, group=None,
                   chunk: int = 1024, entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p(target), entropy) per token, shaped like ``target``, from the output head ``weight`` [vocab / tp, h]
    on ``hidden`` [.., h] (fp32 arithmetic). The log-probabilities carry gradients; the entropy does not, and
    is zeros unless ``entropy``. Under TP ``hidden`` must come through ``copy_to_region``."""
    shape = target.shape
    logp, ent = _TokenLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), group,
                                     chunk or 1 << 30, entropy)  # fmt: skip
    return logp.view(shape), ent.view(shape)
