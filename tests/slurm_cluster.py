"""A throwaway SLURM cluster on localhost, one node or several, for tests of the sbatch scripts.

    with LocalSlurm(tmp_path / "slurm") as cluster:      # munged, slurmctld, slurmd under tmp_path
        job = cluster.sbatch("slurm/train.sbatch", "ds_configs/models/tiny.yml", cwd=repo)
        info = cluster.wait(job, timeout=90)            # {'JobState': 'COMPLETED', 'ExitCode': '0:0', ...}

    LocalSlurm(tmp_path / "slurm", nodes=["n1", "n2"])   # two nodes: one slurmd each, on one machine

With several nodes, Debian's Slurm (built with multiple-slurmd support) runs one slurmd per node name,
each on its own port, all with NodeAddr 127.0.0.1: ``sbatch --nodes 2`` then starts tasks on n1 and n2,
as on a real cluster. Those names do not resolve as host names (nothing edits /etc/hosts), like node
names on many real clusters: the jobs must find rank 0's address the way neo does, through SLURM.

Everything (munge key, Slurm's config, state, spool, logs, pid files) lives in one scratch
folder (munge's socket in a short folder of /tmp), on ports picked free: nothing system-wide
is touched. Needs root (slurmd and munged run as root) and Debian's packages `slurmctld slurmd
slurm-client munge`; ``unavailable_reason()`` says why a cluster cannot be had, installing the
packages with apt-get when it can. Every wait has a wall-clock deadline and ``stop()`` always
ends the daemons, with SIGKILL when they do not listen.

By hand:  python tests/slurm_cluster.py /tmp/cluster [n1,n2]   (starts it, prints the env, stops on Ctrl-C)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from neo.distributed import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"]
# squeue/scontrol states after which a job will not run again by itself.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class ClusterError(RuntimeError):
    pass


def _missing() -> list[str]:
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=sbin) is None]


def unavailable_reason(install: bool = True) -> str | None:
    """None when a cluster can be started here; otherwise why not (a pytest skip reason).

    With ``install``, missing packages are installed with apt-get (root only), as .ci/run does.
    """
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM needs Linux"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if not _missing():
        return None
    if not install or shutil.which("apt-get") is None:
        return f"SLURM is not installed (missing {', '.join(_missing())}) and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not install SLURM with apt-get: {e}"
    if proc.returncode != 0 or _missing():
        return f"could not install SLURM with apt-get (rc {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class LocalSlurm:
    def __init__(self, root: str | Path, cpus: int | None = None, nodes: Sequence[str] = ()):
        self.root = Path(root).resolve()
        self.host = socket.gethostname().split(".")[0]  # slurmctld accepts only this host's short name
        # One node: named as the host. Several: the given names, all on this host.
        self.nodes = list(nodes) or [self.host]
        self.node = self.nodes[0]
        # Jobs ask for 2 tasks a node; config_overrides lets a node offer more CPUs than the machine has.
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket: Path | None = None
        path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
        # Client commands and jobs (sbatch exports the submitter's environment) find the cluster here;
        # variables of an enclosing SLURM job would confuse both.
        own = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        self.env.update(SLURM_CONF=str(self.conf), PATH=path)
        self._pidfiles: list[Path] = []

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        for sub in ("etc", "state", "log", "run", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "run" / "slurmctld.pid")
        for node in self.nodes:
            self._daemon(
                ["slurmd", "-f", str(self.conf), "-N", node], self.root / "run" / f"slurmd-{node}.pid"
            )
        self.wait_idle(timeout)

    def wait_idle(self, timeout: float = 30) -> None:
        """Until every node is idle (up, no job)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=5)
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s ({states}); logs:\n" + self.logs())

    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.chmod(0o700)  # munged refuses keys in group- or world-accessible folders
        # ... but wants its socket where every folder on the way may be entered by all (pytest's tmp
        # folders may not), and socket paths are limited to 107 bytes: a short folder in /tmp.
        self.munge_socket = Path(tempfile.mkdtemp(prefix="neo-munge-")) / "munge.socket"
        self.munge_socket.parent.chmod(0o755)
        key = m / "munge.key"
        if not key.exists():
            subprocess.run(
                ["mungekey", "--create", f"--keyfile={key}"],
                check=True,
                capture_output=True,
                timeout=30,
                env=self.env,
            )
        key.chmod(0o600)
        self._daemon(
            [
                "munged",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={m / 'munged.log'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
            m / "munged.pid",
        )

    def _write_conf(self) -> None:
        r, host, cpus = self.root, self.host, self.cpus
        # One slurmd per node, each with its own port, state and log (%n: the node's name).
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} Boards=1 "
            f"SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        # cred_expire: a requeued job may start again only cred_expire + 1 s later (default 120 s).
        # sched_interval=1 and batch_sched_delay=0: start jobs at once, not on the next 60 s pass.
        self.conf.write_text(f"""\
ClusterName=neotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool" / "%n"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd-%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd-%n.log"}
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _daemon(self, cmd: list[str], pidfile: Path, timeout: float = 15) -> None:
        """Start a daemon that forks into the background and wait for its pid file."""
        self._pidfiles.append(pidfile)
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode != 0:
                break
            pid = self._pid(pidfile)
            if pid and _alive(pid):
                return
            time.sleep(0.1)
        raise ClusterError(
            f"{cmd[0]} did not start (rc {proc.returncode}): {proc.stderr.strip()}\n" + self.logs()
        )

    @staticmethod
    def _pid(pidfile: Path) -> int | None:
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Cancel all jobs and end the daemons (slurmd, slurmctld, munged); never raises."""
        if self.conf.exists() and self._pidfiles:
            # cancel what still runs and give SLURM KillWait (+ margin) to end it before the daemons go
            self._run(["scancel", "--user", "root"], check=False, timeout=10)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and self._run(["squeue", "-h"], check=False, timeout=5).strip():
                time.sleep(0.2)
        for pidfile in reversed(self._pidfiles):
            pid = self._pid(pidfile)
            if pid is None:
                continue
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _alive(pid):
                    break
        self._pidfiles.clear()
        if self.munge_socket is not None:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)

    # ------------------------------------------------------------------ jobs
    def _run(self, cmd: list[str], check: bool = True, timeout: float = 30, cwd=None) -> str:
        try:
            proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        except (OSError, subprocess.TimeoutExpired) as e:
            if check:
                raise ClusterError(f"{' '.join(cmd)}: {e}") from e
            return ""
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed (rc {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def command(self, *args: str, timeout: float = 30) -> str:
        """Run a SLURM client command (scontrol, scancel, ...) against this cluster."""
        return self._run(list(args), timeout=timeout)

    def sbatch(self, *args: str, cwd=None, env: dict[str, str] | None = None) -> int:
        """Submit a job; it runs with ``env`` (default: this process's), pointed at this cluster."""
        job_env = dict(self.env)
        if env is not None:
            job_env = dict(
                env,
                SLURM_CONF=str(self.conf),
                PATH=os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"]),
            )
        try:
            proc = subprocess.run(
                ["sbatch", "--parsable", *args],
                env=job_env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(f"sbatch {' '.join(args)}: {e}") from e
        if proc.returncode != 0:
            raise ClusterError(f"sbatch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The job's fields from ``scontrol show job`` (kept MinJobAge = 300 s after it ends)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False, timeout=10)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: int, timeout: float, states=FINAL_STATES) -> dict[str, str]:
        """Poll every 0.2 s until the job is in one of ``states``; its fields then."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise ClusterError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f} s "
            f"(state {info.get('JobState')!r})\n" + self.logs()
        )

    def job_pids(self, job_id: int, node: str, command: str) -> list[int]:
        """The processes of job ``job_id`` on ``node`` whose command line contains ``command``."""
        want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURMD_NODENAME={node}".encode()}
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                environ = set((proc / "environ").read_bytes().split(b"\0"))
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if want <= environ and command in cmdline and _alive(int(proc.name)):
                pids.append(int(proc.name))
        return sorted(pids)

    def logs(self, tail: int = 30) -> str:
        parts = []
        names = ["log/slurmctld.log", *(f"log/slurmd-{n}.log" for n in self.nodes), "munge/munged.log"]
        for name in names:
            p = self.root / name
            if p.exists():
                lines = p.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- neo jobs
def job_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What a user's shell would export for a job: this interpreter as PYTHON, its deepspeed script."""
    from runs import clean_env

    deepspeed = Path(sys.executable).parent / "deepspeed"
    return clean_env(
        PYTHON=sys.executable,
        DEEPSPEED=str(deepspeed if deepspeed.exists() else shutil.which("deepspeed") or "deepspeed"),
        NEO_HOSTFILE=str(tmp / "hostfile"),
        **extra,
    )


def read_log(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "(no job log)"


def wait_for_step(
    cluster: LocalSlurm, job: int, run_dir: Path, log: Path, after: int, timeout: float
) -> None:
    """Until the run logs a step beyond ``after`` (it is training then, its signal handlers set)."""
    from runs import records, steps

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s > after for s in steps(records(run_dir))):
            return
        state = cluster.job(job).get("JobState")
        if state in FINAL_STATES:
            raise AssertionError(f"job {job} ended ({state}):\n{read_log(log)}")
        time.sleep(0.2)
    raise AssertionError(f"job {job} logged no step beyond {after} in {timeout} s:\n{read_log(log)}")


if __name__ == "__main__":
    reason = unavailable_reason()
    if reason:
        sys.exit(f"no cluster: {reason}")
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/neo-slurm"
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ()  # e.g. n1,n2: a node per name
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the daemons on kill, too
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    with LocalSlurm(root, nodes=names) as c:
        print(f"cluster up ({', '.join(c.nodes)}); in another shell:  export SLURM_CONF={c.conf}", flush=True)
        print(f"Ctrl-C (or kill {os.getpid()}) stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
