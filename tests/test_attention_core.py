"""The explicit attention core used for dropout on a CPU: the function of softmax(QK^T/sqrt(d)) V with the mask it
draws (fp64 reference, values and gradients), what it keeps for backward, and torch's kernel without dropout."""

from __future__ import annotations

import math

import pytest
import torch

from neo.model.attention_core import attend, explicit_dropout_attention


def reference(q, k, v, mask, keep, p: float) -> torch.Tensor:
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs * keep / (1 - p)) @ v


@pytest.mark.parametrize("kv_heads, padded", [(4, False), (2, True)], ids=["mha-causal", "gqa-masked"])
def test_explicit_dropout_attention_is_the_function_with_its_mask(kv_heads, padded):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 6, 8, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    if padded:  # row 1 stops attending after position 3 (a packed example's boundary); no empty rows
        mask = mask.expand(2, 1, 6, 6).clone()
        mask[1, :, 4:, :4] = False
    torch.manual_seed(5)
    out = explicit_dropout_attention(q, k, v, None if not padded else mask, 0.3, kv_heads < 4)
    torch.manual_seed(5)
    keep = torch.rand(2, 4, 6, 6) >= 0.3  # the draw the function made
    ref = reference(*(t.double() for t in (q, k, v)), mask, keep, 0.3)
    assert (out.double() - ref).abs().max() < 1e-6
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert max((a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)) < 1e-5


def test_it_keeps_bf16_probabilities_and_a_boolean_mask():
    """What backward keeps per score: 2 bytes of probabilities, 1 of mask, 2 of dropped probabilities (bf16)."""
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kept: dict[int, int] = {}

    def pack(t):
        if t.numel() == 2 * 64 * 64:  # one element per score (2 heads x 64 queries x 64 keys)
            kept[t.untyped_storage().data_ptr()] = t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attend(q, k, v, None, 0.1)
    assert sorted(kept.values()) == [1, 2, 2]


def test_without_dropout_the_fused_kernel_runs_and_agrees():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 4, 5, 5, dtype=torch.bool)
    ref = reference(*(t.double() for t in (q, k, v)), torch.ones(5, 5, dtype=torch.bool).tril(), keep, 0.0)
    assert (attend(q, k, v, None, 0.0).double() - ref).abs().max() < 1e-6
