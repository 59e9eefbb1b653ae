"""slurm/*.sbatch on a real SLURM cluster: a throwaway one node cluster on localhost, 2 CPU tasks per job.

Skipped, with the reason, only where no cluster can be had (not root, or SLURM not installable);
the cluster is torn down after the module even when a test fails. Every wait has a deadline.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from runs import ROOT, TINY, checkpoints, clean_env, end_codes, make_tokens, records, steps
from slurm_cluster import FINAL_STATES, LocalSlurm, unavailable_reason

from neo.distributed import DistEnv, slurm_port

pytestmark = pytest.mark.slurm

TRAIN = str(ROOT / "slurm" / "train.sbatch")
TRAIN_DS = str(ROOT / "slurm" / "train-deepspeed.sbatch")
JOB_TIMEOUT = 300  # s; a job normally takes 10-40 s here, far more only when the machine is overloaded


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


def job_env(tmp: Path) -> dict[str, str]:
    """What a user's shell would export: this interpreter as PYTHON, its deepspeed script."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return clean_env(
        PYTHON=sys.executable,
        DEEPSPEED=str(deepspeed if deepspeed.exists() else shutil.which("deepspeed") or "deepspeed"),
        NEO_HOSTFILE=str(tmp / "hostfile"),
    )


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


def read(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no job log)"


def wait_for_step(
    cluster: LocalSlurm, job: int, run_dir: Path, log: Path, after: int, timeout: float
) -> None:
    """Until the run logs a step beyond ``after`` (it is training then, its signal handlers set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s > after for s in steps(records(run_dir))):
            return
        state = cluster.job(job).get("JobState")
        assert state not in FINAL_STATES, f"job {job} ended ({state}):\n{read(log)}"
        time.sleep(0.2)
    pytest.fail(f"job {job} logged no step beyond {after} in {timeout} s:\n{read(log)}")


def check_resumed(run_dir: Path, log: Path, iterations: int, launcher: str, interruptions: int) -> None:
    """Each interrupted run saved and stopped (75); each requeued run resumed from the checkpoint
    the one before saved; the last finished. Every step ran exactly once, on 2 ranks."""
    text = read(log)
    recs = records(run_dir)
    assert end_codes(recs) == [75] * interruptions + [0], text
    saved = [r["step"] for r in recs if r.get("event") == "end"][:-1]
    assert all(1 <= s < iterations for s in saved)
    for restart, step in enumerate(saved, start=1):
        part = text.split(f"(restart {restart})", 1)[-1]  # the job log from the requeued run on
        assert f"{run_dir}/checkpoints/iter_{step:08d}" in part, text
    # not from step 1 again: each run went on where the one before stopped
    assert steps(recs) == list(range(1, iterations + 1)), text
    assert text.count("world 2 = pp 1 x dp 2 x tp 1") == interruptions + 1, text
    assert text.count(f"2 rank(s) from {launcher}, 2 on this node; backend gloo") == interruptions + 1, text
    final = checkpoints(run_dir)[-1]
    assert final["iteration"] == iterations and final["layout"]["dp"] == 2


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
    assert info["JobState"] == "COMPLETED", read(log)

    batch = json.loads((tmp_path / "batch-0.json").read_text())
    # python launch/train.py straight in an sbatch script: one process, and a note saying so
    assert (batch["env"]["launcher"], batch["env"]["world_size"], batch["env"]["rank"]) == ("single", 1, 0)
    assert "srun" in batch["env"]["note"]
    for rank in (0, 1):
        step = json.loads((tmp_path / f"step-{rank}.json").read_text())
        assert DistEnv(**step["env"]) == DistEnv(rank, 2, rank, 2, cluster.node, slurm_port(job), "slurm")
        assert step["hosts"] == ["gpu07", "gpu08", "gpu09", "login1"]  # expanded by scontrol


def test_train_sbatch_saves_on_warning_and_on_scontrol_requeue_and_resumes(cluster, tokens, tmp_path):
    run_dir, iterations = tmp_path / "run", 24
    job, log = submit(cluster, tmp_path, TRAIN, *train_args(tokens, run_dir, iterations))
    wait_for_step(cluster, job, run_dir, log, 1, JOB_TIMEOUT)
    # what --signal=B:USR1@300 does before the time limit: the script passes it on, then requeues
    cluster.command("scancel", "--signal=USR1", "--batch", str(job))
    deadline = time.monotonic() + JOB_TIMEOUT
    while end_codes(records(run_dir)) != [75] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert end_codes(records(run_dir)) == [75], read(log)
    wait_for_step(cluster, job, run_dir, log, max(steps(records(run_dir))) + 1, JOB_TIMEOUT)
    # what preemption does: SIGTERM to every task, and SLURM puts the job back in the queue itself
    cluster.command("scontrol", "requeue", str(job))
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), read(log)
    check_resumed(run_dir, log, iterations, "slurm", interruptions=2)
    text = read(log)
    assert text.count(f"requeueing job {job}") == 1 and "neo: SIGTERM" in text, text


def test_deepspeed_sbatch_saves_on_warning_requeues_and_resumes(cluster, tokens, tmp_path):
    # the launchers must let the ranks handle the signal and pass their exit code 75 on
    run_dir, iterations = tmp_path / "run", 20
    job, log = submit(cluster, tmp_path, TRAIN_DS, *train_args(tokens, run_dir, iterations))
    wait_for_step(cluster, job, run_dir, log, 1, JOB_TIMEOUT)
    cluster.command("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), read(log)
    check_resumed(run_dir, log, iterations, "deepspeed", interruptions=1)
    text = read(log)
    assert "deepspeed on 1 node(s) x 2 ranks" in text and f"requeueing job {job}" in text
    assert not (tmp_path / "hostfile").exists()  # removed when the job ended


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
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), read(log)
    assert message in read(log)
    assert time.monotonic() - start < 100, "a bad run must fail, not wait"
    assert not checkpoints(run_dir)


def test_sbatch_without_configs_prints_usage(cluster, tmp_path):
    job, log = submit(cluster, tmp_path, TRAIN)
    info = cluster.wait(job, timeout=60)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0")
    assert "usage: sbatch" in read(log)
