"""GRPO (``objective.type: grpo``; Shao et al. 2024, DeepSeekMath): PPO's clipped surrogate without a critic.

``objective.group_size`` (G) responses are sampled per prompt; a response's advantage, shared by all its
tokens, is its reward minus the group's mean, over the group's standard deviation. The loss per response token
is the clipped surrogate plus kl_coef x the k3 estimate of KL(policy || reference), averaged over the response
tokens of the global batch (the token-level average, where the paper averages each response first).
"""

from __future__ import annotations

import torch

from neo.objectives.online import OnlineRL
from neo.rl.advantages import group_advantages
from neo.rl.losses import kl_estimate


class GRPO(OnlineRL):
    name = "grpo"
    default_group_size = 4

    def advantages(self, rollout) -> tuple[torch.Tensor, torch.Tensor]:
        per_response = group_advantages(rollout.rewards, self.group_size)
        advantages = per_response.unsqueeze(1) * rollout.mask
        return advantages, torch.zeros_like(advantages)

    def loss(self, head, hidden: torch.Tensor, labels) -> torch.Tensor:
        policy_loss, mask, logp = self.token_terms(head, hidden, labels)
        ref_logp, weights = labels[3], labels[-1]
        per_token = policy_loss + self.cfg.objective.kl_coef * kl_estimate(
            logp, ref_logp.to(logp.dtype), "k3"
        )
        return (per_token * weights).sum()
