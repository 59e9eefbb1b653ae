"""slurm/*.sbatch across two SLURM nodes: a throwaway cluster of two slurmd daemons, n1 and n2, on localhost.

As on many real clusters, the node names do not resolve as host names (nothing edits /etc/hosts): the
jobs work only because neo takes rank 0's address from SLURM (``scontrol show node`` -> ``NodeAddr``).
Every 2-node run trains the quickstart shape and is compared, step by step, with the same run as
2 processes on one node (torchrun, no SLURM): the reference, trained once per module.

Skipped, with the reason, only where no cluster can be had (not root, or SLURM not installable); the
cluster is torn down after the module even when a test fails. Every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from runs import ROOT, TINY, checkpoints, end_codes, losses, make_tokens, records, run_training, steps
from slurm_cluster import LocalSlurm, job_env, read_log, unavailable_reason, wait_for_step

from neo.checkpoint.files import verify
from neo.checkpoint.layout import find_latest
from neo.checkpoint.manifest import read_meta

pytestmark = pytest.mark.slurm

NODES = ("n1", "n2")
TRAIN = str(ROOT / "slurm" / "train.sbatch")
TRAIN_DS = str(ROOT / "slurm" / "train-deepspeed.sbatch")
QUICKSTART = str(ROOT / "ds_configs" / "quickstart.yml")
STEPS = 12
# The quickstart's model, a smaller batch, no validation: ~1 s a step on 2 ranks here.
SETTINGS = (f"schedule.iterations={STEPS}", "schedule.warmup=2", "batch.micro_batch_size=4",
            "eval.interval=0", "eval.iters=0", "logging.interval=4")  # fmt: skip
# Failure tests need no parity: the tiny model, long enough never to finish before it is interrupted.
TINY_SETTINGS = ("schedule.iterations=400", "eval.interval=0")
HUNG_TIMEOUT = 10  # s: launch.collective_timeout of the hung-node test
RTOL = 1e-4  # fp32: a 2-node run against 2 processes on one node
JOB_TIMEOUT = 300  # s; a job takes 15-40 s here, far more only when the machine is overloaded
LOST_RANK_BOUND = 30  # s from SIGKILL of one node's rank until the job has ended (measured: ~1 s)


def _resolves(name: str) -> bool:
    try:
        socket.getaddrinfo(name, None)
        return True
    except socket.gaierror:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no SLURM cluster on localhost: {reason}")
    resolving = [n for n in NODES if _resolves(n)]
    assert not resolving, f"{resolving} resolve as host names here: these tests need names that do not"
    with LocalSlurm(tmp_path_factory.mktemp("slurm2"), nodes=NODES) as c:
        yield c


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return make_tokens(tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> list[float]:
    """The loss curve of the same run as 2 processes on one node."""
    run = run_training(tmp_path_factory.mktemp("reference"), f"data.train_paths=[{tokens}]", *SETTINGS,
                       nproc=2, configs=(QUICKSTART,), timeout=600)  # fmt: skip
    assert len(run.losses) == STEPS
    return run.losses


def submit(cluster: LocalSlurm, tmp: Path, script: str, run_dir: Path, tokens: str, *extra: str,
           config: str = QUICKSTART, settings: tuple[str, ...] = SETTINGS, **env: str) -> tuple[int, Path]:  # fmt: skip
    """sbatch --nodes 2 --ntasks-per-node 1 SCRIPT (the quickstart shape by default), as a user submits it."""
    sets = [f"data.train_paths=[{tokens}]", f"logging.dir={run_dir}", *settings, *extra]
    job = cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        "--time=15",
        f"--output={tmp}/job-%j.out",
        script,
        config,
        *[arg for s in sets for arg in ("--set", s)],
        cwd=ROOT,
        env=job_env(tmp, **env),
    )
    return job, tmp / f"job-{job}.out"


def assert_same_curve(got: list[float], want: list[float], text: str, rtol: float = RTOL) -> None:
    assert len(got) == len(want), f"{len(got)} losses, want {len(want)}:\n{text}"
    worst = max(abs(g - w) / abs(w) for g, w in zip(got, want))
    print(f"{len(got)} losses, max relative difference {worst:.1e} (tolerance {rtol:g})")
    assert worst <= rtol, f"max relative difference {worst:.2e} > {rtol:g}\n{got}\n{want}"


def assert_ran_on_both_nodes(text: str, runs: int = 1) -> None:
    """Every run of the job: rank 0 on n1, rank 1 on n2, and n1's address found through SLURM."""
    assert text.count("neo: ranks by node: n1 [0], n2 [1]") == runs, text
    assert text.count("n1 does not resolve: SLURM's NodeAddr 127.0.0.1") == runs, text


