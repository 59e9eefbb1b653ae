"""Advantages: generalized advantage estimation for PPO, group-normalized rewards for GRPO.

Shapes are [batch, response tokens] with a 0/1 ``mask`` over the real (not padded) response tokens; a
response's tokens come first in its row, padding after.
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(advantages, returns) by GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t and
    A_t = sum_l (gamma lam)^l delta_{t+l}, with V = 0 after a response's last token; returns = A + V.
    Zero on padding."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * (mask[:, t + 1] if t + 1 < values.shape[1] else 0.0)
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (the mean kept when ``shift_mean`` is False)."""
    mask = mask.to(x.dtype)
    n = mask.sum().clamp_min(1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each of the G samples of a prompt gets (r - mean of its group) / (std of its
    group + eps). ``rewards`` [prompts x G] in prompt-major order; returns the same shape. The std is the
    population one (as DeepSeekMath's description); ``scale=False`` keeps only the mean subtraction."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centered = centered / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    return centered.reshape(rewards.shape)
