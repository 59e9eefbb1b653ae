"""Reward models (``objective.type: reward``): a scalar score per answer, trained on ranked comparisons.

The model's output head is a score head (``model.head: score``, a [hidden -> 1] linear, replicated under TP)
read at the last answer token (the end of turn included), like transformers' GPTNeoXForSequenceClassification,
to which a reward checkpoint exports. The loss is Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin),
plus ``objective.centering`` x (r_chosen + r_rejected)^2 (neo/objectives/preference_losses.py), averaged over
the comparisons of the global batch. Validation reports pairwise accuracy and the mean margin.
"""

from __future__ import annotations

import torch

from neo.objectives.base import MicroBatch
from neo.objectives.preference import PreferenceBatches
from neo.objectives.preference_losses import bradley_terry


def last_answer_token(masks: torch.Tensor) -> torch.Tensor:
    """Index of each row's last loss-mask token (0 for a padding row with none)."""
    index = torch.arange(masks.shape[1], device=masks.device).expand_as(masks)
    return torch.where(masks > 0, index, torch.zeros_like(index)).amax(dim=1)


class Reward(PreferenceBatches):
    name = "reward"
    model_overrides = {"head": "score"}

    def collate(self, samples: list) -> MicroBatch:
        """Inputs: each answer's sequence (seq_length tokens); labels: where to read its score, the comparisons
        (chosen row, rejected row) and their weights."""
        width = (
            self.cfg.model.seq_length if self.cfg else max(len(s) for g in samples for s in g["sequences"])
        )
        g = self.group_tensors(samples, width)
        last = last_answer_token(g["masks"])
        return MicroBatch(inputs=g["tokens"], labels=(last, g["pairs"][:, 0], g["pairs"][:, 1], g["weights"]))

    def loss(self, head, hidden: torch.Tensor, labels) -> torch.Tensor:
        last, chosen, rejected, weights = labels
        scores = head.score(hidden).gather(1, last.unsqueeze(1)).squeeze(1)
        o = self.cfg.objective if self.cfg else None
        margin = torch.full_like(scores[chosen], o.margin) if o and o.margin else None
        per_pair = bradley_terry(scores[chosen], scores[rejected], margin, o.centering if o else 0.0)
        self.record_pairs(per_pair.detach(), scores[chosen].detach(), scores[rejected].detach(), weights)
        return (per_pair * weights.to(per_pair.dtype)).sum()
