"""The GPT-NeoX building blocks: norms, rotary embedding, attention, MLP, transformer block.

Layers take plain arguments (sizes, eps, rotary fraction, a TP process group) and know nothing
about configs or launchers. Linear layers are the tensor-parallel ones from ``neo.parallel``;
with ``tp_group=None`` they are ordinary linears.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neo.model.args import ModelArgs
from neo.parallel import random as tp_random
from neo.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_slice_
from neo.parallel.mappings import group_size, reduce_from_region


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA-style alternative to LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class Rotary(nn.Module):
    """Rotary position embedding on the first ``dim`` channels of each head (GPT-NeoX rotate-half).

    cos/sin are computed in fp32 and cast to the activations' dtype, as GPT-NeoX and transformers do.
    """

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [..., seq, dim] for integer ``positions`` of shape [..., seq]."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float().to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first cos.shape[-1] channels of x [b, heads, seq, head_dim]."""
        d = cos.shape[-1]
        rot, rest = x[..., :d], x[..., d:]
        half = d // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    With ``max_length`` set, each layer's buffer [b, heads, max_length, head_dim] is allocated on its
    first update and later updates write in place, so a decoding step costs one position however
    long the prefix is (concatenation would copy the whole cache at every step). Without it the
    cache grows by concatenation, for callers that do not know the final length.
    """

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    max_length: int | None = None
    lengths: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Positions held (by layer 0; every layer holds the same number between forward passes)."""
        return self.lengths[0] if self.lengths else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [b, heads, s, head_dim] to ``layer``'s cache; return all keys and values so far."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
            self.lengths.append(0)
        n, s = self.lengths[layer], k.shape[2]
        if self.max_length is None:
            if self.keys[layer] is not None:
                k = torch.cat((self.keys[layer], k), dim=2)
                v = torch.cat((self.values[layer], v), dim=2)
            self.keys[layer], self.values[layer] = k, v
            self.lengths[layer] = n + s
            return k, v
        if n + s > self.max_length:
            raise ValueError(f"KV cache full: {n} + {s} positions > max_length {self.max_length}")
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, n : n + s] = k
        self.values[layer][:, :, n : n + s] = v
        self.lengths[layer] = n + s
        return self.keys[layer][:, :, : n + s], self.values[layer][:, :, : n + s]


@dataclass
class Context:
    """What a block needs beyond the hidden states when not training: positions, a mask, a KV cache.

    Training passes none of it (causal attention over positions 0..seq-1), which keeps the pipeline
    form's layers single-tensor in, single-tensor out.
    """

    positions: torch.Tensor | None = None  # [b, s] integer positions
    mask: torch.Tensor | None = None  # [b, 1, s, total] boolean, True = may attend
    cache: KVCache | None = None
    # Rotary cos/sin of these positions, computed by the first layer and shared by the others: in
    # one-token decoding steps the dozen small ops per layer are a visible part of the step's time.
    rotary: dict = field(default_factory=dict)


class Attention(nn.Module):
    """Causal self-attention; the fused qkv projection is column-parallel by whole heads.

    qkv rows are interleaved per head ([q_0; k_0; v_0; q_1; ...], GPT-NeoX's layout), so the
    contiguous row-slice a TP rank owns is a set of whole heads.
    """

    def __init__(
        self,
        args: ModelArgs,
        layer_number: int,
        tp_group=None,
        small_std: float = 0.02,
        out_std: float = 0.02,
    ):
        super().__init__()
        h, tp = args.hidden_size, group_size(tp_group)
        if args.n_heads % tp:
            raise ValueError(f"n_heads = {args.n_heads} is not divisible by the tensor-parallel size {tp}")
        self.layer_number = layer_number
        self.split_heads = tp > 1  # dropout on split heads draws from the per-TP-rank stream
        self.local_heads = args.n_heads // tp
        self.head_dim = args.head_dim
        self.dropout = args.attention_dropout
        self.query_key_value = ColumnParallelLinear(h, 3 * h, init_std=small_std, tp_group=tp_group)
        self.dense = RowParallelLinear(
            h, h, init_std=out_std, reduce_output=not args.parallel_residual, tp_group=tp_group
        )
        self.rotary = Rotary(args.rotary_dim, args.rotary_base) if args.rotary_dim else None

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, self.local_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        positions = ctx.positions if ctx is not None and ctx.positions is not None else None
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(s, device=x.device).unsqueeze(0)
            key = (self.rotary.dim, q.dtype)  # one model per Context: every layer has the same table
            if ctx is not None and key in ctx.rotary:
                cos, sin = ctx.rotary[key]
            else:
                cos, sin = self.rotary.cos_sin(positions, q.dtype)
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                if ctx is not None:
                    ctx.rotary[key] = cos, sin
            q, k = Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)
        mask = None
        if ctx is not None and ctx.cache is not None:
            k, v = ctx.cache.update(self.layer_number, k, v)
        if ctx is not None and ctx.mask is not None:
            mask = ctx.mask
        dropout = self.dropout if self.training else 0.0
        rng = tp_random.fork() if dropout and self.split_heads else contextlib.nullcontext()
        with rng:
            out = self._attend(q, k, v, mask, dropout)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))

    @staticmethod
    def _attend(q, k, v, mask, dropout: float) -> torch.Tensor:
        s = q.shape[2]
        if mask is None and k.shape[2] == s:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif mask is None and s == 1:  # one new query at the end of an unpadded cache: it sees every key
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:
            if mask is None:  # cached decoding without padding: the new queries sit at the end
                total = k.shape[2]
                mask = torch.ones(s, total, dtype=torch.bool, device=q.device).tril(total - s)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return out


