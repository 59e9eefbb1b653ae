"""slurm/*.sbatch on a real SLURM cluster: a throwaway one node cluster on localhost, 2 CPU tasks per job.

Training across nodes, preemption (warning signal, requeue) and a lost node are tested on two nodes, in
tests/test_slurm_two_nodes.py; this module keeps what one node shows as well: how ranks are read, and
bad runs failing fast.

Skipped, with the reason, only where no cluster can be had (not root, or SLURM not installable);
the cluster is torn down after the module even when a test fails. Every wait has a deadline.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from runs import ROOT, TINY, checkpoints, make_tokens
from slurm_cluster import LocalSlurm, job_env, read_log, unavailable_reason

from neo.distributed import DistEnv, slurm_port

pytestmark = pytest.mark.slurm

TRAIN = str(ROOT / "slurm" / "train.sbatch")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no SLURM cluster on localhost: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return make_tokens(tmp_path_factory.mktemp("tokens"))


def submit(cluster: LocalSlurm, tmp: Path, script: str, *args: str) -> tuple[int, Path]:
    """sbatch SCRIPT ARGS with 2 CPU tasks on one node, as a user submits from the checkout."""
    job = cluster.sbatch(
        "--nodes=1",
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={tmp}/job-%j.out",
        script,
        *args,
        cwd=ROOT,
        env=job_env(tmp),
    )
    return job, tmp / f"job-{job}.out"


def train_args(tokens: str, run_dir: Path, iterations: int) -> list[str]:
    return [
        TINY,
        "--set",
        f"data.train_paths=[{tokens}]",
        "--set",
        f"logging.dir={run_dir}",
        "--set",
        f"schedule.iterations={iterations}",
        "--set",
        "eval.interval=0",
    ]


def test_rank_and_world_come_from_the_srun_step_not_the_batch_step(cluster, tmp_path):
    # neo.distributed.read_env, run inside the real batch step and inside a real 2-task srun step
    probe = tmp_path / "probe.py"
    probe.write_text(f"""\
import dataclasses, json, os, sys
from neo.distributed import read_env, slurm_hostnames
out = dict(env=dataclasses.asdict(read_env()), hosts=slurm_hostnames("gpu[07-09],login1"))
name = sys.argv[1] + "-" + os.environ["SLURM_PROCID"] + ".json"
with open(os.path.join({str(tmp_path)!r}, name), "w") as f:
    json.dump(out, f)
""")
    script = tmp_path / "probe.sbatch"
    script.write_text(f"#!/bin/bash\n{sys.executable} {probe} batch\nsrun {sys.executable} {probe} step\n")
    job, log = submit(cluster, tmp_path, str(script))
    info = cluster.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED", read_log(log)

    batch = json.loads((tmp_path / "batch-0.json").read_text())
    # python launch/train.py straight in an sbatch script: one process, and a note saying so
    assert (batch["env"]["launcher"], batch["env"]["world_size"], batch["env"]["rank"]) == ("single", 1, 0)
    assert "srun" in batch["env"]["note"]
    for rank in (0, 1):
        step = json.loads((tmp_path / f"step-{rank}.json").read_text())
        assert DistEnv(**step["env"]) == DistEnv(rank, 2, rank, 2, cluster.node, slurm_port(job), "slurm")
        assert step["hosts"] == ["gpu07", "gpu08", "gpu09", "login1"]  # expanded by scontrol


@pytest.mark.parametrize(
    "problem, message",
    [
        ("model.hiden_size=64", "unknown key 'model.hiden_size'"),  # caught by the script before srun
        ("data.train_paths=[/nonexistent/tokens]", "/nonexistent/tokens.idx: no such file"),  # by the ranks
    ],
)
def test_bad_run_fails_fast_with_the_message_in_the_job_log(cluster, tokens, tmp_path, problem, message):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    job, log = submit(cluster, tmp_path, TRAIN, *train_args(tokens, run_dir, 5), "--set", problem)
    info = cluster.wait(job, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), read_log(log)
    assert message in read_log(log)
    assert time.monotonic() - start < 100, "a bad run must fail, not wait"
    assert not checkpoints(run_dir)


def test_sbatch_without_configs_prints_usage(cluster, tmp_path):
    job, log = submit(cluster, tmp_path, TRAIN)
    info = cluster.wait(job, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert "usage: sbatch" in read_log(log)
