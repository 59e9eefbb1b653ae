"""Supervised fine-tuning on chat data (``objective.type: sft``): next-token loss on the answer tokens only.

A sample is one conversation (or, with ``data.packing``, several whole ones sharing a sequence) with a loss
mask: 1 on the tokens an assistant turn produces, its end of turn included. The loss is the cross-entropy
averaged over the loss tokens of the whole global batch: ``start_step`` counts them over every
micro-batch and data-parallel rank of the step, and each token's weight is ``grad_accum x dp / count``, so
that DeepSpeed's mean over micro-batches and ranks is that average however unevenly they hold answer
tokens (a mean of micro-batch means would weigh a token of a short answer more).
"""

from __future__ import annotations

import numpy as np
import torch

from neo.objectives.base import MicroBatch, Objective


def positions_of(segments: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 where each packed example (segment) starts; padding (-1) keeps counting."""
    b, s = segments.shape
    index = torch.arange(s, device=segments.device).expand(b, s)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


class SFT(Objective):
    name = "sft"
    metric_sums = ("nll_sum", "loss_tokens")

    @property
    def packing(self) -> bool:
        return bool(self.cfg is None or self.cfg.data.packing)

    def build_datasets(self, cfg, tokenizer, num_samples: dict[str, int]) -> dict:
        from neo.data.examples import build_example_datasets
        from neo.data.indexed import IndexedTokens

        d = cfg.data
        self.chat_template = IndexedTokens(d.train_paths[0]).chat_template if d.train_paths else None
        return build_example_datasets(kind="chat", train_paths=d.train_paths, train_weights=d.train_weights,
                                      valid_paths=d.valid_paths, test_paths=d.test_paths, split=d.split,
                                      seq_length=cfg.model.seq_length, seed=cfg.seed, num_samples=num_samples,
                                      cache_dir=d.cache_dir, tokenizer=tokenizer.name, packing=d.packing,
                                      pad_id=tokenizer.eod_id)  # fmt: skip

    def checkpoint_meta(self) -> dict:
        """The chat template the data was rendered with: ``generate --chat`` renders prompts the same way."""
        template = getattr(self, "chat_template", None)
        return {"chat_template": template} if template else {}

    def collate(self, samples: list) -> MicroBatch:
        """Items {tokens, loss_mask, segments} of seq_length + 1 -> inputs (tokens, positions, segments) of
        seq_length and labels (next tokens, loss mask of the next tokens)."""
        tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
        mask = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]).astype(np.float32))
        segments = torch.from_numpy(np.stack([s["segments"] for s in samples]).astype(np.int64))
        # a label counts only inside its own example: never the first token of the next packed one
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] >= 0)
        labels = (tokens[:, 1:], mask[:, 1:] * same)
        if not self.packing:  # one example per row, padding after it: causal attention never reaches it
            return MicroBatch(inputs=tokens[:, :-1], labels=labels)
        return MicroBatch(
            inputs=(tokens[:, :-1], positions_of(segments[:, :-1]), segments[:, :-1]), labels=labels
        )

    def start_step(self, micro_batches: list[MicroBatch], dp_sum) -> list[MicroBatch]:
        """Weight every loss token by grad_accum x dp / (loss tokens in the global batch)."""
        local = sum(float(m.labels[1].sum()) for m in micro_batches)
        total, dp = dp_sum(torch.tensor([local, 1.0], dtype=torch.float64)).tolist()
        scale = len(micro_batches) * dp / max(total, 1.0)
        return [MicroBatch(m.inputs, (m.labels[0], m.labels[1] * scale)) for m in micro_batches]

    def loss(self, head, hidden: torch.Tensor, labels) -> torch.Tensor:
        targets, weights = labels
        loss = head.head_loss(hidden, targets, weights.to(torch.float32))
        scale = weights.max()
        tokens = (weights > 0).sum()
        self.record(nll_sum=loss.detach() / scale if tokens > 0 else loss.detach() * 0, loss_tokens=tokens)
        return loss

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        return {"loss_tokens": sums["loss_tokens"]}

    def summarize_validation(self, loss: float, sums: dict[str, float]) -> dict[str, float]:
        """The answer-token loss over every validation token (not a mean of batch means) and its perplexity."""
        import math

        token_loss = sums["nll_sum"] / max(sums["loss_tokens"], 1.0)
        return {
            "loss": token_loss,
            "ppl": math.exp(min(token_loss, 50.0)),
            "loss_tokens": sums["loss_tokens"],
        }
