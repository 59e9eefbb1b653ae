"""Megatron-style tensor-parallel layers that are the ordinary ops when the TP group has one rank.

Each layer owns a slice of the full weight. ``reset_parameters(generator)`` draws the *full*
weight from the generator and keeps this rank's slice, so a tp = N model built from the same seed
holds exact slices of the tp = 1 model and computes the same function from step 0.
Sharded parameters carry ``tp_split_dim`` (the dimension they are split along) and
``model_parallel = True`` (what DeepSpeed reads to count gradient norms once per TP group).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from neo.parallel import random as tp_random
from neo.parallel.mappings import (
    copy_to_region,
    first_rank_only,
    gather_from_region,
    group_rank,
    group_size,
    reduce_from_region,
    reduce_scatter_to_sequence,
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


class LoRALinear(nn.Module):
    """A low-rank update beside a frozen weight (Hu et al. 2021): y += (alpha / r) B A dropout(x), with A [r, in]
    drawn like PEFT (uniform within 1/sqrt(in)) and B [out, r] zero, so training starts from the base model.

    Under tensor parallelism A and B follow the weight they adapt. A column-parallel weight (rows split): A is
    replicated and B split by rows; A's output is copied into the region (its gradient summed over the group),
    so A receives the same gradient on every rank. A row-parallel weight (columns split): A is split by
    columns and B replicated; A's partial outputs are all-reduced, and B's output is added after the layer's
    own reduction (or once, on the first rank, to a partial sum the block reduces). Both are exact: the
    tp = N adapters are slices of the tp = 1 ones, and so are their gradients.
    """

    def add_lora(self, rank: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
        """Attach adapters of ``rank`` (initialised from ``generator``, the same draw on every TP rank)."""
        out_full, in_full = self._full_shape()
        row = isinstance(self, RowParallelLinear)
        bound = 1.0 / math.sqrt(in_full)
        a_full = torch.empty(rank, in_full).uniform_(-bound, bound, generator=generator)
        a = a_full.chunk(group_size(self.tp_group), dim=1)[group_rank(self.tp_group)] if row else a_full
        b_rows = out_full if row else out_full // group_size(self.tp_group)
        self.lora_A = _shard(nn.Parameter(a.to(self.weight.dtype).contiguous()), 1 if row else None)
        self.lora_B = _shard(
            nn.Parameter(torch.zeros(b_rows, rank, dtype=self.weight.dtype)), None if row else 0
        )
        for p in (self.lora_A, self.lora_B):
            p.neo_fresh, p.neo_lora = True, True
        self.lora_scale, self.lora_dropout, self.lora_enabled = alpha / rank, dropout, True

    def _full_shape(self) -> tuple[int, int]:
        tp, (rows, cols) = group_size(self.tp_group), self.weight.shape
        return (rows * tp, cols) if isinstance(self, ColumnParallelLinear) else (rows, cols * tp)

    def _lora_input(self, x: torch.Tensor, split: bool) -> torch.Tensor:
        if not (self.training and self.lora_dropout):
            return x
        with tp_random.fork() if split else contextlib.nullcontext():  # split activations: per-rank masks
            return F.dropout(x, self.lora_dropout, training=True)

    def lora_active(self) -> bool:
        return "lora_A" in self._parameters and self.lora_enabled


class ColumnParallelLinear(LoRALinear):
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

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: ``x`` was gathered from the sequence split (``gather_from_sequence``), whose
        backward sums the input gradients, so they are left partial here; the replicated LoRA A then sums its
        own gradient over the group instead (its weight passes ``copy_to_region``)."""
        g = self.tp_group
        y = F.linear(x if sequence_parallel else copy_to_region(x, g), self.weight, self.bias)
        if self.lora_active():
            if sequence_parallel:
                h = F.linear(self._lora_input(x, False), copy_to_region(self.lora_A, g))
            else:
                h = copy_to_region(F.linear(self._lora_input(x, False), self.lora_A), g)
            y = y + self.lora_scale * F.linear(h, self.lora_B)
        return gather_from_region(y, g) if self.gather_output else y


class RowParallelLinear(LoRALinear):
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

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: the output is reduce-scattered along the sequence; the bias, added to this
        rank's part of it, sums its gradient over the group (``replicated_weight``)."""
        g = self.tp_group
        y = F.linear(x, self.weight)
        delta = None
        if self.lora_active():
            h = reduce_from_region(F.linear(self._lora_input(x, group_size(g) > 1), self.lora_A), g)
            delta = self.lora_scale * F.linear(h, self.lora_B)
        if not self.reduce_output or sequence_parallel:
            y = y if delta is None else y + first_rank_only(delta, g)
            if not self.reduce_output:
                return y
            y = reduce_scatter_to_sequence(y, g)
            return y if self.bias is None else y + copy_to_region(self.bias, g)
        y = reduce_from_region(y, g)
        y = y if delta is None else y + delta
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

    def forward(self, ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The embeddings of ``ids``; with ``reduce=False`` this rank's partial sum (zeros for tokens outside
        its slice of the vocabulary), for a caller that reduces it (sequence parallelism reduce-scatters)."""
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_region(out, self.tp_group) if reduce else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied output head: this rank's slice of the vocabulary logits."""
        return F.linear(copy_to_region(hidden, self.tp_group), self.weight)
