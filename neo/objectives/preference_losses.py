"""The losses of learning from preferences, as plain functions of per-answer scores (tested against the
papers' formulas in tests/test_preference_losses.py).

- Reward model (Bradley-Terry, as in InstructGPT, Ouyang et al. 2022): -log sigmoid(r_chosen - r_rejected - m)
  with an optional per-pair margin m (Llama 2's), plus ``centering`` x (r_chosen + r_rejected)^2, which keeps
  rewards near zero (Eisenstein et al. 2023, "reward centering").
- DPO (Rafailov et al. 2023) on h = (pi_c - ref_c) - (pi_r - ref_r), the answers' log-probability sums:
  ``sigmoid``: -log sigmoid(beta h); with ``label_smoothing`` eps (conservative DPO): -(1 - eps) log sigmoid(beta h)
  - eps log sigmoid(-beta h); ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_VARIANTS = ("sigmoid", "ipo")


def bradley_terry(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                  centering: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-pair reward-model loss."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    if centering:
        loss = loss + centering * (r_chosen + r_rejected) ** 2
    return loss


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float, variant: str = "sigmoid", label_smoothing: float = 0.0
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(per-pair loss, chosen reward, rejected reward); the rewards beta (pi - ref) carry no gradient."""
    chosen_logratio, rejected_logratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if variant == "sigmoid":
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif variant == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO variant {variant!r}: use one of {', '.join(DPO_VARIANTS)}")
    return loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
