"""Rendezvous that cannot hang, without a cluster: ranks that cannot meet fail within the configured
time with a message naming host and port; a name that resolves nowhere fails at once.

(On two real SLURM nodes whose names do not resolve, tests/test_slurm_two_nodes.py shows the other half:
neo takes the node's address from SLURM, and jobs that cannot rendezvous fail within a minute.)
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from runs import ROOT, TINY, clean_env

from neo.config import ConfigError, load_config
from neo.distributed import LaunchError, free_port, master_address, ranks_by_node

TIMEOUT = 3  # s: launch.rendezvous_timeout of the runs below


def test_ranks_by_node_shows_where_each_rank_ran():
    assert ranks_by_node(["n1", "n2"]) == "n1 [0], n2 [1]"
    assert ranks_by_node(["gpu1"] * 4 + ["gpu2"] * 4) == "gpu1 [0-3], gpu2 [4-7]"
    assert ranks_by_node(["a", "b", "a", "b", "a"]) == "a [0,2,4], b [1,3]"


def test_a_master_name_that_resolves_is_kept_and_one_that_resolves_nowhere_fails_at_once(
    monkeypatch, tmp_path
):
    assert master_address("127.0.0.1", 29500) == ("127.0.0.1", "")
    assert master_address("localhost", 29500) == ("localhost", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: no SLURM to ask either
    with pytest.raises(LaunchError, match=r"cannot rendezvous at no-such-node\.invalid:29500: MASTER_ADDR="):
        master_address("no-such-node.invalid", 29500)


@pytest.mark.parametrize("key", ["launch.rendezvous_timeout", "launch.collective_timeout"])
def test_timeouts_must_be_positive(key):
    with pytest.raises(ConfigError, match=rf"{key} = 0.0 \(set in --set\) must be > 0"):
        load_config([TINY], [f"{key}=0"])
    assert getattr(load_config([TINY], [f"{key}=12.5"]).launch, key.split(".")[1]) == 12.5


def start_rank(rank: int, world: int, port: int, tmp_path, tokens: str) -> subprocess.Popen:
    """One rank of a job started by hand (RANK/WORLD_SIZE/MASTER_*), as a launcher would."""
    env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), TINY, "--set", f"logging.dir={tmp_path}/r{rank}",
           "--set", f"data.train_paths=[{tokens}]", "--set", f"launch.rendezvous_timeout={TIMEOUT}"]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_ranks_that_cannot_meet_fail_within_the_rendezvous_timeout_naming_host_and_port(
    tmp_path, sample_tokens
):
    # job A: rank 1 of 2, and nobody listens at the port. Job B: ranks 0 and 1 of 3; rank 2 never comes.
    port_a, port_b = free_port(), free_port()
    start = time.monotonic()
    procs = {
        "a1": start_rank(1, 2, port_a, tmp_path, sample_tokens),
        "b0": start_rank(0, 3, port_b, tmp_path, sample_tokens),
        "b1": start_rank(1, 3, port_b, tmp_path, sample_tokens),
    }
    out = {name: p.communicate(timeout=300)[0] for name, p in procs.items()}
    elapsed = time.monotonic() - start
    for name, p in procs.items():
        assert p.returncode == 2, f"{name}: exit {p.returncode}\n{out[name][-3000:]}"
        assert "Traceback" not in out[name], out[name][-3000:]
    # the measured wait is in the message: TIMEOUT s, or a little more on a busy machine
    a1, b0, b1 = out["a1"], out["b0"], out["b1"]
    assert re.search(rf"rank 1 of 2 could not reach rank 0 at 127\.0\.0\.1:{port_a} within [3-9] s", a1), a1
    reached = rf"reached 127\.0\.0\.1:{port_b}, but not all 3 ranks came in [3-9] s"
    assert re.search(f"rank 0 {reached}", b0) and re.search(f"rank 1 {reached}", b1), out
    # imports take a few seconds each on a busy 2-core machine; torch's own wait would be 30 minutes
    assert elapsed < TIMEOUT + 60
