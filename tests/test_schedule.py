"""Learning-rate schedule: warmup, then cosine / linear / constant decay to min_lr."""

from __future__ import annotations

import math

import pytest
import torch

from neo.train.schedule import LRSchedule, lr_at


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_warmup_then_decay(decay):
    kw = dict(lr=1.0, warmup=10, decay=decay, decay_iters=110, min_lr=0.1)
    assert [lr_at(s, **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    middle, end, after = lr_at(60, **kw), lr_at(110, **kw), lr_at(500, **kw)
    if decay == "constant":
        assert middle == end == after == 1.0
    else:
        assert end == pytest.approx(0.1) and after == pytest.approx(0.1)
        expected = 0.1 + 0.9 * (0.5 * (1 + math.cos(math.pi * 0.5)) if decay == "cosine" else 0.5)
        assert middle == pytest.approx(expected)
    values = [lr_at(s, **kw) for s in range(10, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases after warmup


def test_scheduler_sets_every_group_and_restores_its_position():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=123.0)
    fn = lambda step: lr_at(step, lr=1.0, warmup=4, decay="linear", decay_iters=8, min_lr=0.0)  # noqa: E731
    sched = LRSchedule(opt, fn)
    for _ in range(5):
        sched.step()
    assert all(g["lr"] == fn(5) for g in opt.param_groups)
    again = LRSchedule(opt, fn)
    again.load_state_dict(sched.state_dict())
    assert again.get_last_lr() == [fn(5)] and all(g["lr"] == fn(5) for g in opt.param_groups)
