"""PPO for language models (``objective.type: ppo``; Schulman et al. 2017, as in InstructGPT).

The policy and a critic share the trunk (``model.value_head``). Each response token's reward is the KL
penalty -kl_coef (log pi - log ref) (the k1 estimate against the frozen reference), plus the response's
reward at its last token; GAE (gamma, lambda) over the critic's values gives the advantages (whitened over the
rollout) and the returns. The loss per response token is the clipped surrogate plus vf_coef x the clipped
value loss, averaged over the response tokens of the global batch.
"""

from __future__ import annotations

import torch

from neo.objectives.online import OnlineRL
from neo.rl.advantages import gae, whiten
from neo.rl.losses import clipped_value_loss


class PPO(OnlineRL):
    name = "ppo"
    uses_critic = True
    model_overrides = {"value_head": True}

    def advantages(self, rollout) -> tuple[torch.Tensor, torch.Tensor]:
        o, mask = self.cfg.objective, rollout.mask
        rewards = -o.kl_coef * (rollout.old_logp - rollout.ref_logp) * mask
        last = mask.cumsum(1).argmax(1)  # each row's last response target
        rewards[torch.arange(len(last)), last] += rollout.rewards
        advantages, returns = gae(rewards, rollout.values, mask, o.gamma, o.lam)
        return whiten(advantages, mask), returns

    def loss(self, head, hidden: torch.Tensor, labels) -> torch.Tensor:
        policy_loss, mask, _ = self.token_terms(head, hidden, labels)
        *_, returns, old_values, weights = labels
        values = head.value(hidden).float()
        value_loss = clipped_value_loss(values, old_values, returns, self.cfg.objective.value_clip)
        self.record(value_loss_sum=(value_loss.detach() * mask).sum())
        per_token = policy_loss + self.cfg.objective.vf_coef * value_loss
        return (per_token * weights).sum()
