"""Run a function on N local processes with a gloo process group (for in-process parallel tests)."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        payload = ("ok", result)
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        payload = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(payload, f)
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        os._exit(0)  # skip interpreter teardown: gloo threads can abort it (see README, CPU notes)


def spawn(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns every rank's result, raises on any error."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _worker, args=(world, init_file, tmp, fn, args), nprocs=world, join=True, start_method="spawn"
        )
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
