"""A second random stream for dropout inside tensor-parallel regions (Megatron's tracked RNG).

Dropout on replicated activations must draw the same mask on every rank of a TP group (the default
stream, seeded identically). Dropout on split activations (attention probabilities: each rank owns
different heads) must draw *independent* masks per rank, as the unsplit model would. This module
keeps that second stream, seeded with ``seed + 2718 + tp_rank`` like Megatron, and swaps it in only
around such ops.
"""

from __future__ import annotations

import contextlib

import torch

_state: dict[str, torch.Tensor] = {}


def seed(value: int) -> None:
    """Seed the model-parallel stream (call once per rank with a TP-rank-dependent value)."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(value)
        _state["cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            _state["cuda"] = torch.cuda.get_rng_state()


@contextlib.contextmanager
def fork():
    """Run the body on the model-parallel stream (seeded lazily from 2718 if ``seed`` was never called)."""
    if not _state:
        seed(2718)
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.set_rng_state(_state["cpu"])
    if cuda is not None:
        torch.cuda.set_rng_state(_state["cuda"])
    try:
        yield
    finally:
        _state["cpu"] = torch.get_rng_state()
        torch.set_rng_state(cpu)
        if cuda is not None:
            _state["cuda"] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(cuda)


def get_state() -> dict[str, torch.Tensor]:
    return dict(_state)


def set_state(state: dict[str, torch.Tensor]) -> None:
    _state.clear()
    _state.update(state)
