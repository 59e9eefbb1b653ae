"""Programmatic rewards for the RL tests (any ``module:function(prompts, responses) -> list[float]`` works).

Cheap, deterministic signals a tiny policy can learn in a dozen steps; no model is involved.
"""

from __future__ import annotations


def commas(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of a response's characters that are commas or full stops, times 10 (a tiny Austen model
    writes few of them; sampling finds some, so the reward has a gradient from the start)."""
    return [10.0 * sum(c in ",." for c in r) / max(len(r), 1) for r in responses]


def the_words(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of a response's words that are 'the'."""
    out = []
    for r in responses:
        words = r.split()
        out.append(sum(w.lower() == "the" for w in words) / max(len(words), 1))
    return out
