"""Megatron-style tensor-parallel layers that are the ordinary ops when the TP group has one rank.

Each layer owns a slice of the full weight. ``reset_parameters(generator)`` draws the *full*
weight from the generator and keeps this rank's slice, so a tp = N model built from the same seed
holds exact slices of the tp = 1 model and computes the same function from step 0.
Sharded parameters carry ``tp_split_dim`` (the dimension they are split along) and
``model_parallel = True`` (what DeepSpeed reads to count gradient norms once per TP group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neo.parallel.mappings import (
    copy_to_region,
    gather_from_region,
    group_rank,
    group_size,
    reduce_from_region,
)


def _shard(param: nn.Parameter, dim: int | None) -> nn.Parameter:
    param.tp_split_dim = dim
    param.model_parallel = dim is not None
    return param


def init_slice_(param: nn.Parameter, std: float, generator: torch.Generator, group) -> None:
    """Fill ``param`` with its slice of a full N(0, std) tensor drawn from ``generator``.

    Every rank draws the same full tensor (same generator state), so slices agree with tp = 1.
    """
    dim = getattr(param, "tp_split_dim", None)
    shape = list(param.shape)
    if dim is not None:
        shape[dim] *= group_size(group)
    full = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    if dim is not None:
        full = full.chunk(group_size(group), dim=dim)[group_rank(group)]
    with torch.no_grad():
        param.copy_(full)


def _divide(n: int, parts: int, what: str) -> int:
    if n % parts:
        raise ValueError(f"{what} = {n} is not divisible by the tensor-parallel size {parts}")
    return n // parts


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) across the TP group.

    The output stays split (each rank holds its features) unless ``gather_output``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        gather_output: bool = False,
        init_std: float = 0.02,
        tp_group=None,
    ):
        super().__init__()
        self.tp_group, self.gather_output, self.init_std = tp_group, gather_output, init_std
        local = _divide(out_features, group_size(tp_group), "output features")
        self.weight = _shard(nn.Parameter(torch.empty(local, in_features)), 0)
        self.bias = _shard(nn.Parameter(torch.zeros(local)), 0) if bias else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_slice_(self.weight, self.init_std, generator, self.tp_group)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_region(x, self.tp_group), self.weight, self.bias)
        return gather_from_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); the input arrives already split.

    With ``reduce_output=False`` the caller receives this rank's partial sum *without* the bias and
    reduces it itself (the parallel-residual block sums attention and MLP partials in one all-reduce),
    then adds ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        reduce_output: bool = True,
        init_std: float = 0.02,
        tp_group=None,
    ):
        super().__init__()
        self.tp_group, self.reduce_output, self.init_std = tp_group, reduce_output, init_std
        local = _divide(in_features, group_size(tp_group), "input features")
        self.weight = _shard(nn.Parameter(torch.empty(out_features, local)), 1)
        self.bias = _shard(nn.Parameter(torch.zeros(out_features)), None) if bias else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_slice_(self.weight, self.init_std, generator, self.tp_group)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if not self.reduce_output:
            return y
        y = reduce_from_region(y, self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across the TP group (rows [rank*V/n, (rank+1)*V/n))."""

    def __init__(self, vocab_size: int, hidden_size: int, *, init_std: float = 0.02, tp_group=None):
        super().__init__()
        self.tp_group, self.init_std = tp_group, init_std
        local = _divide(vocab_size, group_size(tp_group), "padded vocab size")
        self.vocab_start = group_rank(tp_group) * local
        self.weight = _shard(nn.Parameter(torch.empty(local, hidden_size)), 0)

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_slice_(self.weight, self.init_std, generator, self.tp_group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.tp_group)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output head: this rank's slice of the vocabulary logits."""
        return F.linear(copy_to_region(hidden, self.tp_group), self.weight)
