"""Writing a checkpoint so that it is either complete or invisible.

Every rank writes under ``.tmp-<tag>``; after a barrier rank 0 writes ``neo.json`` (the manifest),
renames the folder to its final tag and atomically replaces ``latest``. Older checkpoints are pruned
only after that, so a crash at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import neo
from neo.checkpoint import optimizer_state
from neo.checkpoint.layout import META, canonical_name, complete_tags, shard_file, tag_for
from neo.checkpoint.manifest import atomic_write, file_sizes
from neo.checkpoint.rng import rng_state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_weights(module: torch.nn.Module, folder: str, topo, zero_stage: int) -> dict[str, int | None]:
    """Write this (tensor, pipeline) rank's weights once per data-parallel group; return split dims."""
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        from neo import ds_compat

        gather = ds_compat.gathered_parameters(list(module.parameters()))
    splits = {canonical_name(n): getattr(p, "tp_split_dim", None) for n, p in module.named_parameters()}
    with gather:
        if topo.coord.data == 0:
            state = {
                canonical_name(n): t.detach().cpu().clone().contiguous()
                for n, t in module.state_dict().items()
                if canonical_name(n) in splits
            }
            os.makedirs(os.path.join(folder, "weights"), exist_ok=True)
            save_file(state, os.path.join(folder, shard_file("weights", topo.coord.tensor, topo.coord.pipe)))
    return splits


def _gather_splits(splits: dict) -> dict:
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, splits)
        splits = {k: v for part in gathered for k, v in part.items()}
    return splits


def save(
    engine, root: str, iteration: int, meta: dict, keep_last_n: int | None, topo=None, zero_stage: int = 0
) -> str:
    """Save a checkpoint of ``engine`` at ``iteration`` and publish it atomically (all ranks call)."""
    tag, tmp_tag = tag_for(iteration), ".tmp-" + tag_for(iteration)
    tmp_dir, final_dir = os.path.join(root, tmp_tag), os.path.join(root, tag)
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    os.makedirs(os.path.join(tmp_dir, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp_dir, "rng", f"rank_{_rank():05d}.pt"))
    splits = _save_weights(engine.module, tmp_dir, topo, zero_stage) if topo is not None else {}
    optim = optimizer_state.save(engine, tmp_dir, topo) if topo is not None else None
    splits = _gather_splits(splits)
    _barrier()
    if _rank() == 0:
        meta = dict(meta, iteration=iteration, neo_version=neo.__version__, tp_split=splits)
        meta.update(optimizer_state=optim, files=file_sizes(tmp_dir))
        atomic_write(os.path.join(tmp_dir, META), json.dumps(meta, indent=1))
        if os.path.isdir(final_dir):  # a re-save of the same step (e.g. a signal right after a save)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write(os.path.join(root, "latest"), tag + "\n")
        _prune(root, keep_last_n)
    _barrier()
    return final_dir


def _prune(root: str, keep_last_n: int | None) -> None:
    for name in os.listdir(root):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last_n:
        for tag in complete_tags(root)[:-keep_last_n]:
            shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
