"""Pretraining: next-token prediction over packed token samples (``objective.type: pretrain``, the default).

Every sample has the same number of tokens, so the mean loss of each micro-batch, averaged over the
micro-batches and data-parallel ranks as DeepSpeed does, is the mean over the global batch: no reweighting.
"""

from __future__ import annotations

import numpy as np
import torch

from neo.objectives.base import MicroBatch, Objective


class Pretrain(Objective):
    name = "pretrain"

    def build_datasets(self, cfg, tokenizer, num_samples: dict[str, int]) -> dict:
        from neo.data.dataset import build_datasets

        d = cfg.data
        return build_datasets(train_paths=d.train_paths, train_weights=d.train_weights, valid_paths=d.valid_paths,
                              test_paths=d.test_paths, split=d.split, seq_length=cfg.model.seq_length, seed=cfg.seed,
                              num_samples=num_samples, cache_dir=d.cache_dir, tokenizer=tokenizer.name)  # fmt: skip

    def collate(self, samples: list) -> MicroBatch:
        """Samples of seq_length + 1 tokens: the model reads the first seq_length, predicts the last."""
        batch = torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
        return MicroBatch(inputs=batch[:, :-1], labels=batch[:, 1:])

    def loss(self, head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, the head fused with the loss (no [tokens, vocab] logits held)."""
        return head.head_loss(hidden, labels)
