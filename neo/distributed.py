"""The one place that reads the launch environment and starts the process group.

Understands the deepspeed launcher and torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST), and no launcher at
all (one process). It also defuses the CPU traps DeepSpeed sets: threads per rank, the g++ build
of a shared-memory helper at every start, and MPI discovery without a launcher.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass


class LaunchError(RuntimeError):
    """The environment does not describe a runnable job; the message says why and what to do."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "slurm" or "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03]``) with ``scontrol show hostnames``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(f"could not expand SLURM_JOB_NODELIST={nodelist!r} with 'scontrol show hostnames': "
                          f"{e}. Fix: run inside a SLURM allocation with scontrol on PATH, or set MASTER_ADDR.") from e
    return out.split()


def _int(environ, key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def read_env(environ=None) -> DistEnv:
    """Who am I in the job? From the launcher's variables; one process when there are none."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        world = _int(env, "WORLD_SIZE")
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
        result = DistEnv(_int(env, "RANK"), world, int(env.get("LOCAL_RANK", 0)), local_world,
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
            addr = slurm_hostnames(nodelist)[0] if nodes > 1 or "[" in nodelist else nodelist.split(",")[0]
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        result = DistEnv(_int(env, "SLURM_PROCID"), world, int(env.get("SLURM_LOCALID", 0)),
                         max(1, world // nodes), addr, port, "slurm")
    else:
        result = DistEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")
    if not 0 <= result.rank < result.world_size:
        raise LaunchError(f"rank {result.rank} is outside world size {result.world_size} ({result.launcher})")
    return result


def export(env: DistEnv) -> None:
    """Make the variables DeepSpeed and torch.distributed read agree with ``env``."""
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def set_threads(env: DistEnv) -> int:
    """Split the CPU cores between local ranks unless OMP_NUM_THREADS says otherwise.

    The deepspeed launcher leaves OMP_NUM_THREADS unset; two ranks on two cores each running two
    threads train ~30x slower than with one thread each.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // env.local_world_size)
    torch.set_num_threads(threads)
    return threads


def _skip_shm_build() -> None:
    """DeepSpeed compiles a shared-memory all-reduce helper with g++ at every start on CPU (30-65 s on a
    fresh machine); it serves only its inference kernels, so neo tells it the op is unavailable."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")
    ds_torch.build_shm_op = lambda: None


def device_for(env: DistEnv):
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_rank >= n:
        raise LaunchError(f"local rank {env.local_rank} has no GPU: this node shows {n} GPU(s) but runs "
                          f"{env.local_world_size} ranks. Fix: launch at most {n} processes per node "
                          "(--num_gpus / --nproc_per_node / --ntasks-per-node).")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init(timeout_minutes: int = 30) -> DistEnv:
    """Read the environment, set threads and device, start DeepSpeed's process group (gloo or nccl)."""
    import datetime
    import warnings

    # DeepSpeed's ZeRO calls torch collectives under names torch has deprecated: one warning per call site.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    env = read_env()
    export(env)
    set_threads(env)
    import deepspeed

    _skip_shm_build()
    backend = "nccl" if _has_cuda() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes),
                               rank=env.rank, world_size=env.world_size)
    return env


def shutdown(code: int) -> None:
    """End the process without Python's normal teardown.

    gloo's worker threads can abort the interpreter at exit (SIGABRT after all work is done), so
    neo synchronises, destroys the process group, flushes, and leaves with ``os._exit``.
    """
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the exit code carries the outcome
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
