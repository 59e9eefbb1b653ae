"""PPO's and GRPO's arithmetic against formulas written out here, element by element."""

from __future__ import annotations

import math

import pytest
import torch

from neo.rl.advantages import gae, group_advantages, whiten
from neo.rl.losses import clipped_policy_loss, clipped_value_loss, kl_estimate, masked_mean


def test_gae_equals_the_sum_of_discounted_td_errors():
    """A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, V = 0 after the last token."""
    g = torch.Generator().manual_seed(0)
    rewards, values = (
        torch.randn(3, 6, generator=g, dtype=torch.float64),
        torch.randn(3, 6, generator=g, dtype=torch.float64),
    )
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths], dtype=torch.float64)
    gamma, lam = 0.97, 0.9
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = [values[b, t].item() if t < n else 0.0 for t in range(n + 1)]
        delta = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(6):
            want = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t)) if t < n else 0.0
            assert adv[b, t].item() == pytest.approx(want, abs=1e-12)
            assert ret[b, t].item() == pytest.approx(want + (v[t] if t < n else 0.0), abs=1e-12)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.25, 0.125]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist() == [[6.0 - 0.5, 5.0 - 0.25, 3.0 - 0.125]]


def test_group_advantages_normalize_within_each_prompt():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    first = [(x - 0.5) / (0.5 + 1e-6) for x in (1.0, 0.0, 0.0, 1.0)]
    assert a[:4].tolist() == pytest.approx(first) and a[4:].tolist() == [0.0] * 4  # a tie gives no signal
    assert group_advantages(r, 4, scale=False)[:4].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_whiten_over_the_mask():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask, eps=0.0)
    std = math.sqrt(2.0 / 3.0)
    assert w.tolist()[0] == pytest.approx([-1 / std, 0.0, 1 / std, 0.0])


@pytest.mark.parametrize("advantage", [1.5, -0.7])
def test_clipped_policy_loss_takes_the_pessimistic_term(advantage):
    old = torch.zeros(5, dtype=torch.float64)
    logp = torch.log(torch.tensor([0.5, 0.9, 1.0, 1.1, 2.0], dtype=torch.float64))
    a = torch.full((5,), advantage, dtype=torch.float64)
    loss, clipped = clipped_policy_loss(logp, old, a, clip=0.2)
    for i, ratio in enumerate([0.5, 0.9, 1.0, 1.1, 2.0]):
        want = -min(ratio * advantage, min(max(ratio, 0.8), 1.2) * advantage)
        assert loss[i].item() == pytest.approx(want)
        assert bool(clipped[i]) == (want != pytest.approx(-ratio * advantage))


def test_clipped_value_loss():
    v, old, ret = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, -1.0])
    loss = clipped_value_loss(v, old, ret, clip=0.5)
    # v=1 clipped to 0.5: max((1-2)^2, (0.5-2)^2) = 2.25; v=0: (0-1)^2 both; v=3 clipped to 0.5: max(16, 2.25)
    assert (2 * loss).tolist() == [2.25, 1.0, 16.0]


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    log_r = ref - logp  # -0.5, 1.0
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_estimate(logp, ref, "k3").tolist() == pytest.approx(
        [math.exp(x) - 1 - x for x in log_r.tolist()]
    )
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_kl():
    """Sampling from p and averaging k1 or k3 recovers KL(p || q) of two categorical distributions."""
    g = torch.Generator().manual_seed(1)
    p, q = torch.softmax(torch.randn(7, generator=g), 0), torch.softmax(torch.randn(7, generator=g), 0)
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[samples], q.log()[samples], kind).mean().item()
        assert est == pytest.approx(exact, rel=0.03), kind


def test_masked_mean_ignores_padding():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0
