"""GPU smoke tests: short runs of the tiny model on real GPUs (skipped where torch sees no CUDA device).

    pytest tests/gpu -q        # on a GPU node, a few minutes at most

Each run must train (the loss falls), report throughput and memory, and say it ran on the GPU
with nccl; fp16 runs also report the dynamic loss scale.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import ROOT, TINY, checkpoints, clean_env, end_codes, losses, make_tokens, records

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

TRAIN = str(ROOT / "launch" / "train.py")


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return make_tokens(tmp_path_factory.mktemp("tokens"))


def gpu_env() -> dict[str, str]:
    env = clean_env()
    env["DS_ACCELERATOR"] = "cuda"
    return env


def train(tokens: str, run_dir: Path, *sets: str, nproc: int = 1, timeout: int = 600):
    cmd = (
        [sys.executable, TRAIN]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            TRAIN,
        ]
    )
    cmd.append(TINY)
    for s in (f"data.train_paths=[{tokens}]", f"logging.dir={run_dir}", "eval.interval=0", *sets):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_one_gpu_trains_and_logs_memory_and_throughput(tokens, tmp_path, dtype):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name()} has no bf16")
    iterations = 60
    rc, out = train(
        tokens,
        tmp_path,
        f"precision.dtype={dtype}",
        f"schedule.iterations={iterations}",
        "logging.interval=10",
        "optimizer.lr=2e-3",
        "schedule.warmup=5",
    )
    recs = records(tmp_path)
    assert rc == 0 and end_codes(recs) == [0], out[-4000:]
    assert re.search(r"backend nccl; device cuda:0 \(", out), out[-4000:]
    curve = losses(recs)
    assert len(curve) == iterations
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    logged = [r for r in recs if "tokens_per_s" in r]
    assert len(logged) == iterations // 10
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert all(r["tokens_per_s"] > 0 and 0 < r["memory_gb"] < total_gb for r in logged), logged
    assert re.search(r"tok/s \| .* \| mem \d+\.\d+ GB", out)
    if dtype == "fp16":
        assert all(r["loss_scale"] >= 1 for r in recs if "loss" in r)
    assert checkpoints(tmp_path)[-1]["iteration"] == iterations


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_with_nccl(tokens, tmp_path):
    dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    rc, out = train(tokens, tmp_path, f"precision.dtype={dtype}", "schedule.iterations=20", nproc=2)
    assert end_codes(records(tmp_path)) == [0], out[-4000:]
    assert "2 rank(s) from torchrun" in out and "backend nccl" in out
    assert "world 2 = pp 1 x dp 2 x tp 1" in out


def test_more_ranks_than_gpus_is_a_clear_error(tokens, tmp_path):
    n = torch.cuda.device_count()
    rc, out = train(tokens, tmp_path, "schedule.iterations=2", nproc=n + 1, timeout=300)
    assert rc != 0 and not records(tmp_path)
    assert f"{n + 1} ranks on this node but it shows {n} GPU(s)" in out, out[-4000:]


def test_smoke_script_passes(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "smoke.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(gpu_env(), NEO_SMOKE_DIR=str(tmp_path)),
        timeout=1200,
    )
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("PASS ") >= 5
