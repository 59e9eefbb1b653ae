"""The one place that reads the launch environment and starts the process group.

Who am I in the job, in order of precedence:

* ``RANK`` + ``WORLD_SIZE`` (+ ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): set by torchrun, the
  deepspeed launcher, or by hand;
* a SLURM job step started by ``srun``: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``,
  the step's node list (expanded with ``scontrol show hostnames``) and a port derived from the job id;
* nothing: one process. This includes ``python launch/train.py`` run directly in an sbatch script:
  the batch step has ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` but no ``SLURM_STEP_*`` variables.

Rendezvous: at MASTER_ADDR, or SLURM's NodeAddr for a node name that does not resolve; ranks that cannot
meet, or a collective whose peer is gone, fail after a deadline (``launch`` in the config) instead of
hanging. Backend: nccl with CUDA, gloo on CPU; the device is the local rank's GPU. An inconsistent
environment (half-set variables, a rank outside the world, more ranks on a node than GPUs) is a
``LaunchError`` whose message says what to fix. Also defused here: threads per rank on CPU, the g++
build of a shared-memory helper at every start, MPI discovery without a launcher, and gloo's abort
at interpreter exit.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from neo.errors import REQUEUE_EXIT, LaunchError  # noqa: F401 - LaunchError re-exported: part of this API


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "deepspeed", "env" (RANK/WORLD_SIZE by hand), "slurm" or "single"
    note: str = ""  # something the user should know about how the environment was read


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0, then released): for rendezvous and tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``node[01-03],gpu7``) with ``scontrol show hostnames``."""
    if not re.search(r"[\[\]]", nodelist):  # a plain comma-separated list needs no scontrol
        return [h for h in nodelist.split(",") if h]
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise LaunchError(
            f"could not expand SLURM_JOB_NODELIST={nodelist!r} with 'scontrol show hostnames': "
            f"{e}. Fix: run inside a SLURM allocation with scontrol on PATH, or set MASTER_ADDR."
        ) from e
    hosts = out.split()
    if not hosts:
        raise LaunchError(f"'scontrol show hostnames {nodelist}' printed no host names")
    return hosts


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed count list, e.g. ``"4(x2),3"`` -> 4, 4, 3."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(
            f"SLURM_NODEID={node_id} but the tasks-per-node list {tasks_per_node!r} has {len(counts)} node(s)"
        )
    return counts[node_id]


def _int(env, key: str, default: int | None = None) -> int:
    value = env.get(key)
    if value in (None, ""):
        if default is None:
            raise LaunchError(f"environment variable {key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {key}={value!r} is not an integer") from None


def slurm_port(job_id: int) -> int:
    """A rendezvous port from the job id, so that two jobs sharing a node do not pick the same one."""
    return 20000 + job_id % 20000


def _from_launcher(env) -> DistEnv:
    """torchrun, the deepspeed launcher, or RANK/WORLD_SIZE set by hand."""
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "env"
    world = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", 0) or _int(env, "LOCAL_SIZE", 0) or world
    addr = env.get("MASTER_ADDR") or ""
    if not addr:
        if local_world < world:
            raise LaunchError(
                f"WORLD_SIZE={world} spans several nodes ({local_world} processes here) but "
                "MASTER_ADDR is not set. Fix: set MASTER_ADDR to the host of rank 0."
            )
        addr = "127.0.0.1"
    port = _int(env, "MASTER_PORT", 29500)
    if not 0 <= local_rank < local_world:
        raise LaunchError(
            f"LOCAL_RANK={local_rank} is outside the {local_world} process(es) on this node ({launcher})"
        )
    return DistEnv(_int(env, "RANK"), world, local_rank, local_world, addr, port, launcher)


