"""Shared fixtures: the sample corpus as tokens, and running neo's real launchers in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "ds_configs" / "models" / "tiny.yml")
# bf16 runs compare with the fp32 curve over its first 5 steps: the fp32 run's schedule, stopped by
# schedule.exit_interval. On CPUs without AVX512-BF16/AMX PyTorch emulates bf16 matrix multiplies
# (~250x slower than fp32, mostly the 50k-vocabulary head), so every bf16 step costs seconds.
BF16_FIRST_STEPS = ("schedule.exit_interval=5",)


@pytest.fixture(scope="session")
def sample_tokens(tmp_path_factory) -> str:
    """The bundled Austen corpus tokenized with GPT-2 BPE; returns the .bin/.idx prefix."""
    out = tmp_path_factory.mktemp("tokens") / "sample"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "preprocess.py"),
            str(ROOT / "data" / "sample" / "austen.jsonl.gz"),
            "--output",
            str(out),
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return str(out)


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


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


class Run:
    """A finished training run: its exit code, output, and metrics records."""

    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.returncode, self.output, self.dir = proc.returncode, proc.stdout + proc.stderr, run_dir
        path = run_dir / "metrics.jsonl"
        self.records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records if "loss" in r]

    @property
    def valid_losses(self) -> list[float]:
        return [r["valid_loss"] for r in self.records if "valid_loss" in r]

    @property
    def finished(self) -> bool:
        """The run wrote its end record with exit code 0. A SIGABRT from gloo's threads at interpreter
        exit (after that record, see shared notes on DeepSpeed on CPU) is not a training failure."""
        return any(r.get("event") == "end" and r.get("exit_code") == 0 for r in self.records)


def run_training(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    configs: tuple[str, ...] = (TINY,),
    timeout: int = 300,
    check: bool = True,
) -> Run:
    """Train with ``python launch/train.py`` (nproc = 1) or ``torchrun`` (nproc > 1) and collect the results."""
    script = str(ROOT / "launch" / "train.py")
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
        ]
    cmd += [*configs, "--set", f"logging.dir={run_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    run = Run(proc, run_dir)
    if check:
        crashed_at_exit = proc.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT, 1) and run.finished
        assert proc.returncode == 0 or crashed_at_exit, (
            f"training failed ({proc.returncode}):\n{run.output[-4000:]}"
        )
        assert run.finished, f"training did not finish:\n{run.output[-4000:]}"
    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, sample_tokens) -> Path:
    """The tiny model trained for 20 steps on the sample corpus with the real CLI; the checkpoint root
    that generation and evaluation tests load (trained once per session)."""
    run_dir = tmp_path_factory.mktemp("tiny-run")
    run_training(
        run_dir,
        f"data.train_paths=[{sample_tokens}]",
        "schedule.iterations=20",
        "optimizer.lr=1e-2",
        "eval.interval=0",
        timeout=600,
    )
    return run_dir / "checkpoints"
