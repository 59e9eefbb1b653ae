"""The policy-gradient losses of PPO and GRPO, and the KL estimators they report or penalize.

All take per-token tensors [batch, response tokens] and a 0/1 ``mask``; the averages are over masked tokens.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token PPO surrogate (Schulman et al. 2017): -min(ratio A, clip(ratio, 1-eps, 1+eps) A) with
    ratio = exp(logp - old_logp); and whether the clipped term was the one taken (for the clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                       ) -> torch.Tensor:  # fmt: skip
    """Per-token PPO value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman, "Approximating KL
    divergence", 2020), with log r = ref_logp - logp: k1 = -log r (unbiased, can be negative), k2 = (log r)^2 / 2,
    k3 = (r - 1) - log r (unbiased, never negative; GRPO's penalty)."""
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: use k1, k2 or k3")