def _from_slurm_step(env) -> DistEnv:
    """A task of an ``srun`` job step."""
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    node_id = _int(env, "SLURM_NODEID", 0)
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    local_world = tasks_on_node(tasks_per_node, node_id)
    local_rank = _int(env, "SLURM_LOCALID", 0)
    if not 0 <= local_rank < local_world:
        raise LaunchError(f"SLURM_LOCALID={local_rank} is outside the {local_world} task(s) on this node")
    addr = env.get("MASTER_ADDR")
    if not addr:
        # rank 0 runs on the first node of the step (SLURM numbers tasks in node order)
        addr = slurm_hostnames(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        )[0]
    port = _int(env, "MASTER_PORT", 0) or slurm_port(_int(env, "SLURM_JOB_ID", 0))
    return DistEnv(_int(env, "SLURM_PROCID"), world, local_rank, local_world, addr, port, "slurm")


def read_env(environ=None) -> DistEnv:
    """Who am I in the job? From the launcher's variables; one process when there are none."""
    env = os.environ if environ is None else environ
    has_rank, has_world = "RANK" in env, "WORLD_SIZE" in env
    if has_rank != has_world:
        given, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise LaunchError(
            f"{given} is set but {missing} is not: the launch environment is half-defined. "
            "Fix: start with torchrun, deepspeed or srun, or unset RANK and WORLD_SIZE."
        )
    if has_rank:
        result = _from_launcher(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        result = _from_slurm_step(env)
    else:
        result = DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single")
        ntasks = env.get("SLURM_NTASKS")
        if ntasks and ntasks != "1" and "SLURM_JOB_ID" in env:
            result.note = (
                f"running one process inside SLURM job {env['SLURM_JOB_ID']} of {ntasks} tasks: "
                "start the script with srun (see slurm/train.sbatch) to use them all"
            )
    if result.world_size < 1:
        raise LaunchError(f"world size {result.world_size} ({result.launcher}) must be at least 1")
    if not 0 <= result.rank < result.world_size:
        raise LaunchError(f"rank {result.rank} is outside world size {result.world_size} ({result.launcher})")
    if result.local_world_size > result.world_size:
        raise LaunchError(
            f"{result.local_world_size} processes on this node but world size "
            f"{result.world_size} ({result.launcher})"
        )
    return result


def export(env: DistEnv) -> None:
    """Make the variables DeepSpeed and torch.distributed read agree with ``env``."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def set_threads(env: DistEnv) -> int:
    """Split the CPU cores between local ranks unless OMP_NUM_THREADS says otherwise.

    The deepspeed launcher leaves OMP_NUM_THREADS unset; two ranks on two cores each running two
    threads train ~30x slower than with one thread each. Under srun, ``--cpus-per-task`` is the
    share SLURM gave each rank; otherwise the job's CPUs on this node (``SLURM_CPUS_ON_NODE``, which
    matters where SLURM does not bind tasks to cores) are split between the node's ranks.
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ["OMP_NUM_THREADS"])
    elif env.launcher == "slurm" and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if os.environ.get("SLURM_CPUS_ON_NODE", "").isdigit():  # the job's share of a node SLURM did not bind
            cores = min(cores, int(os.environ["SLURM_CPUS_ON_NODE"]))
        threads = max(1, cores // env.local_world_size)
    torch.set_num_threads(threads)
    return threads


def device_for(env: DistEnv):
    """This rank's device: GPU ``local_rank`` with CUDA (made current), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if env.local_world_size > n or env.local_rank >= n:
        raise LaunchError(
            f"{env.local_world_size} ranks on this node but it shows {n} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Fix: launch "
            f"at most {n} processes per node (--num_gpus / --nproc_per_node / --ntasks-per-node), "
            "and let every task see all of the node's GPUs."
        )
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


_early_signal = 0


def _remember(signum, _frame) -> None:
    global _early_signal
    _early_signal = signum


def catch_warning_signal() -> None:
    """Remember a SIGUSR1 (SLURM's warning before a time limit or preemption) that arrives while the
    rank starts up, instead of dying of it; the train loop's own handler takes over later and can ask
    ``pending_signal()``. SIGTERM gets its default action, even when inherited as ignored (from the
    launcher wrapper of slurm/train-deepspeed.sbatch): launchers use it to stop ranks that fail."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _remember)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pending_signal() -> int:
    """The SIGUSR1 caught during start-up (0 if none)."""
    return _early_signal


def backend() -> str:
    return "nccl" if _has_cuda() else "gloo"


def slurm_node_addr(node: str) -> str | None:
    """The address SLURM has for ``node`` (``scontrol show node`` -> ``NodeAddr``); None if it has none."""
    cmd = ["scontrol", "show", "node", "-o", node]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", out)
    return m.group(1) if m and m.group(1) not in ("(null)", "") else None


def master_address(host: str, port: int) -> tuple[str, str]:
    """An address for MASTER_ADDR ``host`` that this rank can connect to, and how it was found.

    SLURM names nodes in slurm.conf; those names need not resolve as host names (DNS may know the
    nodes by other names, or not at all), and torch would retry an unresolvable name until its
    timeout. So a name that does not resolve is looked up in SLURM: its ``NodeAddr``.
    """
    try:
        socket.getaddrinfo(host, None)
        return host, ""
    except (socket.gaierror, UnicodeError):
        node_addr = slurm_node_addr(host)
    if node_addr:
        return node_addr, f"{host} does not resolve: SLURM's NodeAddr {node_addr}"
    raise LaunchError(
        f"cannot rendezvous at {host}:{port}: MASTER_ADDR={host!r} does not resolve as a host name here, and "
        "SLURM knows no address for a node of that name. Fix: set MASTER_ADDR to rank 0's host name or IP "
        "address, reachable from every node."
    )


def rendezvous(env: DistEnv, timeout: float, master: str = ""):
    """Meet every rank at MASTER_ADDR:MASTER_PORT (``master`` in messages) within ``timeout`` seconds.

    Rank 0 hosts the store (torchrun's agent does under torchrun); every rank connects, counts itself
    in, and waits until all have. torch's client retries a missing host for up to ~3x its timeout
    (printing C++ stack traces), so the deadline is kept here, and a LaunchError names host and port.
    """
    import torch.distributed as dist

    master = master or f"{env.master_addr}:{env.master_port}"
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    key = f"neo/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # torchrun keeps its store
    result: dict = {}

    def meet() -> None:
        try:
            store = dist.TCPStore(
                env.master_addr,
                env.master_port,
                env.world_size,
                is_master=env.rank == 0 and not agent,
                timeout=datetime.timedelta(seconds=2 * timeout),  # the deadline below comes first
                wait_for_workers=False,
                multi_tenant=not agent,
            )
            result["connected"] = True
            if store.add(f"{key}/arrived", 1) == env.world_size:
                store.set(f"{key}/all", "1")
            store.wait([f"{key}/all"])
            result["store"] = store
        except RuntimeError as e:  # DistNetworkError, DistStoreError
            result["error"] = e

    worker = threading.Thread(target=meet, name="neo-rendezvous", daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(timeout)
    if "store" in result:
        return result["store"]
    waited = time.monotonic() - start
    what = f"rank {env.rank} of {env.world_size} could not reach rank 0 at {master} within {waited:.0f} s"
    if "connected" in result:
        what = f"rank {env.rank} reached {master}, but not all {env.world_size} ranks came in {waited:.0f} s"
    detail = f" ({str(result['error']).splitlines()[0]})" if "error" in result else ""
    if "EADDRINUSE" in detail:
        raise LaunchError(
            f"rank 0 cannot listen on port {env.master_port} ({master}): it is in use. "
            "Fix: export MASTER_PORT=<a free port> (another job or a leftover process holds this one)."
        )
    raise LaunchError(
        f"rendezvous failed: {what}{detail}. Fix: check that every rank started (the first error above), "
        f"that {env.master_addr} is rank 0's node and port {env.master_port} is open between the nodes; "
        "if ranks start far apart (a slow shared filesystem), raise launch.rendezvous_timeout."
    )


def _start_process_group(env: DistEnv, store, device, collective_timeout: float) -> None:
    """torch's default group on the store every rank met at; collectives then time out after
    ``collective_timeout`` seconds, in every group (and the store, which creating a group uses)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    extra = {"device_id": device} if device.type == "cuda" and env.world_size > 1 else {}
    timeout = datetime.timedelta(seconds=collective_timeout)
    # Groups made later (neo's topology, DeepSpeed's own) get torch's default, not the world group's
    # timeout: 30 minutes for gloo. The defaults are module globals, read by every new_group().
    c10d.default_pg_timeout = timeout
    if isinstance(c10d.default_pg_nccl_timeout, datetime.timedelta):  # None without NCCL
        c10d.default_pg_nccl_timeout = timeout
    dist.init_process_group(
        backend(), store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **extra
    )
    store.set_timeout(timeout)


def node_name() -> str:
    """This rank's node: SLURM's name for it when there is one (it may differ from the host name)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def ranks_by_node(names: list[str]) -> str:
    """``"n1 [0-3], n2 [4-7]"`` from the node name of each rank, in rank order: where the ranks ran."""
    runs: dict[str, list[list[int]]] = {}
    for rank, name in enumerate(names):
        spans = runs.setdefault(name, [])
        if spans and spans[-1][1] == rank - 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(
        f"{name} [{','.join(str(a) if a == b else f'{a}-{b}' for a, b in spans)}]"
        for name, spans in runs.items()
    )


def init(rendezvous_timeout: float | None = None, collective_timeout: float | None = None) -> DistEnv:
    """Read the environment, set threads and device, meet the other ranks, start the process group.

    Ranks that cannot meet within ``rendezvous_timeout`` seconds fail naming host and port (torch would
    wait 30 minutes); a collective waiting ``collective_timeout`` seconds for a peer fails. Defaults:
    the config's ``launch`` section.
    """
    import warnings

    from neo.config.schema import LaunchConfig

    rendezvous_timeout = rendezvous_timeout or LaunchConfig.rendezvous_timeout
    collective_timeout = collective_timeout or LaunchConfig.collective_timeout

    # DeepSpeed's ZeRO calls torch collectives under names torch has deprecated: one warning per call site.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    catch_warning_signal()
    env = read_env()
    if env.note and env.rank == 0:
        print(f"neo: note: {env.note}", file=sys.stderr, flush=True)
    address, how = master_address(env.master_addr, env.master_port)
    master = f"{env.master_addr}:{env.master_port}" + (f" ({how})" if how else "")
    env = dataclasses.replace(env, master_addr=address)
    export(env)
    threads = set_threads(env)
    device = device_for(env)
    import deepspeed
    import torch.distributed

    from neo import ds_compat

    ds_compat.skip_shm_build()
    store = rendezvous(env, rendezvous_timeout, master)
    _start_process_group(env, store, device, collective_timeout)
    deepspeed.init_distributed(  # finds torch's group started: only wraps it
        dist_backend=backend(),
        auto_mpi_discovery=False,
        verbose=False,
        timeout=datetime.timedelta(seconds=collective_timeout),
        rank=env.rank,
        world_size=env.world_size,
    )
    nodes: list = [None] * env.world_size
    torch.distributed.all_gather_object(nodes, node_name())
    if env.rank == 0:
        name = f" ({_device_name(device)})" if device.type == "cuda" else f", {threads} thread(s) per rank"
        print(
            f"neo: {env.world_size} rank(s) from {env.launcher}, {env.local_world_size} on this node; "
            f"backend {backend()}; device {device}{name}; master {master}",
            flush=True,
        )
        if env.world_size > 1:
            print(f"neo: ranks by node: {ranks_by_node(nodes)}", flush=True)
    return env


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


# Exit codes after which every rank reaches shutdown() together: finished, or saved for a requeue.
_AGREED_EXITS = (0, REQUEUE_EXIT)


def shutdown(code: int) -> None:
    """End the process without Python's normal teardown.

    gloo's worker threads can abort the interpreter at exit (SIGABRT after all work is done), so
    neo synchronises, destroys the process group, flushes, and leaves with ``os._exit``. The
    barrier also matters for exit 75: launchers (srun --kill-on-bad-exit, torchrun, deepspeed) kill
    the other ranks as soon as one exits non-zero, and rank 0 must have written its records first.
    """
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            if code in _AGREED_EXITS:
                dist.barrier()
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the exit code carries the outcome
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
