"""The programmatic reward of bench/rl.py: how much of a response is common English.

No model is involved, so the curve shows what PPO and GRPO do with a fixed, cheap signal.
"""

from __future__ import annotations

COMMON = {",", ".", "the", "and", "of", "to", "a", "I", "her", "was", "in", "it", "she", "not", "be", "he"}


def common_words(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of a response's words (commas and full stops count as words) among the 16 commonest."""
    out = []
    for response in responses:
        words = response.replace(",", " , ").replace(".", " . ").split()
        out.append(sum(w in COMMON for w in words) / max(len(words), 1))
    return out
