"""Sequence parallelism (``parallel.sequence_parallel``) proven equal to tp = 1 and to plain tensor parallelism,
on 2 and 4 gloo processes: the sequence collectives forward and backward, the whole model (loss, logits and
every gradient) across the block shapes, a length tp does not divide, packed examples, LoRA adapters,
recomputation with dropout, decoding from a KV cache, and a negative control that removes the norm weights'
gradient reduction and must fail. Training through the launcher is in test_tensor_parallel.py and
test_pipeline.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import spawn
from test_tensor_parallel import MODEL_SHAPES, _slice, rel

from neo.model.args import ModelArgs
from neo.model.gpt import GPT

pytestmark = pytest.mark.multiproc

BASE = dict(n_layers=2, hidden_size=64, n_heads=4, vocab_size=256, seq_length=16)
GQA = dict(n_heads=8, n_kv_heads=4, norm="rmsnorm", activation="swiglu", parallel_residual=False, bias=False)


def _collectives(rank: int, world: int) -> dict:
    from neo.parallel import mappings as m

    group, g = dist.group.WORLD, torch.Generator().manual_seed(0)
    x = torch.randn(2, 4 * world, 3, generator=g)  # [b, s, h], the same on every rank
    w = [torch.randn(2, 4 * world, 3, generator=g) for _ in range(world)]  # a downstream weight per rank
    part = slice(4 * rank, 4 * (rank + 1))
    errors = {}

    # gather from the sequence: the whole sequence forward; backward sums the ranks' gradients, keeps our part
    xi = x[:, part].clone().requires_grad_()
    y = m.gather_from_sequence(xi, group)
    (y * w[rank]).sum().backward()
    errors["gather_fwd"], errors["gather_bwd"] = rel(y, x), rel(xi.grad, sum(w)[:, part])

    # reduce-scatter to the sequence: our part of the sum forward; backward gathers the ranks' gradients
    xi = (x * (rank + 1)).requires_grad_()
    y = m.reduce_scatter_to_sequence(xi, group)
    (y * w[rank][:, part]).sum().backward()
    errors["rs_fwd"] = rel(y, (x * sum(r + 1 for r in range(world)))[:, part])
    errors["rs_bwd"] = rel(xi.grad, torch.cat([w[r][:, 4 * r : 4 * (r + 1)] for r in range(world)], 1))

    # gather the sequence for a replicated region: backward keeps our part of the (replicated) gradient
    xi = x[:, part].clone().requires_grad_()
    y = m.gather_sequence(xi, group)
    (y * w[0]).sum().backward()
    errors["gather_seq_fwd"], errors["gather_seq_bwd"] = rel(y, x), rel(xi.grad, w[0][:, part])
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_collectives_forward_and_backward(world):
    for errors in spawn(_collectives, world):
        assert max(errors.values()) < 1e-6, errors


def _compare(full: GPT, part: GPT, ids, labels, world: int, rank: int, ctx_of=lambda: None) -> dict:
    """Loss, gathered logits and every gradient of ``part`` (a tensor-parallel model) against ``full``."""
    part.zero_grad(set_to_none=True)
    full.zero_grad(set_to_none=True)
    reference = full(ids, labels, ctx=ctx_of())
    reference.backward()
    loss = part(ids, labels, ctx=ctx_of())
    loss.backward()
    with torch.no_grad():
        logits = part(ids, ctx=ctx_of())
        chunks = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(chunks, logits)
        logits_err = rel(torch.cat(chunks, -1), full(ids, ctx=ctx_of()))
    grads = {n: rel(p.grad, _slice(full, n, p, world, rank, grad=True))
             for n, p in part.named_parameters() if p.grad is not None or p.requires_grad}  # fmt: skip
    return {"loss": rel(loss.detach(), reference.detach()), "logits": logits_err, "grad": max(grads.values()),
            "worst": max(grads, key=grads.get), "n_grads": len(grads)}  # fmt: skip


def _shapes(rank: int, world: int, shapes: list[dict], lengths: list[int]) -> list[dict]:
    """Each shape and sequence length: tp = world with sequence parallelism against tp = 1 and plain tp."""
    group, out = dist.group.WORLD, []
    for shape in shapes:
        args = ModelArgs(**dict(BASE, **shape))
        full = GPT(args, seed=7)
        plain = GPT(args, tp_group=group, seed=7)
        sp = GPT(args, tp_group=group, seed=7, sequence_parallel=True)
        for s in lengths:
            g = torch.Generator().manual_seed(11 + s)
            ids, labels = (torch.randint(0, args.vocab_size, (2, s), generator=g) for _ in range(2))
            result = {"shape": shape, "s": s, "sp": _compare(full, sp, ids, labels, world, rank)}
            result["plain"] = _compare(full, plain, ids, labels, world, rank)
            for p_sp, p_plain in zip(sp.parameters(), plain.parameters()):
                result["sp_vs_plain"] = max(result.get("sp_vs_plain", 0.0), rel(p_sp.grad, p_plain.grad))
            out.append(result)
    return out


def _check(results: list[dict]) -> None:
    for r in results:
        for form in ("sp", "plain"):
            assert r[form]["loss"] < 1e-5 and r[form]["logits"] < 1e-5 and r[form]["grad"] < 1e-5, r
        assert r["sp_vs_plain"] < 1e-5, r


def test_tp2_sequence_parallel_equals_tp1_and_plain_tp_across_block_shapes():
    """Parallel and sequential residual, LayerNorm and RMSNorm, GeLU and SwiGLU, tied and untied, rotary and
    learned positions, grouped-query attention; 16 positions (8 per rank) and 13 (padded to 14 for the blocks)."""
    for results in spawn(_shapes, 2, [*MODEL_SHAPES, GQA], [16, 13]):
        _check(results)


def test_tp4_sequence_parallel_equals_tp1_and_plain_tp():
    for results in spawn(_shapes, 4, [MODEL_SHAPES[3], GQA], [16, 13]):
        _check(results)


def _packed_lora_cache(rank: int, world: int) -> dict:
    from neo.model.gpt import segment_mask
    from neo.model.layers import Context, KVCache
    from neo.model.lora import LoRASpec, apply_lora

    group, args = dist.group.WORLD, ModelArgs(**dict(BASE, **GQA))
    g = torch.Generator().manual_seed(5)
    ids, labels = (torch.randint(0, args.vocab_size, (2, 15), generator=g) for _ in range(2))
    segments = torch.tensor([[0] * 6 + [1] * 9, [0] * 10 + [-1] * 5])
    positions = torch.where(segments == 1, torch.arange(15) - 6, torch.arange(15))
    packed = lambda: Context(positions=positions, mask=segment_mask(segments))  # noqa: E731
    full, sp = GPT(args, seed=7), GPT(args, tp_group=group, seed=7, sequence_parallel=True)
    out = {"packed": _compare(full, sp, ids, labels, world, rank, packed)}
    with torch.no_grad():  # a KV cache switches sequence parallelism off for the decoding steps
        cached = [sp(ids[:, :9], ctx=Context(cache=(cache := KVCache())))]
        cached += [
            sp(ids[:, t : t + 1], ctx=Context(positions=torch.full((2, 1), t), cache=cache)) for t in (9, 10)
        ]
        uncached = sp(ids[:, :11])
        out["cache"] = rel(torch.cat(cached, 1), uncached)
    for model in (full, sp):  # LoRA with its B made non-zero so that A receives gradients too
        apply_lora(model, LoRASpec(rank=4, alpha=8.0), seed=3)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                with torch.no_grad():
                    p.copy_(
                        _slice(full, name, p, world, rank) if model is sp else p.normal_(0, 0.1, generator=g)
                    )
    out["lora"] = _compare(full, sp, ids, labels, world, rank)
    out["lora_params"] = sum("lora_" in n for n, _ in sp.named_parameters())
    return out


def test_sequence_parallel_with_packed_examples_lora_and_a_kv_cache():
    for r in spawn(_packed_lora_cache, 2):
        for key in ("packed", "lora"):
            assert r[key]["loss"] < 1e-5 and r[key]["logits"] < 1e-5 and r[key]["grad"] < 1e-5, (key, r)
        assert r["lora"]["n_grads"] == r["lora_params"] > 0  # only the adapters train, and all of them do
        assert r["cache"] < 1e-5, r


def _recompute_with_dropout(rank: int, world: int) -> dict:
    """With dropout, the masks drawn in the sequence-split regions are replayed by recomputation."""
    from neo.parallel import random as tp_random

    args = ModelArgs(**dict(BASE, attention_dropout=0.2, hidden_dropout=0.1))
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))

    def step(mode: str) -> tuple[float, list]:
        model = GPT(args, tp_group=dist.group.WORLD, seed=7, recompute=mode, sequence_parallel=True).train()
        torch.manual_seed(11)
        tp_random.seed(100 + rank)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return loss.item(), [p.grad for p in model.parameters()]

    ref_loss, ref = step("none")
    out = {}
    for mode in ("full", "selective"):
        loss, got = step(mode)
        out[mode] = max(abs(loss - ref_loss), *(rel(a, b) for a, b in zip(got, ref)))
    return out


def test_recomputation_replays_the_dropout_of_sequence_split_regions():
    for r in spawn(_recompute_with_dropout, 2):
        assert max(r.values()) <= 1e-6, r


def _without_norm_reduction(rank: int, world: int) -> dict:
    import neo.model.layers as layers

    args = ModelArgs(**BASE)
    full, sp = GPT(args, seed=7), GPT(args, tp_group=dist.group.WORLD, seed=7, sequence_parallel=True)
    layers.copy_to_region = lambda x, _group: x  # the norms' weights no longer sum their gradients
    ids, labels = (
        torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1)) for _ in range(2)
    )
    out = _compare(full, sp, ids, labels, world, rank)
    out["norms"] = min(rel(p.grad, _slice(full, n, p, world, rank, grad=True))
                       for n, p in sp.named_parameters() if "layernorm" in n)  # fmt: skip
    return out


def test_negative_control_without_the_norm_gradient_reduction_gradients_differ():
    results = spawn(_without_norm_reduction, 2)
    assert all(r["loss"] < 1e-5 for r in results)  # the forward is unchanged...
    assert (
        min(r["norms"] for r in results) > 1e-2
    )  # ...but every norm's gradient is wrong, and the test sees it
