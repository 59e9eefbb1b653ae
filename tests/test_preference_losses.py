"""Reward-model and DPO losses against the papers' formulas, values and gradients (fp64, 1e-9)."""

from __future__ import annotations

import math

import pytest
import torch

from neo.objectives.preference_losses import bradley_terry, dpo


def _scores(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 3 for _ in range(4)]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_with_margin_and_centering():
    rc, rr, m, _ = _scores()
    loss = bradley_terry(rc, rr, m, centering=0.01)
    for i in range(6):
        want = (
            -math.log(_sig(rc[i].item() - rr[i].item() - m[i].item()))
            + 0.01 * (rc[i].item() + rr[i].item()) ** 2
        )
        assert loss[i].item() == pytest.approx(want, abs=1e-9)
    plain = bradley_terry(rc, rr)
    assert plain[0].item() == pytest.approx(-math.log(_sig(rc[0].item() - rr[0].item())), abs=1e-9)


@pytest.mark.parametrize("variant, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_dpo_loss_and_its_gradients_equal_the_formulas(variant, smoothing):
    pc, pr, rc, rr = (t.clone().requires_grad_() for t in _scores())
    beta = 0.1
    loss, chosen_reward, rejected_reward = dpo(pc, pr, rc.detach(), rr.detach(), beta, variant, smoothing)
    loss.sum().backward()
    for i in range(6):
        h = (pc[i] - rc[i] - pr[i] + rr[i]).item()
        if variant == "sigmoid":
            want = -(1 - smoothing) * math.log(_sig(beta * h)) - smoothing * math.log(_sig(-beta * h))
            dh = -(1 - smoothing) * beta * (1 - _sig(beta * h)) + smoothing * beta * _sig(beta * h)
        else:
            want, dh = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
        assert loss[i].item() == pytest.approx(want, abs=1e-9)
        assert pc.grad[i].item() == pytest.approx(dh, abs=1e-9) and pr.grad[i].item() == pytest.approx(
            -dh, abs=1e-9
        )
        assert chosen_reward[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), abs=1e-12)
        assert rejected_reward[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item(), abs=1e-12)
