"""Training objectives: one small module each, all run by the same loop (see ``base.py``).

pretrain.py   next-token prediction on packed token files (the default)
"""

from __future__ import annotations

from neo.objectives.base import MicroBatch, Objective
from neo.objectives.dpo import DPO
from neo.objectives.grpo import GRPO
from neo.objectives.ppo import PPO
from neo.objectives.pretrain import Pretrain
from neo.objectives.reward import Reward
from neo.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {"pretrain": Pretrain, "sft": SFT, "reward": Reward, "dpo": DPO, "ppo": PPO,
                                          "grpo": GRPO}  # fmt: skip


def build_objective(cfg) -> Objective:
    """The objective named by ``cfg.objective.type`` (validated by the config)."""
    return OBJECTIVES[cfg.objective.type](cfg)


__all__ = ["OBJECTIVES", "MicroBatch", "Objective", "build_objective"]
