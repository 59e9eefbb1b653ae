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


def checkpoint(function, *args):
    """Recompute ``function(*args)`` in the backward pass instead of keeping its activations (torch's
    non-reentrant checkpoint), with the same random draws both times: torch's default stream is replayed by
    torch itself, and the tensor-parallel dropout stream here is replayed by hand (set back to where it was at
    the first call for the recomputation, then returned to where the rest of the step has taken it). Without
    that, dropout on split heads would draw new masks in the recomputation, and the gradients would be wrong.
    The signature is DeepSpeed's ``activation_checkpoint_func``, so the pipeline form uses it too."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    saved, calls = get_state(), [0]

    def run(*inputs):
        calls[0] += 1
        if calls[0] == 1:
            return function(*inputs)
        current = get_state()
        set_state(saved)
        try:
            return function(*inputs)
        finally:
            set_state(current)

    return torch_checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