class MLP(nn.Module):
    """Column-parallel up-projection, GeLU (exact erf) or SwiGLU, row-parallel down-projection."""

    def __init__(self, args: ModelArgs, tp_group=None, small_std: float = 0.02, out_std: float = 0.02):
        super().__init__()
        h, f = args.hidden_size, args.ffn_size
        self.swiglu = args.activation == "swiglu"
        self.dense_h_to_4h = ColumnParallelLinear(h, f, init_std=small_std, tp_group=tp_group)
        if self.swiglu:
            self.dense_gate = ColumnParallelLinear(h, f, init_std=small_std, tp_group=tp_group)
        self.dense_4h_to_h = RowParallelLinear(
            f, h, init_std=out_std, reduce_output=not args.parallel_residual, tp_group=tp_group
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.dense_h_to_4h(x)
        act = F.silu(self.dense_gate(x)) * up if self.swiglu else F.gelu(up)
        return self.dense_4h_to_h(act)


def init_stds(args: ModelArgs) -> tuple[float, float]:
    """(std for input-side weights, std for the two output projections) per ``args.init_method``."""
    if args.init_method == "small_init":
        return math.sqrt(2.0 / (5.0 * args.hidden_size)), 2.0 / args.n_layers / math.sqrt(args.hidden_size)
    return args.init_std, args.init_std / math.sqrt(2.0 * args.n_layers)


class Block(nn.Module):
    """One transformer layer: parallel residual x + attn(ln1 x) + mlp(ln2 x), or sequential.

    In the parallel form both row-parallel outputs are summed before a single all-reduce.
    """

    def __init__(self, args: ModelArgs, layer_number: int, tp_group=None):
        super().__init__()
        small, out = init_stds(args)
        self.tp_group = tp_group
        self.parallel_residual = args.parallel_residual
        self.input_layernorm = make_norm(args.norm, args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = make_norm(args.norm, args.hidden_size, args.norm_eps)
        self.attention = Attention(args, layer_number, tp_group, small, out)
        self.mlp = MLP(args, tp_group, small, out)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        if not self.parallel_residual:
            x = x + self.dropout(self.attention(self.input_layernorm(x), ctx))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        partial = self.attention(self.input_layernorm(x), ctx) + self.mlp(self.post_attention_layernorm(x))
        out = reduce_from_region(partial, self.tp_group)
        for bias in (self.attention.dense.bias, self.mlp.dense_4h_to_h.bias):
            if bias is not None:
                out = out + bias
        return x + self.dropout(out)

    def reset_parameters(self, generator: torch.Generator) -> None:
        for linear in (
            self.attention.query_key_value,
            self.attention.dense,
            self.mlp.dense_h_to_4h,
            getattr(self.mlp, "dense_gate", None),
            self.mlp.dense_4h_to_h,
        ):
            if linear is not None:
                linear.reset_parameters(generator)


class LearnedPositions(nn.Module):
    """A learned absolute position table (GPT-2 style), replicated across TP ranks."""

    def __init__(self, max_positions: int, dim: int, init_std: float):
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(max_positions, dim))

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_slice_(self.weight, self.init_std, generator, None)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.weight)


def sinusoidal_table(max_positions: int, dim: int) -> torch.Tensor:
    """The fixed sin/cos table of 'Attention is all you need' (fp32)."""
    pos = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1)
    inv = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table
