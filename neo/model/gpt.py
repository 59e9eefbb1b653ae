"""The GPT-NeoX model as one flat list of layer specs, and its two forms.

``layer_specs`` lists embedding, N blocks, final norm and head. With pp = 1 ``GPT`` builds that
list as a plain ``nn.Module``; with pp > 1 ``pipeline_module`` turns the same specs into a DeepSpeed
``PipelineModule`` (DESIGN principle 2). Each layer is initialised from its own generator seeded
by (seed, layer index), so a pipeline stage that builds only some layers gets exactly the weights
the single-process model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from neo.model.args import ModelArgs
from neo.model.heads import Head, HeadOps, PipelineHead, PipelineScoreHead, ScoreHead, mean_loss
from neo.model.layers import (
    Block,
    Context,
    LearnedPositions,
    init_stds,
    make_norm,
    sequence_split,
    sinusoidal_table,
    split_region_dropout,
)
from neo.parallel import random as tp_random
from neo.parallel.cross_entropy import vocab_parallel_cross_entropy
from neo.parallel.layers import VocabParallelEmbedding
from neo.parallel.mappings import first_rank_only, gather_sequence, group_size, reduce_scatter_to_sequence


class Embedding(HeadOps, nn.Module):
    """Token (+ learned or sinusoidal position) embedding; also the tied output head.

    Under sequence parallelism the vocabulary-split partial sums are reduce-scattered along the sequence
    instead of all-reduced, the positions added once (on the first rank) before that sum."""

    def __init__(self, args: ModelArgs, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        std = init_stds(args)[0]
        self.word_embeddings = VocabParallelEmbedding(
            args.vocab_size, args.hidden_size, init_std=std, tp_group=tp_group
        )
        self.position_embeddings = None
        if args.position_embedding == "learned":
            self.position_embeddings = LearnedPositions(args.max_positions, args.hidden_size, std)
        elif args.position_embedding == "sinusoidal":
            self.register_buffer(
                "sinusoidal", sinusoidal_table(args.max_positions, args.hidden_size), persistent=False
            )
        self.kind, self.tp_group, self.loss_chunk_size = (
            args.position_embedding,
            tp_group,
            args.loss_chunk_size,
        )
        self.dropout = nn.Dropout(args.hidden_dropout)

    def forward(self, tokens: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        sp = sequence_split(self.sequence_parallel, ctx)
        x = self.word_embeddings(tokens, reduce=not sp)
        if self.kind in ("learned", "sinusoidal"):
            positions = (
                ctx.positions
                if ctx is not None and ctx.positions is not None
                else torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
            )
            pos = (
                self.position_embeddings(positions) if self.kind == "learned" else self.sinusoidal[positions]
            )
            x = x + (first_rank_only(pos.to(x.dtype), self.tp_group) if sp else pos.to(x.dtype))
        if sp:
            x = reduce_scatter_to_sequence(x, self.tp_group)
        return split_region_dropout(self.dropout, x, sp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings.logits(hidden)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.word_embeddings.weight

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.word_embeddings.reset_parameters(generator)
        if self.position_embeddings is not None:
            self.position_embeddings.reset_parameters(generator)


class FinalNorm(nn.Module):
    """The last norm; under sequence parallelism it gathers the whole sequence for the head (which every
    tensor-parallel rank computes over its slice of the vocabulary, and objectives read at any position)."""

    def __init__(self, args: ModelArgs, tp_group=None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        self.final_layer_norm = make_norm(args.norm, args.hidden_size, args.norm_eps, tp_group)

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        if not sequence_split(self.sequence_parallel, ctx):
            return self.final_layer_norm(x)
        return gather_sequence(self.final_layer_norm(x, True), self.tp_group)


def _tied_head(embedding: Embedding, x: torch.Tensor, labels=None, loss_fn=None) -> torch.Tensor:
    if labels is None:
        return embedding.logits(x)
    return (loss_fn or mean_loss)(embedding, x, labels)


def _pass_hidden(embedding: Embedding, x: torch.Tensor) -> torch.Tensor:
    """The tied head as the pipeline form's last layer (see ``PipelineHead``)."""
    return x