def wait_for_end_codes(run_dir: Path, want: list[int], log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while end_codes(records(run_dir)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    assert end_codes(records(run_dir)) == want, read_log(log)


def test_train_sbatch_on_two_nodes_matches_one_node(cluster, tokens, reference, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN, run_dir, tokens)
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "n[1-2]"), text
    assert_ran_on_both_nodes(text)
    assert "2 rank(s) from slurm, 1 on this node" in text
    assert steps(records(run_dir)) == list(range(1, STEPS + 1))
    assert_same_curve(losses(records(run_dir)), reference, text)


def test_deepspeed_sbatch_on_two_nodes_saves_on_warning_resumes_and_matches_one_node(
    cluster, tokens, reference, tmp_path
):
    # one deepspeed launcher per node; they must let the ranks save on SIGUSR1 and pass 75 on
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN_DS, run_dir, tokens)
    wait_for_step(cluster, job, run_dir, log, 2, JOB_TIMEOUT)
    cluster.command("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "deepspeed on 2 node(s) x 1 ranks" in text and f"requeueing job {job}" in text
    assert_ran_on_both_nodes(text, runs=2)
    recs = records(run_dir)
    assert end_codes(recs) == [75, 0] and steps(recs) == list(range(1, STEPS + 1)), text
    assert_same_curve(losses(recs), reference, text)


def test_warning_signal_on_two_nodes_saves_once_requeues_and_resumes_the_same_curve(
    cluster, tokens, reference, tmp_path
):
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN, run_dir, tokens)
    wait_for_step(cluster, job, run_dir, log, 2, JOB_TIMEOUT)
    # what --signal=B:USR1@300 does before the time limit: the batch script on n1 passes it to both nodes
    cluster.command("scancel", "--signal=USR1", "--batch", str(job))
    wait_for_end_codes(run_dir, [75], log)
    saved = [c["iteration"] for c in checkpoints(run_dir)]
    assert len(saved) == 1 and 2 < saved[0] < STEPS, (saved, read_log(log))  # exactly one checkpoint
    # the requeued run resumes from it; then preemption's SIGTERM to every task saves and requeues again
    wait_for_step(cluster, job, run_dir, log, saved[0], JOB_TIMEOUT)  # the requeued run is training
    cluster.command("scontrol", "requeue", str(job))
    info = cluster.wait(job, timeout=JOB_TIMEOUT)
    text = read_log(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), text
    assert_ran_on_both_nodes(text, runs=3)
    recs = records(run_dir)
    assert end_codes(recs) == [75, 75, 0] and steps(recs) == list(range(1, STEPS + 1)), text
    assert text.count(f"requeueing job {job}") == 1 and "neo: SIGTERM" in text, text
    for restart, step in enumerate([r["step"] for r in recs if r.get("event") == "end"][:-1], start=1):
        assert f"resumed from {run_dir}/checkpoints/iter_{step:08d}" in text.split(f"(restart {restart})")[1]
    # the curve an uninterrupted run gives: resuming is exact
    assert_same_curve(losses(recs), reference, text, rtol=1e-6)


def signal_rank(cluster: LocalSlurm, job: int, node: str, sig: int = signal.SIGKILL) -> float:
    """Send ``sig`` to the training process of ``job`` on ``node`` (not to a deepspeed launcher);
    returns when (time.monotonic())."""
    pids = [p for p in cluster.job_pids(job, node, "launch/train.py") if "deepspeed" not in cmdline(p)]
    assert len(pids) == 1, f"want the one rank of job {job} on {node}, found {pids}"
    os.kill(pids[0], sig)
    return time.monotonic()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def assert_no_rank_left(cluster: LocalSlurm, job: int) -> None:
    for node in NODES:  # no rank is left waiting for the lost one
        assert not cluster.job_pids(job, node, "launch/train.py"), f"job {job} left a process on {node}"


