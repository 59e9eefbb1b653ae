"""Every tensor-parallel collective neo uses, as conjugate autograd pairs.

Megatron's scheme: a column-parallel layer's input is *copied* to the region (identity forward,
all-reduce of the gradient backward); a row-parallel layer's output is *reduced* out of it (all-reduce
forward, identity backward). Scatter/gather along the last dimension are each other's conjugates.
Each function takes the process group explicitly and is the identity when the group has one rank,
so tp = 1 calls no collective at all (DESIGN principle 3).
"""

from __future__ import annotations

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


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    if x.shape[-1] % n:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


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
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


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