class PipelineLoss:
    """DeepSpeed's ``loss_fn`` for the pipeline form: the output head fused with the loss.

    DeepSpeed calls ``loss_fn(outputs, labels)`` on the last stage with what its last layer returned.
    That layer passes the hidden states through, and this applies the head's weight and the loss in
    one pass over chunks of tokens (``HeadOps.head_loss``), so the last stage never holds the [tokens, vocab]
    logits either. ``head`` (the ``PipelineHead``, or the embedding for a tied head) is bound once the
    last stage is built.
    """

    def __init__(self):
        self.head: Head | Embedding | None = None
        self.fn = mean_loss  # fn(head, hidden, labels) -> loss; see ``set_loss``

    def __call__(self, hidden: torch.Tensor, labels) -> torch.Tensor:
        return self.fn(self.head, hidden, labels)


@dataclass
class Spec:
    """One entry of the layer list: how to build it, and whether it shares weights with another."""

    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    tie_key: str | None = None  # layers with the same key share one module (embedding and tied head)
    forward_fn: Any = None  # for the tied head: call this instead of forward


def layer_specs(args: ModelArgs, tp_group=None, recompute: str = "none", sequence_parallel: bool = False
                ) -> list[Spec]:  # fmt: skip
    """embedding, blocks, final norm, head: the single description of the model. ``recompute`` is
    ``parallel.activation_checkpoint`` (the blocks do "selective" themselves; "full" is their caller's)."""
    if args.vocab_size is None:
        raise ValueError("ModelArgs.vocab_size must be set (the padded vocabulary of the tokenizer)")
    split = dict(args=args, tp_group=tp_group, sequence_parallel=sequence_parallel)
    emb = Spec(Embedding, split, tie_key="embed" if args.tie_embeddings else None)
    blocks = [Spec(Block, dict(split, layer_number=i, recompute=recompute)) for i in range(args.n_layers)]
    if args.head == "score":
        head = Spec(ScoreHead, dict(args=args, tp_group=tp_group))
    elif args.tie_embeddings:
        head = Spec(Embedding, split, tie_key="embed", forward_fn=_tied_head)
    else:
        head = Spec(Head, dict(args=args, tp_group=tp_group))
    return [emb, *blocks, Spec(FinalNorm, split), head]


def layer_seed(seed: int, index: int) -> int:
    """Seed of layer ``index``'s generator: independent of which stage or rank builds it."""
    return (seed * 1_000_003 + index * 7_919) % (2**63 - 1)


