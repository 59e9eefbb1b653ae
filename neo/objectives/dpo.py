"""Direct preference optimization (``objective.type: dpo``): the policy learns from comparisons directly.

Per comparison, with the answers' log-probability sums under the policy (pi) and a frozen reference (ref),
h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected), and the loss is one of (``objective.dpo_variant``,
formulas in neo/objectives/preference_losses.py): ``sigmoid`` -log sigmoid(beta h), with ``label_smoothing``
(conservative DPO); ``ipo`` (h - 1/(2 beta))^2 on per-token mean log-probabilities (as TRL does, the IPO
authors' normalization). The rewards beta (pi - ref), their margin and the ordering accuracy are reported.

The reference log-probabilities are computed in the same step, before the policy's forward (``start_step``),
by the trainer's reference model: with LoRA, the policy itself with its adapters switched off (no second
copy of the weights); otherwise a frozen copy of the initial policy (a resumed run rebuilds it from the
checkpoint it began with, which its checkpoints record). Pipeline parallelism is refused (the
reference would have to run through the stages too); TP and ZeRO work.
"""

from __future__ import annotations

import torch

from neo.objectives.base import MicroBatch
from neo.objectives.preference import PreferenceBatches
from neo.objectives.preference_losses import dpo


def sequence_logps(
    head, hidden: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor, mean: bool
) -> torch.Tensor:
    """Each row's answer log-probability: the sum (or, with ``mean``, the mean) over its loss-mask tokens."""
    logp, _ = head.token_logprobs(hidden, targets)
    total = (logp * masks).sum(-1)
    return total / masks.sum(-1).clamp_min(1.0) if mean else total


class DPO(PreferenceBatches):
    name = "dpo"
    needs_reference = True
    metric_sums = (*PreferenceBatches.metric_sums, "logp_chosen_sum", "logp_rejected_sum")

    @property
    def mean_logps(self) -> bool:
        return bool(self.cfg and self.cfg.objective.dpo_variant == "ipo")

    def collate(self, samples: list) -> MicroBatch:
        width = (
            self.cfg.model.seq_length
            if self.cfg
            else max(len(s) for g in samples for s in g["sequences"]) - 1
        ) + 1
        g = self.group_tensors(samples, width)
        labels = (g["tokens"][:, 1:], g["masks"][:, 1:], g["pairs"][:, 0], g["pairs"][:, 1], g["weights"])
        return MicroBatch(inputs=g["tokens"][:, :-1], labels=labels)

    def start_step(self, micro_batches: list[MicroBatch], dp_sum) -> list[MicroBatch]:
        """The reference's answer log-probabilities, before any policy forward; then the pair weights."""
        with torch.no_grad():
            micro_batches = [self._with_reference(m) for m in micro_batches]
        return super().start_step(micro_batches, dp_sum)

    def _with_reference(self, m: MicroBatch) -> MicroBatch:
        targets, masks, chosen, rejected, weights = m.labels
        ref = self.reference(
            m.inputs, lambda head, hidden, _: sequence_logps(head, hidden, targets, masks, self.mean_logps)
        )
        return MicroBatch(m.inputs, (targets, masks, chosen, rejected, ref.detach().double(), weights))

    def loss(self, head, hidden: torch.Tensor, labels) -> torch.Tensor:
        targets, masks, chosen, rejected, ref, weights = labels
        policy = sequence_logps(head, hidden, targets, masks, self.mean_logps)
        o = self.cfg.objective
        loss, r_chosen, r_rejected = dpo(policy[chosen], policy[rejected], ref[chosen].to(policy.dtype),
                                         ref[rejected].to(policy.dtype), o.beta, o.dpo_variant, o.label_smoothing)  # fmt: skip
        self.record_pairs(loss.detach(), r_chosen, r_rejected, weights)
        real = weights > 0
        self.record(logp_chosen_sum=(policy[chosen].detach() * real).sum(),
                    logp_rejected_sum=(policy[rejected].detach() * real).sum())  # fmt: skip
        return (loss * weights.to(loss.dtype)).sum()

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        out = super().summarize(sums)
        return {
            **out,
            "logp_chosen": sums["logp_chosen_sum"] / n,
            "logp_rejected": sums["logp_rejected_sum"] / n,
        }
