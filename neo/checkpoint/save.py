"""Writing a checkpoint so that it is either complete or invisible, in neo's own format only.

A checkpoint holds everything a run needs to continue exactly, in any layout, and nothing twice:

    weights/tp{t}-pp{p}.safetensors   the module's parameters under the plain model's names (one per TP x PP rank)
    optim/tp{t}-pp{p}.safetensors     Adam's moments (+ fp32 masters where the module is bf16/fp16)
    rng/rank_{r}.safetensors          each rank's random streams
    neo.json                          the manifest: run config, model shape, layout, iteration, data position,
                                      LR schedule, loss scaler, and every file with its size and sha256

Every rank writes under ``.tmp-<tag>``; after a barrier rank 0 writes ``neo.json``, renames the folder to its
final tag and atomically replaces ``latest``. Older checkpoints are pruned only after that, so a crash at any
moment leaves the previous checkpoint loadable. No pickle is written or read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import torch
import torch.distributed as dist

import neo
from neo.checkpoint import optimizer_state
from neo.checkpoint.files import write_safetensors
from neo.checkpoint.layout import META, canonical_name, complete_tags, shard_file, tag_for
from neo.checkpoint.manifest import atomic_write
from neo.checkpoint.rng import rng_state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_weights(module: torch.nn.Module, folder: str, topo, zero_stage: int, trainable_only: bool = False
                  ) -> tuple[dict, dict]:  # fmt: skip
    """Write this (tensor, pipeline) rank's weights once per data-parallel group (``trainable_only``: the
    parameters that train, a LoRA run's adapters, whose base stays in its own checkpoint).

    Returns (split dimension of every parameter written, manifest records of the files written)."""
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        from neo import ds_compat

        gather = ds_compat.gathered_parameters(list(module.parameters()))
    splits = {canonical_name(n): getattr(p, "tp_split_dim", None) for n, p in module.named_parameters()
              if p.requires_grad or not trainable_only}  # fmt: skip
    records = {}
    with gather:
        if topo.coord.data == 0:
            state = {canonical_name(n): t.detach().cpu() for n, t in module.state_dict().items()
                     if canonical_name(n) in splits}  # fmt: skip
            os.makedirs(os.path.join(folder, "weights"), exist_ok=True)
            rel = shard_file("weights", topo.coord.tensor, topo.coord.pipe)
            records[rel] = write_safetensors(os.path.join(folder, rel), state)
    return splits, records


def _save_rng(folder: str) -> dict:
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    rel = os.path.join("rng", f"rank_{_rank():05d}.safetensors")
    return {rel: write_safetensors(os.path.join(folder, rel), rng_state())}


def _save_extra(folder: str, tensors: dict) -> dict:
    """This rank's objective tensors (an RL run's rollout in training), if it has any."""
    if not tensors:
        return {}
    os.makedirs(os.path.join(folder, "objective"), exist_ok=True)
    rel = os.path.join("objective", f"rank_{_rank():05d}.safetensors")
    return {rel: write_safetensors(os.path.join(folder, rel), tensors)}


def _gather(part: dict) -> dict:
    """The union of every rank's dict (rank 0 uses it)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return part
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return {k: v for p in gathered for k, v in p.items()}


def save(engine, root: str, iteration: int, meta: dict, keep_last_n: int | None, topo, zero_stage: int = 0,
         trainable_only: bool = False, extra: dict | None = None) -> str:  # fmt: skip
    """Save a checkpoint of ``engine`` at ``iteration`` and publish it atomically (all ranks call).

    ``meta`` is what the run records beside the tensors (config, model shape, layout, data position, the LR
    schedule's and the loss scaler's state...)."""
    tag, tmp_tag = tag_for(iteration), ".tmp-" + tag_for(iteration)
    tmp_dir, final_dir = os.path.join(root, tmp_tag), os.path.join(root, tag)
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _barrier()
    splits, files = _save_weights(engine.module, tmp_dir, topo, zero_stage, trainable_only)
    optim, optim_files = optimizer_state.save(engine, tmp_dir, topo)
    files = _gather({**files, **optim_files, **_save_rng(tmp_dir), **_save_extra(tmp_dir, extra or {})})
    splits = _gather(splits)
    _barrier()
    if _rank() == 0:
        meta = dict(meta, iteration=iteration, neo_version=neo.__version__, tp_split=splits)
        meta.update(optimizer_state=optim, files=dict(sorted(files.items())))
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
