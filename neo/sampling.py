"""How each next token is chosen: the sampling settings and the logits filters, in the order and with the
semantics of transformers' ``generate`` (repetition penalty, temperature, top-k, top-p). Used by the
generator (neo/generate.py) and by RL rollouts (neo/rl/rollout.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neo.errors import GenerationError


@dataclass
class SamplingParams:
    """How to choose each next token, and when to stop.

    ``temperature = 0`` or ``greedy = True`` picks the most likely token. ``top_k = 0`` and ``top_p = 1``
    disable those filters. ``seed`` makes sampling reproducible (None: a random seed, reported in
    ``Generator.last_seed``). Generation stops at ``max_new_tokens``, at the end-of-document token when
    ``stop_at_eod``, or when the text contains one of ``stop`` (the stop string is not returned).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eod: bool = True

    def __post_init__(self) -> None:
        self.stop = tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Raise GenerationError naming the first out-of-range setting."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise GenerationError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")


# ------------------------------------------------------------------------------------ logits filters


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: a seen token's logit is divided by ``penalty`` when
    positive and multiplied by it when negative (so ``penalty > 1`` always makes it less likely).

    logits [b, V] float; seen [b, V] bool (tokens of the prompt and of the text generated so far).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p.

    A token is kept when the probability of the tokens ranked above it is still below ``p``, so the
    most likely token is always kept and the kept set reaches ``p`` with its last member.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next token of each row from logits [b, V] (already cut to the real vocabulary)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = filter_top_p(filter_top_k(logits, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
