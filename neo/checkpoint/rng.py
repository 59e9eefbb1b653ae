"""Each rank's random streams: torch's default generator (CPU and CUDA) and the tensor-parallel one."""

from __future__ import annotations

import torch

from neo.parallel import random as tp_random


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's random streams as uint8 tensors (safetensors can store them; no pickle)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state.update({f"tp_{k}": v for k, v in tp_random.get_state().items()})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tp = {k[3:]: v for k, v in state.items() if k.startswith("tp_")}
    if tp:
        tp_random.set_state(tp)
