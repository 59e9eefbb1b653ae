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

from neo.model.args import ModelArgs, RopeScaling
from neo.model.attention_core import attend
from neo.parallel import random as tp_random
from neo.parallel.layers import ColumnParallelLinear, RowParallelLinear, init_slice_
from neo.parallel.mappings import (
    copy_to_region,
    gather_from_sequence,
    group_size,
    reduce_from_region,
    reduce_scatter_to_sequence,
    saved_as_sequence_part,
)


def sequence_split(enabled: bool, ctx: Context | None) -> bool:
    """Whether this call runs sequence-parallel: ``enabled`` for the model, and not decoding from a KV cache
    (a decoding step's one new position cannot be split). Every layer of one forward pass decides alike."""
    return enabled and (ctx is None or ctx.cache is None)


def sequence_gather(layer: nn.Module, x: torch.Tensor, sequence_parallel: bool):
    """The whole sequence for a layer's column-parallel linears (``x`` itself without sequence parallelism), and
    the context to run them in: one that keeps their saved input as this rank's part (``saved_as_sequence_part``),
    unless the block is recomputed whole (``layer.keep_part`` false), where what it saves is dropped anyway."""
    if not sequence_parallel:
        return x, contextlib.nullcontext()
    full = gather_from_sequence(x, layer.tp_group)
    keep = saved_as_sequence_part(full, x, layer.tp_group) if layer.keep_part else contextlib.nullcontext()
    return full, keep


