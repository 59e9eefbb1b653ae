"""Learning rate: linear warmup, then cosine, linear or constant decay to ``min_lr``."""

from __future__ import annotations

import math
from functools import partial


def lr_at(step: int, *, lr: float, warmup: int, decay: str, decay_iters: int, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if decay == "constant":
        return lr
    span = max(1, decay_iters - warmup)
    progress = min(1.0, (step - warmup) / span)
    if decay == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - min_lr) * progress


class LRSchedule:
    """Sets ``lr`` on every param group from the step count; DeepSpeed steps it once per optimizer step
    (not on fp16-overflow steps) and saves ``state_dict`` in its checkpoints."""

    def __init__(self, optimizer, fn):
        self.optimizer, self.fn, self.last_step = optimizer, fn, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.fn(self.last_step)

    def step(self, *_args, **_kwargs) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.fn(self.last_step)]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def schedule_from_config(cfg):
    """``fn(step) -> lr`` for a run's config (its ``schedule`` and ``optimizer`` sections)."""
    sch = cfg.schedule
    return partial(lr_at, lr=cfg.optimizer.lr, warmup=cfg.warmup_steps, decay=sch.decay,
                   decay_iters=sch.decay_iters or sch.iterations, min_lr=sch.min_lr)  # fmt: skip
