"""The attention core, softmax(Q K^T / sqrt(d)) V: torch's fused kernels, and an explicit form for dropout on a CPU.

``attend`` sends everything to ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels: nothing of
size seq x seq is kept for backward), except training with attention dropout on a CPU. There torch has no fused
kernel with dropout and falls back to its math path, which computes and keeps the scores, probabilities and a
dropout mask of the activations' full width, and in fp32 for bf16 inputs: about 2.5 times the bytes of the
standard accounting (Korthikanti et al. 2022: 2 bytes of probabilities, 1 of mask, 2 of dropped probabilities
per score). The explicit form keeps exactly those: probabilities in the activations' dtype (the softmax is
computed in fp32, as Megatron's fused softmax does), a boolean mask, the dropped probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension computed in fp32, returned and kept for backward in the input's dtype."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        p, g = probs.float(), grad.float()
        return (p * (g - (g * p).sum(dim=-1, keepdim=True))).to(grad.dtype)


def explicit_dropout_attention(q, k, v, mask, dropout: float, gqa: bool) -> torch.Tensor:
    """Attention with dropout on the probabilities, keeping 2 + 1 + 2 bytes per score (bf16; see the module
    docstring). ``mask`` [.., s, t] is True where a query may attend; None is causal with the queries last."""
    if gqa:  # each key/value head serves n_heads / n_kv_heads query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    s, t = q.shape[2], k.shape[2]
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))
    if mask is None:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    probs = _Softmax.apply(scores.masked_fill(~mask, float("-inf")))
    keep = torch.rand(probs.shape, device=probs.device) >= dropout
    return torch.matmul(torch.where(keep, probs * (1.0 / (1.0 - dropout)), 0.0), v)


def attend(q, k, v, mask, dropout: float, gqa: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [b, heads, s, d] and k, v [b, kv_heads, t, d]; ``mask`` None means
    causal (queries are the last s positions), else a boolean [.., s, t] (True = may attend)."""
    if dropout and q.device.type == "cpu":
        return explicit_dropout_attention(q, k, v, mask, dropout, gqa)
    s = q.shape[2]
    kw = {"dropout_p": dropout, "enable_gqa": True} if gqa else {"dropout_p": dropout}  # torch >= 2.5
    if mask is None and k.shape[2] == s:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    if mask is None and s == 1:  # one new query at the end of an unpadded cache: it sees every key
        return F.scaled_dot_product_attention(q, k, v, **kw)
    if mask is None:  # cached decoding without padding: the new queries sit at the end
        total = k.shape[2]
        mask = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
