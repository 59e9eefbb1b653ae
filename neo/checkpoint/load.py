"""Starting a run from a checkpoint: what to load (a plan), and loading it into a built model and engine.

A plan is ``resume`` (the same tp/pp/dp/ZeRO layout), ``reshape`` (another layout) or ``weights``
(fine-tuning: weights only, iteration 0, fresh optimizer). Resume and reshape load the same files the
same way: the weights go into the model before DeepSpeed builds its fp32 masters from them, then Adam's
state, the LR schedule, the loss scaler and DeepSpeed's step counters are set in the built engine. A
resume also restores each rank's random streams, so it continues bit for bit as if never stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from neo.checkpoint import optimizer_state
from neo.checkpoint.files import has_checksums, verify
from neo.checkpoint.layout import canonical_name
from neo.checkpoint.manifest import read_meta
from neo.checkpoint.rng import set_rng_state
from neo.checkpoint.tensors import ShardedTensors, local_slice
from neo.errors import CheckpointError


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class LoadPlan:
    """How a run starts from a checkpoint (see the module docstring).

    ``optimizer_fresh`` says why the optimizer state was not carried over, when it was not (a checkpoint
    from before neo saved optimizer state)."""

    path: str
    mode: str
    meta: dict
    saved_layout: dict
    verified: str = (
        "checksums"  # "checksums", "sizes" (checkpoint.verify off) or "sizes (no checksums saved)"
    )
    optimizer_fresh: str | None = None

    def describe(self) -> str:
        it, n = self.meta["iteration"], self.meta["consumed_samples"]
        checked = f"; files verified by {self.verified}"
        if self.mode == "resume":
            fresh = f"; the optimizer state (Adam moments) starts fresh: {self.optimizer_fresh}"
            return (f"resumed from {self.path} (iteration {it}, {n:,} samples consumed{checked})"
                    f"{fresh if self.optimizer_fresh else ''}")  # fmt: skip
        if self.mode == "weights":
            return (f"loaded the weights of {self.path} (iteration {it}{checked}); starting at iteration 0, "
                    "fresh optimizer")  # fmt: skip
        s = self.saved_layout
        head = (f"loaded {self.path} (iteration {it}, {n:,} samples{checked}) saved with tp={s.get('tp')} "
                f"pp={s.get('pp')} dp={s.get('dp')} zero={s.get('zero')} into this layout: ")  # fmt: skip
        if self.optimizer_fresh is None:
            saved = self.meta.get("optimizer_state") or {}
            masters = ", fp32 master weights" if saved.get("masters") else ""
            return head + (f"weights, optimizer state (Adam moments at step {saved.get('step')}{masters}), "
                           "iteration, data position and LR schedule carried over")  # fmt: skip
        return head + ("weights, iteration, data position and LR schedule carried over; the optimizer state "
                       f"(Adam moments) starts fresh: {self.optimizer_fresh}")  # fmt: skip


def plan_load(path: str, layout: dict, weights_only: bool, checksums: bool = True) -> LoadPlan:
    """Read and verify checkpoint ``path`` (sizes always; contents with ``checksums``) and plan its loading."""
    meta = read_meta(path)
    verify(path, meta, checksums=checksums)
    if not checksums:
        verified = "sizes (checkpoint.verify is off: contents not checked)"
    else:
        verified = (
            "checksums" if has_checksums(meta) else "sizes (it has no checksums: saved by an older neo)"
        )
    saved = meta.get("layout", {})
    same = all(saved.get(k) == layout[k] for k in ("tp", "pp", "dp", "zero"))
    mode = "weights" if weights_only else ("resume" if same else "reshape")
    return LoadPlan(path, mode, meta, saved, verified)


def copy_weights_into(module: torch.nn.Module, path: str, topo, only_present: bool = False) -> None:
    """Fill ``module`` (plain or pipeline form, any tp) with its slice of the checkpoint's full weights.

    Where the checkpoint kept fp32 master weights apart from bf16 module weights, those are the source.
    Parameters the checkpoint lacks are refused, unless the model adds them (``neo_fresh``: a new head,
    LoRA adapters) or ``only_present`` (a LoRA checkpoint holds its adapters alone).
    """
    meta = read_meta(path)
    weights, masters = ShardedTensors(path, meta, "weights"), optimizer_state.masters(path, meta)
    for name, p in module.named_parameters():
        key = canonical_name(name)
        if not weights.has(key) and (only_present or getattr(p, "neo_fresh", False)):
            continue
        if not weights.has(key):
            raise CheckpointError(f"checkpoint {path} has no weight {key}; it does not match this model.")
        use_master = masters is not None and masters.has(key, optimizer_state.MASTER)
        full = masters.get(key, optimizer_state.MASTER) if use_master else weights.get(key)
        with torch.no_grad():
            p.copy_(local_slice(full, p, topo, key).to(p.dtype))


def restore_training_state(engine, scheduler, plan: LoadPlan, topo) -> None:
    """After ``deepspeed.initialize``: Adam's state, the LR schedule, the loss scaler and DeepSpeed's step
    counters (any layout), and on a resume each rank's random streams. No collectives."""
    from neo import ds_compat

    meta = plan.meta
    plan.optimizer_fresh = optimizer_state.restore(engine, plan.path, meta, topo)
    scheduler.load_state_dict(meta.get("lr_schedule") or {"last_step": int(meta["iteration"])})
    if meta.get("engine"):
        ds_compat.set_engine_state(engine, meta["engine"])
    rng_file = os.path.join(plan.path, "rng", f"rank_{_rank():05d}.safetensors")
    if plan.mode == "resume" and os.path.isfile(rng_file):
        from safetensors.torch import load_file

        set_rng_state(load_file(rng_file))


def objective_tensors(plan: LoadPlan) -> dict[str, torch.Tensor]:
    """This rank's objective tensors of a checkpoint (an RL rollout), or none."""
    from safetensors.torch import load_file

    path = os.path.join(plan.path, "objective", f"rank_{_rank():05d}.safetensors")
    return load_file(path) if os.path.isfile(path) else {}
