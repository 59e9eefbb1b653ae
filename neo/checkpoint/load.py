"""Starting a run from a checkpoint: what to load (a plan), and loading it into a built model and engine.

A plan is ``resume`` (the same tp/pp/dp/ZeRO layout), ``reshape`` (another layout: weights and Adam
state re-split from neo's own files) or ``weights`` (fine-tuning: weights only, iteration 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from neo.checkpoint import optimizer_state
from neo.checkpoint.layout import canonical_name
from neo.checkpoint.manifest import read_meta, verify
from neo.checkpoint.rng import set_rng_state
from neo.checkpoint.tensors import ShardedTensors, local_slice
from neo.errors import CheckpointError


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class LoadPlan:
    """How a run starts from a checkpoint.

    resume: DeepSpeed's full state (weights, optimizer, LR schedule, RNG) in the same layout;
    reshape: another (tp, pp, dp, ZeRO) layout: weights and optimizer state (Adam moments, step count, fp32
    masters) from neo's own files, re-split for this layout; iteration, data position and LR schedule kept.
    The optimizer starts fresh only where neo cannot carry it (``optimizer_fresh`` says why: a checkpoint
    from before neo saved optimizer state, or an optimizer wrapper neo cannot reach);
    weights: fine-tuning: weights only, iteration 0, fresh optimizer.
    """

    path: str
    mode: str
    meta: dict
    saved_layout: dict
    optimizer_fresh: str | None = None  # reshape: why the optimizer state was not carried over, if it was not

    def describe(self) -> str:
        it, n = self.meta["iteration"], self.meta["consumed_samples"]
        if self.mode == "resume":
            return f"resumed from {self.path} (iteration {it}, {n:,} samples consumed)"
        if self.mode == "weights":
            return f"loaded the weights of {self.path} (iteration {it}); starting at iteration 0, fresh optimizer"
        s = self.saved_layout
        head = (
            f"loaded {self.path} (iteration {it}, {n:,} samples) saved with tp={s.get('tp')} pp={s.get('pp')} "
            f"dp={s.get('dp')} zero={s.get('zero')} into this layout: "
        )
        if self.optimizer_fresh is None:
            saved = self.meta.get("optimizer_state") or {}
            masters = ", fp32 master weights" if saved.get("masters") else ""
            return head + (
                f"weights, optimizer state (Adam moments at step {saved.get('step')}{masters}), "
                "iteration, data position and LR schedule carried over"
            )
        return head + (
            "weights, iteration, data position and LR schedule carried over; the optimizer state "
            f"(Adam moments) starts fresh: {self.optimizer_fresh}"
        )


def plan_load(path: str, layout: dict, weights_only: bool) -> LoadPlan:
    meta = read_meta(path)
    verify(path, meta)
    saved = meta.get("layout", {})
    same = all(saved.get(k) == layout[k] for k in ("tp", "pp", "dp", "zero"))
    mode = "weights" if weights_only else ("resume" if same else "reshape")
    return LoadPlan(path, mode, meta, saved)


def copy_weights_into(module: torch.nn.Module, path: str, topo) -> None:
    """Fill ``module`` (plain or pipeline form, any tp) with its slice of the checkpoint's full weights.

    Where the checkpoint kept fp32 master weights apart from bf16 module weights, those are the source.
    """
    meta = read_meta(path)
    weights, masters = ShardedTensors(path, meta, "weights"), optimizer_state.masters(path, meta)
    for name, p in module.named_parameters():
        key = canonical_name(name)
        if not weights.has(key):
            raise CheckpointError(f"checkpoint {path} has no weight {key}; it does not match this model.")
        use_master = masters is not None and masters.has(key, optimizer_state.MASTER)
        full = masters.get(key, optimizer_state.MASTER) if use_master else weights.get(key)
        with torch.no_grad():
            p.copy_(local_slice(full, p, topo, key).to(p.dtype))


def load(engine, path: str) -> None:
    """Resume DeepSpeed's full state (all ranks) and this rank's RNG streams from ``path``."""
    root, tag = os.path.split(os.path.normpath(path))
    try:
        loaded, _ = engine.load_checkpoint(root, tag=tag)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises many types for damaged files
        raise CheckpointError(
            f"DeepSpeed could not load {path}: {type(e).__name__}: {e}. Fix: load an earlier "
            "checkpoint (delete this folder)."
        ) from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}; files are missing or unreadable.")
    rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
