"""Every way to start neo on one machine, for real: python, torchrun, the deepspeed launcher, and
RANK/WORLD_SIZE set by hand (2 CPU processes each), plus how neo.distributed reads an environment.

The 2-process runs see the same data in the same order, so their loss curves must agree: a launcher
whose ranks were read wrongly (two rank 0s, a world of 1) trains on different batches.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from runs import ROOT, TINY, checkpoints, clean_env, end_codes, losses, make_tokens, records

from neo.distributed import DistEnv, LaunchError, free_port, read_env, slurm_port, tasks_on_node

TRAIN = str(ROOT / "launch" / "train.py")
ITERATIONS = 6
SETTINGS = [f"schedule.iterations={ITERATIONS}", "eval.interval=0", "eval.iters=0", "logging.interval=1"]


# --------------------------------------------------------------------------- reading the environment


def test_no_launcher_is_one_process():
    env = read_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (0, 1, 0, "single") and not env.note


def test_torchrun_and_deepspeed_variables():
    common = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="29123")
    env = read_env(dict(common, LOCAL_WORLD_SIZE="2", TORCHELASTIC_RUN_ID="x"))
    assert env == DistEnv(3, 4, 1, 2, "node7", 29123, "torchrun")
    env = read_env(dict(common, LOCAL_SIZE="2", CROSS_RANK="1", CROSS_SIZE="2"))
    assert env == DistEnv(3, 4, 1, 2, "node7", 29123, "deepspeed")
    # the launcher's variables win over those of an enclosing srun step (torchrun started by srun)
    env = read_env(dict(common, LOCAL_WORLD_SIZE="2", SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="2"))
    assert (env.rank, env.world_size, env.launcher) == (3, 4, "env")


def test_srun_step_variables():
    step = dict(
        SLURM_PROCID="3",
        SLURM_STEP_NUM_TASKS="4",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_STEP_TASKS_PER_NODE="2(x2)",
        SLURM_STEP_NODELIST="gpu1,gpu2",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="4",
    )
    assert read_env(step) == DistEnv(3, 4, 1, 2, "gpu1", slurm_port(4242), "slurm")
    assert read_env(dict(step, MASTER_ADDR="10.0.0.1", MASTER_PORT="31000")).master_port == 31000
    assert slurm_port(4242) != slurm_port(4243)


def test_inside_an_sbatch_script_without_srun_is_one_process():
    # the batch step has SLURM_PROCID and SLURM_NTASKS but no SLURM_STEP_* (seen on a real cluster,
    # see test_slurm.py): that is one process, and neo says how to use all the tasks
    env = read_env(dict(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0"))
    assert (env.world_size, env.launcher) == (1, "single")
    assert "srun" in env.note


@pytest.mark.parametrize(
    "spec, node, expected", [("8", 0, 8), ("4(x2),3", 1, 4), ("4(x2),3", 2, 3), ("2,1", 1, 1)]
)
def test_tasks_per_node(spec, node, expected):
    assert tasks_on_node(spec, node) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        (dict(RANK="0"), "RANK is set but WORLD_SIZE is not"),
        (dict(WORLD_SIZE="2"), "WORLD_SIZE is set but RANK is not"),
        (dict(RANK="2", WORLD_SIZE="2"), "rank 2 is outside world size 2"),
        (dict(RANK="0", WORLD_SIZE="two"), "WORLD_SIZE='two' is not an integer"),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK=2 is outside"),
        (dict(RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2"), "MASTER_ADDR is not set"),
        (
            dict(
                SLURM_PROCID="0",
                SLURM_STEP_NUM_TASKS="2",
                SLURM_LOCALID="2",
                SLURM_STEP_TASKS_PER_NODE="2",
                SLURM_STEP_NODELIST="n1",
            ),
            "SLURM_LOCALID=2 is outside the 2 task(s)",
        ),
        (
            dict(
                SLURM_PROCID="0",
                SLURM_STEP_NUM_TASKS="4",
                SLURM_NODEID="2",
                SLURM_STEP_TASKS_PER_NODE="2(x2)",
                SLURM_STEP_NODELIST="n1,n2",
            ),
            "SLURM_NODEID=2",
        ),
    ],
)
def test_inconsistent_environment_is_a_clear_error(environ, message):
    with pytest.raises(LaunchError, match=re.escape(message)):
        read_env(environ)


# --------------------------------------------------------------------------- real launches, 2 CPU processes


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    return make_tokens(tmp_path_factory.mktemp("tokens"))


def neo_args(tokens: str, run_dir: Path, *extra: str) -> list[str]:
    args = [TINY]
    for s in (f"data.train_paths=[{tokens}]", f"logging.dir={run_dir}", *SETTINGS, *extra):
        args += ["--set", s]
    return args


def aborted_at_exit(rc: int, output: str) -> bool:
    """gloo's SIGABRT at interpreter exit, as the process or its launcher reports it."""
    return rc in (-signal.SIGABRT, 128 + signal.SIGABRT, 1) and bool(re.search(r"SIGABRT|Signal 6", output))


