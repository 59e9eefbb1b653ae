"""Shared fixtures: the sample corpus as tokens, a tiny trained checkpoint, one torch thread.

The helpers themselves (running the launchers, reading records) are in tests/runs.py.
"""

from __future__ import annotations

import pytest
from runs import make_tokens, run_training


@pytest.fixture(scope="session")
def sample_tokens(tmp_path_factory) -> str:
    """The bundled Austen corpus tokenized with GPT-2 BPE; returns the .bin/.idx prefix."""
    return make_tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of in-process tests on tiny models: on a shared 2-core machine two
    OpenMP threads that wait on each other's core run several times slower than one (measured: 26 s vs 3 s
    for two tests)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sample_tokens):
    """The tiny model trained for 20 steps on the sample corpus with the real CLI; the checkpoint root
    that generation and evaluation tests load (trained once per session)."""
    run_dir = tmp_path_factory.mktemp("tiny-run")
    run_training(run_dir, f"data.train_paths=[{sample_tokens}]", "schedule.iterations=20", "optimizer.lr=1e-2",
                 "eval.interval=0", timeout=600)  # fmt: skip
    return run_dir / "checkpoints"
