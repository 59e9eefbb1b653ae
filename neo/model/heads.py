"""Output heads: what the last layer computes from the final hidden states.

- ``Head``: the language-model head, column-parallel over the vocabulary, with an optional scalar value head
  beside it (``model.value_head``: PPO's critic shares the policy's trunk);
- ``ScoreHead``: one scalar per position (``model.head: score``: reward models), read by the objective at the
  last answer token, like transformers' ``*ForSequenceClassification``.

Called with ``labels`` a head returns the objective's loss (``loss_fn(head, hidden, labels)``), computed
inside the head's own forward so that ZeRO-3 has gathered its weights. ``HeadOps`` is what an objective may
ask of an LM head (the tied ``Embedding`` offers it too).
"""

from __future__ import annotations

import torch
from torch import nn

from neo.model.args import ModelArgs
from neo.model.layers import Context, init_stds
from neo.parallel.cross_entropy import fused_head_cross_entropy, token_logprobs, vocab_parallel_cross_entropy
from neo.parallel.layers import ColumnParallelLinear
from neo.parallel.mappings import copy_to_region


class HeadOps:
    """What an output head offers an objective's loss (``Head``, and the ``Embedding`` as a tied head): the
    head's weight [vocab / tp, h], the fused head + cross-entropy, and per-token log-probabilities. Each
    runs over chunks of ``model.loss_chunk_size`` tokens, so no [tokens, vocab] logits are held."""

    tp_group = None
    loss_chunk_size = 1024
    head_weight: torch.Tensor

    def head_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy, or with ``weights`` [..] the weighted sum of per-token losses."""
        x, w, chunk = copy_to_region(hidden, self.tp_group), self.head_weight, self.loss_chunk_size
        if chunk == 0:  # unfused: all logits, then the loss
            losses = vocab_parallel_cross_entropy(torch.nn.functional.linear(x, w), labels, self.tp_group)
            return losses.mean() if weights is None else (losses * weights).sum()
        return fused_head_cross_entropy(x, w, labels, self.tp_group, chunk, token_weights=weights)

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, entropy: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(log p(label), entropy) per token; the log-probabilities carry gradients (DPO, PPO, GRPO); the
        entropy is computed only when asked."""
        x = copy_to_region(hidden, self.tp_group)
        return token_logprobs(x, self.head_weight, labels, self.tp_group, self.loss_chunk_size, entropy)


def mean_loss(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The default loss: mean next-token cross-entropy of ``head`` (pretraining's)."""
    return head.head_loss(hidden, labels)


class ScalarLinear(nn.Linear):
    """A [hidden -> 1] projection, replicated on every tensor-parallel rank (the hidden states reaching the
    head are the same on all of them). Its weights are new when a model gains it: loading a checkpoint
    without them keeps their initialisation (``neo_fresh``)."""

    def __init__(self, hidden: int, bias: bool, std: float):
        super().__init__(hidden, 1, bias=bias)
        self.std = std
        for p in self.parameters():
            p.neo_fresh = True

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not hasattr(self, "std"):  # nn.Linear.__init__ calls this before std is set
            return
        with torch.no_grad():
            self.weight.normal_(0.0, self.std, generator=generator)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1)


class Head(HeadOps, nn.Module):
    """Untied output projection, column-parallel over the vocabulary (logits stay split).

    Called with ``labels`` it returns the loss instead of the logits (``HeadOps``); the loss is
    computed inside this module's call so that ZeRO-3 has gathered the weight.
    """

    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        self.embed_out = ColumnParallelLinear(
            args.hidden_size, args.vocab_size, bias=False, init_std=init_stds(args)[0], tp_group=tp_group
        )
        self.tp_group, self.loss_chunk_size = tp_group, args.loss_chunk_size
        self.value_head = ScalarLinear(args.hidden_size, True, args.init_std) if args.value_head else None

    def forward(self, x: torch.Tensor, ctx: Context | None = None, labels=None, loss_fn=None) -> torch.Tensor:
        if labels is None:
            return self.embed_out(x)
        return (loss_fn or mean_loss)(self, x, labels)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_out.weight

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """The critic's value per position [..] (``model.value_head``)."""
        return self.value_head(hidden)

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.embed_out.reset_parameters(generator)
        if self.value_head is not None:
            self.value_head.reset_parameters(generator)


class ScoreHead(nn.Module):
    """A reward model's head: one scalar per position (``model.head: score``), no vocabulary projection."""

    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        self.score_head = ScalarLinear(args.hidden_size, False, args.init_std)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score_head(hidden)

    def forward(self, x: torch.Tensor, ctx: Context | None = None, labels=None, loss_fn=None) -> torch.Tensor:
        if labels is None:
            return self.score(x)
        return loss_fn(self, x, labels)

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.score_head.reset_parameters(generator)


class PipelineHead(Head):
    """The untied head as the pipeline form's last layer: it passes the hidden states on, and the
    pipeline's loss (``PipelineLoss``) applies its weight fused with the loss."""

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        return x


class PipelineScoreHead(ScoreHead):
    """The score head as the pipeline form's last layer (the loss reads the scores)."""

    def forward(self, x: torch.Tensor, ctx: Context | None = None) -> torch.Tensor:
        return x