def check_finished(rc: int, output: str, run_dir: Path, world: int, launcher: str) -> list[float]:
    """The run trained to the end with ``world`` ranks; its losses.

    Success is read from the run's own records. A non-zero code is forgiven only when the end record
    says the run finished and the output shows gloo's SIGABRT at interpreter exit (see neo.distributed).
    """
    recs = records(run_dir)
    finished = end_codes(recs) == [0]
    assert finished and (rc == 0 or aborted_at_exit(rc, output)), (
        f"exit {rc}, end records {end_codes(recs)}:\n{output[-4000:]}"
    )
    assert f"world {world} = pp 1 x dp {world} x tp 1" in output, output[-4000:]
    assert f"{world} rank(s) from {launcher}, {world} on this node; backend gloo; device cpu" in output
    final = checkpoints(run_dir)[-1]
    assert final["iteration"] == ITERATIONS and final["layout"]["dp"] == world
    assert len(losses(recs)) == ITERATIONS
    return losses(recs)


def run(cmd: list[str], timeout: int = 240, **env: str) -> tuple[int, str]:
    proc = subprocess.run(
        cmd, cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def torchrun_losses(tokens, tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("torchrun")
    rc, out = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            TRAIN,
            *neo_args(tokens, run_dir),
        ]
    )
    return check_finished(rc, out, run_dir, 2, "torchrun")


def test_plain_python_is_one_process(tokens, tmp_path):
    rc, out = run([sys.executable, TRAIN, *neo_args(tokens, tmp_path)])
    check_finished(rc, out, tmp_path, 1, "single")


@pytest.mark.multiproc
def test_torchrun_two_processes(torchrun_losses):
    assert torchrun_losses[-1] < torchrun_losses[0]


@pytest.mark.multiproc
def test_deepspeed_launcher_two_processes_on_cpu(tokens, tmp_path, torchrun_losses):
    deepspeed = Path(sys.executable).parent / "deepspeed"
    launcher = str(deepspeed) if deepspeed.exists() else shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher script is installed with the deepspeed package"
    # --num_gpus N starts N ranks on the CPU accelerator too; a free port: 29500 may be taken
    rc, out = run(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), TRAIN, *neo_args(tokens, tmp_path)]
    )
    assert check_finished(rc, out, tmp_path, 2, "deepspeed") == pytest.approx(torchrun_losses, rel=1e-5)


@pytest.mark.multiproc
def test_rank_and_world_size_set_by_hand(tokens, tmp_path, torchrun_losses):
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, TRAIN, *neo_args(tokens, tmp_path)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for r in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    check_finished(procs[0].returncode, outs[0], tmp_path, 2, "env")  # rank 0 logs and writes the records
    assert procs[1].returncode == 0 or aborted_at_exit(procs[1].returncode, outs[1]), outs[1][-4000:]
    assert losses(records(tmp_path)) == pytest.approx(torchrun_losses, rel=1e-5)


@pytest.mark.parametrize(
    "env, extra, message",
    [
        (dict(RANK="0"), [], "RANK is set but WORLD_SIZE is not"),
        (
            dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
            ["parallel.tp=3"],
            "is not divisible by parallel.tp",
        ),
    ],
)
def test_launch_errors_exit_2_with_one_message(tokens, tmp_path, env, extra, message):
    rc, out = run([sys.executable, TRAIN, *neo_args(tokens, tmp_path, *extra)], timeout=120, **env)
    assert rc == 2 and message in out, out[-3000:]
    assert "Traceback" not in out
    assert not records(tmp_path)


@pytest.mark.multiproc
def test_smoke_script_on_cpu(tmp_path):
    # launch/smoke.sh is for new GPU nodes; --cpu runs the same checks here (gloo, 2 processes)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "smoke.sh"), "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=clean_env(NEO_SMOKE_DIR=str(tmp_path)),
        timeout=600,
    )
    assert proc.returncode == 0 and "all checks passed" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    for check in ("software", "collectives", "deepspeed-ops", "train", "generate"):
        assert re.search(rf"^PASS  {check} ", proc.stdout, re.M), proc.stdout
    assert "all_reduce of 64 MiB over 2 rank(s) with gloo: correct" in proc.stdout
    assert end_codes(records(tmp_path / "run")) == [0]