def init_layer(layer: nn.Module, seed: int, index: int) -> None:
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters(torch.Generator().manual_seed(layer_seed(seed, index)))


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Mean next-token loss over all positions (every sample has the same token count)."""
    return vocab_parallel_cross_entropy(logits, labels, tp_group).mean()


class GPT(nn.Module):
    """The plain (pp = 1) form: runs the layer list in order.

    ``forward(tokens)`` returns this rank's logits (vocabulary-split under TP);
    ``forward(tokens, labels)`` returns the mean loss, from the head and loss fused over chunks of
    tokens (``model.loss_chunk_size``), so the full logits are never held.
    ``sequence_parallel`` (tp > 1) splits the activations between the tensor-parallel layers along the
    sequence; a sequence whose length tp does not divide is padded at its end for the blocks (causal
    attention: no real position sees the padding) and cut back before the head.
    """

    def __init__(self, args: ModelArgs, *, tp_group=None, seed: int = 1234, recompute: str = "none",
                 every_n: int = 1, sequence_parallel: bool = False):  # fmt: skip
        super().__init__()
        self.args, self.tp_group = args, tp_group
        self.sequence_parallel = sequence_parallel and group_size(tp_group) > 1
        # activation recomputation: "full" keeps only the input of each segment of every_n blocks; "selective"
        # recomputes the attention core alone (Attention.recompute_core)
        self.checkpoint_interval = every_n if recompute == "full" else 0
        self.loss_fn = mean_loss  # fn(head, hidden, labels) -> loss; see ``set_loss``
        tied: dict[str, nn.Module] = {}
        layers = []
        for index, spec in enumerate(layer_specs(args, tp_group, recompute, sequence_parallel)):
            if spec.tie_key is not None and spec.tie_key in tied:
                layers.append(_TiedCall(tied[spec.tie_key], spec.forward_fn))
                continue
            layer = spec.cls(**spec.kwargs)
            init_layer(layer, seed, index)
            if spec.tie_key is not None:
                tied[spec.tie_key] = layer
            layers.append(layer)
        self.layers = nn.ModuleList(layers)

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, ctx: Context | None = None
    ) -> torch.Tensor:
        if isinstance(tokens, (tuple, list)):  # packed examples: (tokens, positions, segments)
            tokens, positions, segments = tokens
            ctx = Context(positions=positions, mask=segment_mask(segments))
        length = tokens.shape[1]
        if sequence_split(self.sequence_parallel, ctx) and length % group_size(self.tp_group):
            tokens, ctx = pad_sequence(tokens, ctx, group_size(self.tp_group))
        x = tokens
        *body, head = self.layers
        n = self.checkpoint_interval if self.training else 0
        i = 0
        while i < len(body):
            if n and isinstance(body[i], Block):  # a segment of up to n blocks, recomputed in backward
                segment = [layer for layer in body[i : i + n] if isinstance(layer, Block)]
                x = tp_random.checkpoint(_run_segment, segment, x, ctx)
                i += len(segment)
                continue
            x = body[i](x, ctx)
            i += 1
        if x.shape[1] != length:
            x = x[:, :length]
        return head(x, ctx, labels=labels, loss_fn=self.loss_fn)


def pad_sequence(
    tokens: torch.Tensor, ctx: Context | None, multiple: int
) -> tuple[torch.Tensor, Context | None]:
    """``tokens`` [b, s] padded at the end to a multiple of ``multiple`` positions, and the context with them:
    positions continue, and each padding query attends to itself alone (no real query sees it). Nothing
    before the padding changes, and the caller cuts the hidden states back to s."""
    b, s = tokens.shape
    pad = -s % multiple
    tokens = torch.cat((tokens, tokens.new_zeros(b, pad)), dim=1)
    if ctx is None or (ctx.positions is None and ctx.mask is None):
        return tokens, ctx
    positions = ctx.positions
    if positions is not None:
        positions = torch.cat(
            (positions, positions[:, -1:] + torch.arange(1, pad + 1, device=tokens.device)), 1
        )
    mask = ctx.mask
    if mask is not None:
        full = (
            torch.eye(s + pad, dtype=torch.bool, device=mask.device).expand(mask.shape[0], 1, -1, -1).clone()
        )
        full[..., :s, :s] = mask
        mask = full
    return tokens, Context(positions=positions, mask=mask)


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] attention mask for packed examples: causal, and only within a query's own example.

    ``segments`` [b, s] numbers the examples of each row (0, 1, ...; -1 on padding). A padding position
    attends to itself alone, so that no row of the mask is empty (an empty row gives NaN in some kernels)."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    eye = torch.eye(s, dtype=torch.bool, device=segments.device)
    return ((causal & same & (segments[:, None, :] >= 0)) | eye).unsqueeze(1)


def _run_segment(blocks: list, x: torch.Tensor, ctx: Context | None) -> torch.Tensor:
    for block in blocks:
        x = block(x, ctx)
    return x


class _TiedCall(nn.Module):
    """The tied head in the plain form: calls ``fn(module, x)`` on the shared embedding.

    The embedding is held outside ``_modules`` so its weight is registered (and counted) once.
    """

    def __init__(self, module: nn.Module, fn):
        super().__init__()
        self.__dict__["target"] = module
        self.fn = fn

    def forward(self, x: torch.Tensor, ctx: Context | None = None, labels=None, loss_fn=None) -> torch.Tensor:
        return self.fn(self.target, x, labels, loss_fn)


def set_loss(model: torch.nn.Module, fn) -> None:
    """Make ``fn(head, hidden, labels) -> loss`` the model's loss, in the plain or the pipeline form.

    ``head`` is the output head module (``Head``, or the tied ``Embedding``): it offers ``head_loss`` (the
    fused mean cross-entropy) and its weight; ``hidden`` are the final hidden states. In the plain form the
    call happens inside the head's forward, so ZeRO-3 has gathered the head's weight."""
    if isinstance(model, GPT):
        model.loss_fn = fn
    else:  # a PipelineModule: DeepSpeed calls its loss_fn on the last stage
        model.loss_fn.fn = fn


def parameter_names(args: ModelArgs) -> set[str]:
    """The plain model's parameter names for ``args``, from the model code itself (built on the meta device:
    no memory, no initialisation cost, even for 8B shapes)."""
    with torch.device("meta"):
        return {name for name, _ in GPT(args).named_parameters()}


def parameter_count(args: ModelArgs) -> dict[str, int]:
    """Parameters of the full (unsplit) model, by part, computed from the shape alone."""
    h, f, v, L = args.hidden_size, args.ffn_size, args.vocab_size, args.n_layers
    norm = 2 * h if args.norm == "layernorm" else h
    qkv = (args.n_heads + 2 * args.kv_heads) * args.head_dim
    attention = h * qkv + qkv * args.use_qkv_bias + args.n_heads * args.head_dim * h + h * args.bias
    up = (h * f + f * args.bias) * (2 if args.activation == "swiglu" else 1)
    block = 2 * norm + attention + up + f * h + h * args.bias
    embedding = v * h + (args.max_positions * h if args.position_embedding == "learned" else 0)
    head = 0 if args.tie_embeddings else v * h
    counts = {"embedding": embedding, "blocks": L * block, "final_norm": norm, "head": head}
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(args: ModelArgs, seq_length: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 12 L h s.

    The formula of the PaLM paper (Chowdhery et al. 2022, appendix B), used for MFU: N counts the
    matmul parameters (blocks and output head; the input embedding is a lookup, not a matmul), and
    12 L h s is the attention score and value matmuls over a context of s tokens.
    """
    counts = parameter_count(args)
    matmul_params = counts["blocks"] + (args.vocab_size * args.hidden_size)
    s = seq_length or args.seq_length
    return 6.0 * matmul_params + 12.0 * args.n_layers * args.hidden_size * s


