"""Rollouts: responses sampled from the current policy with neo's KV-cache generator, and what PPO/GRPO need
to learn from them (old and reference log-probabilities, values, rewards).

A rollout is a pure function of the policy's weights at its start, the prompts (the k-th slice of the prompt
stream) and a generator seeded with (seed, k, data-parallel rank): after a resume the same rollout comes out.
Every tensor-parallel rank of a group samples the same tokens (same seed, gathered logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from neo.generate import Generator, SamplingParams


@dataclass
class Rollout:
    """This rank's sequences of one rollout, right-padded to one width; per-token tensors are aligned with the
    targets (``tokens[:, 1:]``): entry t is about the token at t + 1."""

    index: int  # which rollout of the run (k)
    tokens: torch.Tensor  # [n, L] int64, prompt + response + padding
    mask: torch.Tensor  # [n, L-1] float: 1 on response targets
    old_logp: torch.Tensor  # [n, L-1] the policy's log-probabilities when sampled
    ref_logp: torch.Tensor  # [n, L-1] the reference's
    rewards: torch.Tensor  # [n] the reward of each response
    values: torch.Tensor  # [n, L-1] the critic's values when sampled (zeros without one)
    advantages: torch.Tensor  # [n, L-1]
    returns: torch.Tensor  # [n, L-1]

    def state(self) -> dict[str, torch.Tensor]:
        """As tensors, for a checkpoint (a resume in the middle of a rollout's epochs needs it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "index"}
        return {**out, "index": torch.tensor(self.index)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Rollout:
        return cls(**{k: (int(v) if k == "index" else v) for k, v in state.items()})


def prompt_of(item: dict) -> list[int]:
    """A chat example's conversation up to its first answer token (the generation header included)."""
    mask = np.asarray(item["loss_mask"])
    start = int(np.argmax(mask > 0)) if mask.any() else int((np.asarray(item["segments"]) >= 0).sum())
    return [int(t) for t in item["tokens"][:start]]


def sample(policy: torch.nn.Module, tokenizer, prompts: list[list[int]], params: SamplingParams, stop: tuple
           ) -> tuple[list[list[int]], float]:  # fmt: skip
    """Responses (the end-of-document token kept when the model produced it) and the seconds it took."""
    start = time.perf_counter()
    was_training = policy.training
    gen = Generator(policy, tokenizer, batch_size=max(1, len(prompts)))
    try:
        results = gen.generate_ids(prompts, SamplingParams(**{**vars(params), "stop": stop}))
    finally:
        policy.train(was_training)
    responses = [r.tokens + ([tokenizer.eod_id] if r.finish_reason == "eod" else []) for r in results]
    return [r if r else [tokenizer.eod_id] for r in responses], time.perf_counter() - start


def pack(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [n, L] (prompt + response, right-padded) and the response mask over the targets [n, L-1]."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return tokens, mask


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module, tokens: torch.Tensor, value: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target, the critic's value at each position or zeros) under ``model`` [n, L-1]."""
    out = {}

    def read(head, hidden, _):
        out["logp"] = head.token_logprobs(hidden, tokens[:, 1:])[0]
        out["value"] = head.value(hidden) if value else torch.zeros_like(out["logp"])
        return out["logp"]

    from neo.model.gpt import set_loss

    previous = model.loss_fn
    set_loss(model, read)
    was_training = model.training
    try:
        model.eval()(tokens[:, :-1], labels=())
    finally:
        set_loss(model, previous)
        model.train(was_training)
    return out["logp"].float(), out["value"].float()