def split_region_dropout(dropout: nn.Dropout, x: torch.Tensor, split: bool) -> torch.Tensor:
    """Dropout on activations that are split along the sequence draws a mask per rank (the tensor-parallel
    stream, like dropout on split heads); on replicated ones, the same mask everywhere (the default stream)."""
    if not (split and dropout.p and dropout.training):
        return dropout(x)
    with tp_random.fork():
        return dropout(x)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (LLaMA-style alternative to LayerNorm)."""

    def __init__(self, dim: int, eps: float = 1e-5, tp_group=None):
        super().__init__()
        self.eps, self.tp_group = eps, tp_group
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: ``x`` is this rank's part of the sequence, so the weight's gradient is a partial
        sum that the group adds up (``copy_to_region``); every rank then holds the same replicated weight."""
        weight = copy_to_region(self.weight, self.tp_group) if sequence_parallel else self.weight
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * weight


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm, whose weight and bias sum their gradients over the tensor-parallel group under
    sequence parallelism (see ``RMSNorm.forward``)."""

    def __init__(self, dim: int, eps: float = 1e-5, tp_group=None):
        super().__init__(dim, eps=eps)
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        if not sequence_parallel:
            return super().forward(x)
        weight, bias = (copy_to_region(p, self.tp_group) for p in (self.weight, self.bias))
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def make_norm(kind: str, dim: int, eps: float, tp_group=None) -> nn.Module:
    return RMSNorm(dim, eps, tp_group) if kind == "rmsnorm" else LayerNorm(dim, eps, tp_group)


class Rotary(nn.Module):
    """Rotary position embedding on the first ``dim`` channels of each head (GPT-NeoX rotate-half).

    cos/sin are computed in fp32 and cast to the activations' dtype, as GPT-NeoX and transformers do.
    ``scaling`` (``RopeScaling``) stretches the frequencies for long contexts; the inverse frequencies
    are computed with transformers' operations in transformers' order, so that they are bit-identical
    (a one-ulp difference in a frequency shows up at 1e-7 in the logits).
    """

    def __init__(self, dim: int, base: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.dim = dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if scaling is not None and scaling.type == "linear":
            inv_freq = inv_freq / scaling.factor
        elif scaling is not None and scaling.type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
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


def llama3_inv_freq(inv_freq: torch.Tensor, sc: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequency scaling: wavelengths longer than ``original / low_freq_factor`` slow down by
    ``factor``, shorter than ``original / high_freq_factor`` stay, and those between are interpolated."""
    low_wavelen = sc.original_max_positions / sc.low_freq_factor
    high_wavelen = sc.original_max_positions / sc.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_positions / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding.

    It holds the model's key/value heads only (``n_kv_heads``), so grouped-query attention shrinks it by
    ``n_heads / n_kv_heads``. With ``max_length`` set, each layer's buffer [b, kv_heads, max_length,
    head_dim] is allocated on its first update and later updates write in place, so a decoding step costs
    one position however long the prefix is (concatenation would copy the whole cache at every step).
    Without it the cache grows by concatenation, for callers that do not know the final length.

    A layer with a sliding window of W positions (``update(..., window=W)``) keeps a ring of W positions
    instead, position p in slot p % W: what the next query can still see. Its keys then come back in
    slot order with their positions (``update``'s third value), which the attention mask uses.
    """

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    max_length: int | None = None
    lengths: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Positions seen (by layer 0; every layer has seen the same number between forward passes)."""
        return self.lengths[0] if self.lengths else 0

    def nbytes(self) -> int:
        """Bytes the cache holds, all layers."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Append k, v [b, kv_heads, s, head_dim] to ``layer``'s cache; return the keys and values to attend
        to, and their positions (None: positions 0, 1, ... in order, the whole history)."""
        while len(self.keys) <= layer:
            self.keys.append(None)
            self.values.append(None)
            self.lengths.append(0)
        n, s = self.lengths[layer], k.shape[2]
        if self.max_length is not None and n + s > self.max_length:
            raise ValueError(f"KV cache full: {n} + {s} positions > max_length {self.max_length}")
        self.lengths[layer] = n + s
        if window is not None and (self.max_length is None or self.max_length > window):
            return self._ring(layer, n, k, v, window)
        if self.max_length is None:
            if self.keys[layer] is not None:
                k = torch.cat((self.keys[layer], k), dim=2)
                v = torch.cat((self.values[layer], v), dim=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v, None
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_length, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        self.keys[layer][:, :, n : n + s] = k
        self.values[layer][:, :, n : n + s] = v
        return self.keys[layer][:, :, : n + s], self.values[layer][:, :, : n + s], None

    def _ring(self, layer: int, n: int, k: torch.Tensor, v: torch.Tensor, window: int):
        """The sliding-window form of ``update``: positions n .. n+s-1 arrive, the last ``window`` stay."""
        s, device = k.shape[2], k.device
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], window, k.shape[3])
            self.keys[layer], self.values[layer] = k.new_empty(shape), v.new_empty(shape)
        ring_k, ring_v = self.keys[layer], self.values[layer]
        if s == 1:  # a decoding step: every position in the ring is within the new query's window
            ring_k[:, :, n % window], ring_v[:, :, n % window] = k[:, :, 0], v[:, :, 0]
            if n < window:
                return ring_k[:, :, : n + 1], ring_v[:, :, : n + 1], None
            slots = torch.arange(window, device=device)
            return ring_k, ring_v, slots + window * ((n - slots) // window)
        kept = min(n, window)  # several positions at once (the prompt): attend to the ring, in order, + them
        positions = torch.arange(n - kept, n + s, device=device)
        old = positions[:kept] % window
        keys, values = torch.cat((ring_k[:, :, old], k), dim=2), torch.cat((ring_v[:, :, old], v), dim=2)
        slots, m = positions[-min(s, window) :] % window, min(s, window)
        ring_k[:, :, slots], ring_v[:, :, slots] = k[:, :, s - m :], v[:, :, s - m :]
        return keys, values, (positions if kept else None)


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
    """Causal self-attention with grouped-query heads; the fused qkv projection is column-parallel by groups.

    Layout of the fused qkv rows, one group per key/value head g (r = n_heads / n_kv_heads query heads
    share it), each block head_dim rows::

        [q_0 .. q_{r-1}, k_0, v_0,  q_r .. q_{2r-1}, k_1, v_1,  ...]

    With n_kv_heads = n_heads (r = 1) this is GPT-NeoX's per-head interleaving [q_0; k_0; v_0; q_1; ...],
    so GPT-NeoX checkpoints map by renaming; it is also Megatron-LM's GQA layout. transformers' separate
    q_proj / k_proj / v_proj of the Llama family are a reshape of it (``neo.export.llama``). A TP rank's
    contiguous slice of rows holds whole groups when n_kv_heads % tp == 0: its query heads together with
    the key/value heads they read, so attention needs no communication and tp = N weights are exact
    slices of tp = 1. Other tp are refused rather than replicating key/value heads: replicas would need
    their gradients summed across ranks (a collective outside the conjugate pairs of
    ``neo.parallel.mappings``) and their checkpoint shards would no longer be slices of one tensor.
    """

    def __init__(
        self,
        args: ModelArgs,
        layer_number: int,
        tp_group=None,
        small_std: float = 0.02,
        out_std: float = 0.02,
        recompute: str = "none",
    ):
        super().__init__()
        h, tp, kv = args.hidden_size, group_size(tp_group), args.kv_heads
        self.tp_group = tp_group
        # selective recomputation (Korthikanti et al. 2022): the attention core's activations (the s x s
        # scores, softmax, dropout mask) are recomputed in backward; the linears' outputs are kept
        self.recompute_core = recompute == "selective"
        self.keep_part = recompute != "full"  # see sequence_gather
        if args.n_heads % kv:
            raise ValueError(f"n_heads = {args.n_heads} is not divisible by n_kv_heads = {kv}")
        if kv % tp:
            raise ValueError(
                f"n_kv_heads = {kv} is not divisible by the tensor-parallel size {tp} (kv heads are split "
                "across tensor-parallel ranks, never replicated)"
            )
        self.layer_number = layer_number
        self.split_heads = tp > 1  # dropout on split heads draws from the per-TP-rank stream
        self.group = args.n_heads // kv  # query heads per key/value head
        self.local_groups = kv // tp
        self.local_heads = self.local_groups * self.group
        self.head_dim = args.head_dim
        self.dropout = args.attention_dropout
        self.window = args.sliding_window
        width = (args.n_heads + 2 * kv) * args.head_dim
        self.query_key_value = ColumnParallelLinear(
            h, width, bias=args.use_qkv_bias, init_std=small_std, tp_group=tp_group
        )
        self.dense = RowParallelLinear(
            args.n_heads * args.head_dim,
            h,
            bias=args.bias,
            init_std=out_std,
            reduce_output=not args.parallel_residual,
            tp_group=tp_group,
        )
        self.rotary = (
            Rotary(args.rotary_dim, args.rotary_base, args.rope_scaling) if args.rotary_dim else None
        )

    def forward(
        self, x: torch.Tensor, ctx: Context | None = None, sequence_parallel: bool = False
    ) -> torch.Tensor:
        """``sequence_parallel``: ``x`` is this rank's part of the sequence, and so is the output."""
        x, kept = sequence_gather(self, x, sequence_parallel)
        b, s, _ = x.shape
        d = self.head_dim
        with kept:
            qkv = self.query_key_value(x, sequence_parallel)
        qkv = qkv.view(b, s, self.local_groups, (self.group + 2) * d)
        if self.group == 1:
            q, k, v = qkv.transpose(1, 2).split(d, dim=-1)
        else:
            q, k, v = qkv.split([self.group * d, d, d], dim=-1)
            q = q.reshape(b, s, self.local_heads, d).transpose(1, 2)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        if self.rotary is not None:
            q, k = self._rotate(q, k, ctx)
        columns = None
        if ctx is not None and ctx.cache is not None:
            k, v, columns = ctx.cache.update(self.layer_number, k, v, self.window)
        mask = self._mask(ctx, s, k.shape[2], columns, x.device)
        dropout = self.dropout if self.training else 0.0

        def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            rng = tp_random.fork() if dropout and self.split_heads else contextlib.nullcontext()
            with rng:
                return self._attend(q, k, v, mask, dropout, self.group > 1)

        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = tp_random.checkpoint(
                core, q, k, v
            )  # selective recomputation: softmax(QK^T) V again in backward
        else:
            out = core(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * d), sequence_parallel)

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, ctx: Context | None):
        positions = ctx.positions if ctx is not None and ctx.positions is not None else None
        if positions is None:
            positions = torch.arange(q.shape[2], device=q.device).unsqueeze(0)
        key = (self.rotary.dim, q.dtype)  # one model per Context: every layer has the same table
        if ctx is not None and key in ctx.rotary:
            cos, sin = ctx.rotary[key]
        else:
            cos, sin = self.rotary.cos_sin(positions, q.dtype)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            if ctx is not None:
                ctx.rotary[key] = cos, sin
        return Rotary.rotate(q, cos, sin), Rotary.rotate(k, cos, sin)

    def _mask(self, ctx: Context | None, s: int, t: int, columns, device) -> torch.Tensor | None:
        """The attention mask of s queries (the last s positions) over t keys at ``columns`` (None: 0..t-1).

        None leaves plain causal attention to ``_attend``'s fast paths. The caller's mask (padding, over
        every position so far) is narrowed to the keys the cache returned; a sliding window that some
        query-key distance reaches (t > window) adds distance < window.
        """
        mask = ctx.mask if ctx is not None else None
        if mask is not None and columns is not None:
            mask = mask[..., columns]
        if self.window is None or t <= self.window:
            return mask
        cols = columns if columns is not None else torch.arange(t, device=device)
        distance = cols[-s:, None] - cols[None, :]  # the queries are the last s keys
        window = (distance >= 0) & (distance < self.window)
        return window if mask is None else mask & window

    _attend = staticmethod(attend)  # the core (neo.model.attention_core), a class attribute for tests to wrap


