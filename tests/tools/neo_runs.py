"""Helpers for tests that start neo's launch scripts as users do: tokens, a clean environment, results.

A run is judged by what it wrote (metrics.jsonl records, checkpoints), not only by its exit code:
gloo's worker threads can abort a process at interpreter exit after all work is done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "ds_configs" / "models" / "tiny.yml")
# Variables a launcher (or an enclosing SLURM job) sets; a test starts from none of them.
LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "OMP_NUM_THREADS",
)
LAUNCH_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "PMI_", "OMPI_")


def make_tokens(folder: Path) -> str:
    """Tokenize the bundled sample corpus with neo's own CLI; returns the .bin/.idx prefix."""
    prefix = folder / "sample"
    if not Path(str(prefix) + ".idx").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "preprocess.py"),
                str(ROOT / "data" / "sample" / "austen.jsonl.gz"),
                "--output",
                str(prefix),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    return str(prefix)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steps(recs: list[dict]) -> list[int]:
    return [r["step"] for r in recs if "loss" in r]


def losses(recs: list[dict]) -> list[float]:
    return [r["loss"] for r in recs if "loss" in r]


def end_codes(recs: list[dict]) -> list[int]:
    """Exit codes of the runs that wrote their end record, in order (0 finished, 75 saved for requeue)."""
    return [r["exit_code"] for r in recs if r.get("event") == "end"]


def checkpoints(run_dir: Path) -> list[dict]:
    """The neo.json of every complete checkpoint in the run."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("iter_*/neo.json"))
    return [json.loads(p.read_text()) for p in folders]
