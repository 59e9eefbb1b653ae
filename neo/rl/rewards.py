"""Where rewards come from: a Python function, or a reward model's checkpoint.

``objective.reward: "module:function"`` names ``function(prompts: list[str], responses: list[str]) ->
list[float]`` (the module importable: from the current directory, installed, or on PYTHONPATH).
``objective.reward_model: CKPT`` names a neo reward-model checkpoint (``objective.type: reward``): its score
at the last token of prompt + response.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from neo.errors import ConfigError


def load_function(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """``module:function`` imported (the current directory first), or one clear error."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError([f"objective.reward = {spec!r} must be 'module:function'"])
    try:
        _import_top_level_from_cwd(module_name)
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError([f"objective.reward = {spec!r}: {e}. Fix: a module on the Python path (PYTHONPATH) with "
                           "a function f(prompts, responses) -> list of floats."]) from None  # fmt: skip
    return fn


def _import_top_level_from_cwd(module_name: str) -> None:
    """Import the module's top-level package from the current directory when it is there and not yet imported.

    `python launch/train.py` puts launch/, not the current directory, on the path, yet a user's reward module
    sits beside their configs; finding just that one name here leaves sys.path as it was for everything else.
    """
    top = module_name.split(".")[0]
    if top in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
    if spec is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[top] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[top]
        raise


class RewardModel:
    """A reward checkpoint's scores, on this process (plain form, the dtype it was saved in, no gradients)."""

    def __init__(self, path: str, device: torch.device):
        from neo.checkpoint import load_model

        self.model, self.args, meta = load_model(path, device=device)
        if self.args.head != "score":
            raise ConfigError([f"objective.reward_model = {path} is not a reward model (its head is "
                               f"{self.args.head!r}). Fix: a checkpoint trained with objective.type: reward."])  # fmt: skip
        self.device = device

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]]) -> list[float]:
        scores = []
        for seq in sequences:  # one at a time: no padding to reason about
            ids = torch.tensor([seq[-self.args.max_positions :]], device=self.device)
            scores.append(float(self.model(ids)[0, -1]))
        return scores


def build_scorer(objective_cfg, tokenizer, device: torch.device):
    """``score(prompt_ids, response_ids) -> list[float]`` from the objective's reward settings."""
    if objective_cfg.reward_model:
        model = RewardModel(objective_cfg.reward_model, device)
        return lambda prompts, responses: model([p + r for p, r in zip(prompts, responses)])
    fn = load_function(objective_cfg.reward)

    def score(prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        values = fn([tokenizer.decode(p) for p in prompts], [tokenizer.decode(r) for r in responses])
        if len(values) != len(prompts):
            raise ConfigError([f"objective.reward = {objective_cfg.reward!r} returned {len(values)} rewards for "
                               f"{len(prompts)} responses"])  # fmt: skip
        return [float(v) for v in values]

    return score
