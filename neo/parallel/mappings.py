"""Every tensor-parallel collective neo uses, as conjugate autograd pairs.

Megatron's scheme: a column-parallel layer's input is *copied* to the region (identity forward,
all-reduce of the gradient backward); a row-parallel layer's output is *reduced* out of it (all-reduce
forward, identity backward). Scatter/gather along the last dimension are each other's conjugates.

Sequence parallelism (Korthikanti et al. 2022) splits the regions between those layers (norms, dropout, the
residual stream) along the sequence (dimension 1 of [batch, seq, hidden]) and swaps the pairs for their
sequence forms: the column-parallel input is *gathered* from the sequence split (all-gather forward,
reduce-scatter backward) and the row-parallel output is *reduce-scattered* into it (reduce-scatter forward,
all-gather backward). Same bytes as the all-reduce they replace (an all-reduce is a reduce-scatter followed by
an all-gather), and the activations between them are 1/tp the size. The gathered input, which the linears
keep for their weight gradients, is kept as this rank's part and gathered again in backward
(``saved_as_sequence_part``), as Megatron does: otherwise it would cost its full size on every rank.
Each function takes the process group explicitly and is the identity when the group has one rank,
so tp = 1 calls no collective at all (DESIGN principle 3).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """Ranks in a TP group; ``None`` means no tensor parallelism."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


SEQ = 1  # the sequence dimension of [batch, seq, hidden]


def _split(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} ({x.shape[dim]}) is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _gather(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int = SEQ) -> torch.Tensor:
    n = group_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"dimension {dim} ({x.shape[dim]}) is not divisible by the tensor-parallel size {n}")
    parts = [part.contiguous() for part in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """All-gather forward, reduce-scatter backward: the sequence-parallel input of column-parallel layers,
    whose input gradients are partial sums over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, SEQ)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, SEQ), None


class _GatherSequence(torch.autograd.Function):
    """All-gather forward, split backward: leaving the sequence split for a region where every rank computes
    the same function of the whole sequence (the output head), so each holds the whole gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, SEQ)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, SEQ), None


class _FirstRankOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return x if group_rank(group) == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def first_rank_only(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` on the group's first rank and zeros elsewhere forward, identity backward: a term every rank
    computes alike (from replicated values) added once to partial sums that the group then reduces. Every
    rank receives the (replicated) gradient, so replicated weights behind it stay equal."""
    return x if group_size(group) == 1 else _FirstRankOnly.apply(x, group)


def copy_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce backward: the input of a column-parallel layer."""
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward, identity backward: the output of a row-parallel layer."""
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's chunk of the last dimension; the backward gathers the gradient."""
    return x if group_size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's chunk along the last dimension; the backward splits the gradient."""
    return x if group_size(group) == 1 else _GatherFromRegion.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence forward, reduce-scatter backward: the input of column-parallel layers
    under sequence parallelism (in place of ``copy_to_region``)."""
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Sum the partial outputs and keep this rank's part of the sequence forward, all-gather backward: the
    output of row-parallel layers under sequence parallelism (in place of ``reduce_from_region``)."""
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the sequence forward, keep this rank's part of the gradient backward: the whole
    sequence for the output head, which every rank then computes alike."""
    return x if group_size(group) == 1 else _GatherSequence.apply(x, group)


@contextlib.contextmanager
def saved_as_sequence_part(full: torch.Tensor, part: torch.Tensor, group):
    """Within the block, autograd keeps ``full`` (= ``gather_from_sequence(part)``) and its views as ``part``
    alone, and gathers it again when backward needs it: the column-parallel linears' saved inputs cost 1/tp
    of their size. Every rank runs the same backward graph, so the gathers meet in the same order.
    (Autograd keeps the hooks with what they saved: they must not hold ``full`` itself.)"""
    if group_size(group) == 1 or not full.is_contiguous():
        yield
        return
    storage = full.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() != storage:
            return t
        return part, t.size(), t.stride(), t.storage_offset()

    def unpack(saved):
        if isinstance(saved, torch.Tensor):
            return saved
        local, size, stride, offset = saved
        return _gather(local, group, SEQ).as_strided(size, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