def test_lost_node_ends_the_job_at_once_and_a_resubmission_resumes(cluster, tokens, reference, tmp_path):
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN, run_dir, tokens, "checkpoint.save_interval=3")
    wait_for_step(cluster, job, run_dir, log, 4, JOB_TIMEOUT)  # checkpoint 3 is written
    killed = signal_rank(cluster, job, "n2")
    info = cluster.wait(job, timeout=LOST_RANK_BOUND)
    ended = time.monotonic() - killed
    text = read_log(log)
    print(f"job {job} ended {ended:.1f} s after its rank on n2 was killed")
    assert info["JobState"] == "FAILED", text  # exit 137: srun reports the killed task
    assert "srun: error: n2: task 1: Killed" in text and "neo: training failed" in text, text
    assert_no_rank_left(cluster, job)
    newest = find_latest(str(run_dir / "checkpoints"))
    assert newest is not None, text
    verify(newest, read_meta(newest))  # every file its manifest lists, at its size
    resume_at = read_meta(newest)["iteration"]
    trained = max(steps(records(run_dir)))
    assert 3 <= resume_at <= trained < STEPS, (resume_at, trained)

    # the user submits the same command again: it resumes from that checkpoint and ends the same curve
    job2, log2 = submit(cluster, tmp_path, TRAIN, run_dir, tokens, "checkpoint.save_interval=3")
    info = cluster.wait(job2, timeout=JOB_TIMEOUT)
    text = read_log(log2)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert f"resumed from {newest}" in text, text
    recs = records(run_dir)
    assert end_codes(recs) == [0] and steps(recs)[-(STEPS - resume_at) - 1] == trained
    assert_same_curve(losses(recs)[-(STEPS - resume_at) :], reference[resume_at:], text, rtol=1e-6)


def test_lost_rank_under_the_deepspeed_launchers_ends_the_job_at_once(cluster, tokens, tmp_path):
    # the launcher on n2 sees its rank die and fails; srun --kill-on-bad-exit then ends n1's launcher
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN_DS, run_dir, tokens, config=TINY, settings=TINY_SETTINGS)
    wait_for_step(cluster, job, run_dir, log, 2, JOB_TIMEOUT)
    killed = signal_rank(cluster, job, "n2")
    info = cluster.wait(job, timeout=LOST_RANK_BOUND)
    text = read_log(log)
    print(
        f"job {job} (deepspeed launchers) ended {time.monotonic() - killed:.1f} s after its rank on n2 was killed"
    )
    assert info["JobState"] == "FAILED" and "srun: error: n2: task 1: Exited" in text, text
    assert_no_rank_left(cluster, job)


def test_a_hung_node_ends_the_job_after_the_collective_timeout(cluster, tokens, tmp_path):
    # a node that stops answering without its processes ending (SIGSTOP): srun cannot see it, but rank
    # 0's next all-reduce gives up after launch.collective_timeout, and srun then ends the step
    run_dir = tmp_path / "run"
    job, log = submit(cluster, tmp_path, TRAIN, run_dir, tokens, f"launch.collective_timeout={HUNG_TIMEOUT}",
                      config=TINY, settings=TINY_SETTINGS)  # fmt: skip
    wait_for_step(cluster, job, run_dir, log, 2, JOB_TIMEOUT)
    stopped = signal_rank(cluster, job, "n2", signal.SIGSTOP)
    info = cluster.wait(job, timeout=HUNG_TIMEOUT + LOST_RANK_BOUND)
    ended = time.monotonic() - stopped
    text = read_log(log)
    print(f"job {job} ended {ended:.1f} s after its rank on n2 stopped (collective timeout {HUNG_TIMEOUT} s)")
    assert info["JobState"] == "FAILED", text
    assert f"Timed out waiting {HUNG_TIMEOUT * 1000}ms" in text, text
    assert_no_rank_left(cluster, job)


def test_a_job_that_cannot_rendezvous_fails_fast_naming_host_and_port(cluster, tokens, tmp_path):
    # a MASTER_ADDR that neither resolves nor names a SLURM node; one that resolves but does not answer
    # (192.0.2.1: TEST-NET-1, never routed). Both jobs at once: each takes one CPU on each node.
    jobs = {
        addr: submit(
            cluster, tmp_path, TRAIN, tmp_path / addr, tokens, "launch.rendezvous_timeout=5", MASTER_ADDR=addr
        )  # fmt: skip
        for addr in ("n9", "192.0.2.1")
    }
    start = time.monotonic()
    for addr, (job, log) in jobs.items():
        info = cluster.wait(job, timeout=JOB_TIMEOUT)
        text = read_log(log)
        assert info["JobState"] == "FAILED", text  # exit 2 (the rank's), or 143 (srun ended the other)
        port = 20000 + job % 20000
        if addr == "n9":
            assert f"cannot rendezvous at n9:{port}: MASTER_ADDR='n9' does not resolve" in text, text
        else:
            assert re.search(rf"could not reach rank 0 at 192\.0\.2\.1:{port} within [5-9] s", text), text
        assert not checkpoints(tmp_path / addr)
    assert time.monotonic() - start < 60, "a job that cannot rendezvous must fail within a minute"