class PipelineEmbedding(Embedding):
    """The embedding as the pipeline form's first layer. Packed examples arrive as (tokens, positions,
    segments); the positions and segments travel on with the hidden states to every block (DeepSpeed
    sends the integer tensors between stages without gradients)."""

    def forward(self, inputs, ctx: Context | None = None):
        if not isinstance(inputs, (tuple, list)):
            return super().forward(inputs, ctx)
        tokens, positions, segments = inputs
        return super().forward(tokens, Context(positions=positions)), positions, segments


class PipelineBlock(Block):
    """A block in the pipeline form: hidden states, or (hidden, positions, segments) for packed examples."""

    def forward(self, inputs, ctx: Context | None = None):
        if not isinstance(inputs, (tuple, list)):
            return super().forward(inputs, ctx)
        x, positions, segments = inputs
        return (
            super().forward(x, Context(positions=positions, mask=segment_mask(segments))),
            positions,
            segments,
        )


class PipelineFinalNorm(FinalNorm):
    """The final norm in the pipeline form: from here on only the hidden states travel."""

    def forward(self, inputs, ctx: Context | None = None) -> torch.Tensor:
        return super().forward(inputs[0] if isinstance(inputs, (tuple, list)) else inputs, ctx)


_PIPELINE_FORM = {Embedding: PipelineEmbedding, Block: PipelineBlock, FinalNorm: PipelineFinalNorm}


def pipeline_module(args: ModelArgs, topo, *, seed: int = 1234, partition_method: str = "parameters",
                    recompute: str = "none", every_n: int = 1, sequence_parallel: bool = False):  # fmt: skip
    """The pipeline (pp > 1) form: the same layer specs as DeepSpeed ``LayerSpec``s in a ``PipelineModule``.

    Each stage builds only its layers; each layer is initialised from its own (seed, index) generator,
    so the weights equal the plain model's. The tied head becomes a ``TiedLayerSpec`` that shares the
    embedding's weight across the first and last stages. The head layer passes the hidden states on and
    the loss applies it (``PipelineLoss``), as the plain form fuses head and loss.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    from neo import ds_compat

    *body, head = layer_specs(args, topo.tensor_group, recompute, sequence_parallel)
    if head.tie_key:
        head = replace(head, forward_fn=_pass_hidden)
    else:
        head = replace(head, cls={Head: PipelineHead, ScoreHead: PipelineScoreHead}[head.cls])
    specs = []
    for spec in (*body, head):
        spec = replace(spec, cls=_PIPELINE_FORM.get(spec.cls, spec.cls))
        if spec.tie_key is not None:
            specs.append(
                TiedLayerSpec(
                    spec.tie_key,
                    spec.cls,
                    forward_fn=spec.forward_fn,
                    tied_weight_attr=["word_embeddings.weight"],
                    **spec.kwargs,
                )
            )
        else:
            specs.append(LayerSpec(spec.cls, **spec.kwargs))
    loss = PipelineLoss()
    module = PipelineModule(
        layers=specs,
        topology=topo.deepspeed_topology(),
        loss_fn=loss,
        partition_method=partition_method,
        activation_checkpoint_interval=every_n if recompute == "full" else 0,
        activation_checkpoint_func=tp_random.checkpoint,
        checkpointable_layers=["PipelineBlock"],
    )
    loss.head = ds_compat.pipeline_last_layer(module, head.tie_key)
    for name, child in module.named_children():
        if name.isdigit():
            init_layer(child, seed, int(name))
    for child in module.tied_modules.values():
        init_layer(child, seed, 0)
    return module