class MLP(nn.Module):
    """Column-parallel up-projection, GeLU (exact erf) or SwiGLU, row-parallel down-projection."""

    def __init__(self, args: ModelArgs, tp_group=None, small_std: float = 0.02, out_std: float = 0.02,
                 recompute: str = "none"):  # fmt: skip
        super().__init__()
        h, f = args.hidden_size, args.ffn_size
        self.tp_group, self.swiglu, self.keep_part = (
            tp_group,
            args.activation == "swiglu",
            recompute != "full",
        )
        bias = args.bias
        self.dense_h_to_4h = ColumnParallelLinear(h, f, bias=bias, init_std=small_std, tp_group=tp_group)
        if self.swiglu:
            self.dense_gate = ColumnParallelLinear(h, f, bias=bias, init_std=small_std, tp_group=tp_group)
        self.dense_4h_to_h = RowParallelLinear(
            f, h, bias=bias, init_std=out_std, reduce_output=not args.parallel_residual, tp_group=tp_group
        )

    def forward(self, x: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
        """``sequence_parallel``: ``x`` is this rank's part of the sequence (gathered once for both
        up-projections), and so is the output."""
        sp = sequence_parallel
        x, kept = sequence_gather(self, x, sp)
        with kept:
            up = self.dense_h_to_4h(x, sp)
            gate = self.dense_gate(x, sp) if self.swiglu else None
        act = F.silu(gate) * up if self.swiglu else F.gelu(up)
        return self.dense_4h_to_h(act, sp)


def init_stds(args: ModelArgs) -> tuple[float, float]:
    """(std for input-side weights, std for the two output projections) per ``args.init_method``."""
    if args.init_method == "small_init":
        return math.sqrt(2.0 / (5.0 * args.hidden_size)), 2.0 / args.n_layers / math.sqrt(args.hidden_size)
    return args.init_std, args.init_std / math.sqrt(2.0 * args.n_layers)


class Block(nn.Module):
    """One transformer layer: parallel residual x + attn(ln1 x) + mlp(ln2 x), or sequential.

    In the parallel form both row-parallel outputs are summed before a single all-reduce (a reduce-scatter
    under sequence parallelism, where the block's input and output are this rank's part of the sequence).
    """

    def __init__(self, args: ModelArgs, layer_number: int, tp_group=None, recompute: str = "none",
                 sequence_parallel: bool = False):  # fmt: skip
        super().__init__()
        small, out = init_stds(args)
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.parallel_residual = args.parallel_residual
        self.input_layernorm = make_norm(args.norm, args.hidden_size, args.norm_eps, tp_group)
        self.post_attention_layernorm = make_norm(args.norm, args.hidden_size, args.norm_eps, tp_group)
        self.attention = Attention(args, layer_number, tp_group, small, out, recompute)
        self.mlp = MLP(args, tp_group, small, out, recompute)
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        sp = sequence_split(self.sequence_parallel, ctx)
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        if not self.parallel_residual:
            x = x + split_region_dropout(self.dropout, self.attention(ln1(x, sp), ctx, sp), sp)
            return x + split_region_dropout(self.dropout, self.mlp(ln2(x, sp), sp), sp)
        partial = self.attention(ln1(x, sp), ctx, sp) + self.mlp(ln2(x, sp), sp)
        out = (
            reduce_scatter_to_sequence(partial, self.tp_group)
            if sp
            else reduce_from_region(partial, self.tp_group)
        )
        for bias in (self.attention.dense.bias, self.mlp.dense_4h_to_h.bias):
            if bias is not None:  # added to this rank's part of the sequence: the group sums its gradient
                out = out + (copy_to_region(bias, self.tp_group) if sp else bias)
        return x + split_region_dropout(self.dropout, out, sp)

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
