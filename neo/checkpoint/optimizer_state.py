"""Optimizer state in neo's own format, so that Adam's moments survive a change of parallel layout.

DeepSpeed's own optimizer files hold flat ZeRO partitions that only the layout which wrote them can read
back. So every checkpoint also holds, per (tensor, pipeline) rank, ``optim/tpXX-ppYY.safetensors``: for
each parameter under the plain model's name, ``<name>.exp_avg`` and ``<name>.exp_avg_sq`` (split along the
same ``tp_split_dim`` as the weights) and, where the engine keeps fp32 master weights apart from
lower-precision module parameters (bf16), ``<name>.fp32``. ``neo.json`` records Adam's step count.

Loading into another layout sets each local parameter's state from those full tensors after
``deepspeed.initialize``. How the state is reached depends on the optimizer DeepSpeed built; one small
accessor class per kind:

- ``_TorchAdam``: neo's own optimizer, unwrapped (fp32 without ZeRO): the module parameters are its
  parameters, the state is ``optimizer.state[param]``.
- ``_Unfused``: DeepSpeed's FP16_UnfusedOptimizer (bf16/fp16 without ZeRO): one fp32 copy per module
  parameter, matched by position in the parameter groups.
- ``_Fragments``: ZeRO-1/2 and BF16_Optimizer: each rank owns a fragment of flat fp32 partitions;
  DeepSpeed's ``safe_get/set_full_*`` helpers map a module parameter to its fragment.
- ``_Zero3``: ZeRO-3: each parameter is partitioned across the data-parallel group; full tensors are
  gathered at save, and each rank writes its own padded slice at load.

ZeRO optimizers create Adam's state lazily in their first step, so before setting values neo creates it
(zeros and the saved ``step``) for every flat fp32 tensor the inner torch optimizer holds, exactly as
torch's AdamW would, and lets DeepSpeed link its fragments to it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from neo import ds_compat
from neo.checkpoint.files import write_safetensors
from neo.checkpoint.layout import canonical_name, shard_file
from neo.checkpoint.tensors import ShardedTensors, local_slice
from neo.errors import CheckpointError

FOLDER = "optim"
MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32"


def _fresh_adam_state(group: dict, hp: torch.Tensor, step: int) -> dict:
    """Adam's state for ``hp`` as torch's AdamW creates it in its first step, but at ``step``."""
    on_device = group.get("fused") or group.get("capturable")
    scalar = (
        torch.float64
        if torch.get_default_dtype() == torch.float64 and not group.get("fused")
        else torch.float32
    )
    return {
        "step": torch.tensor(float(step), dtype=scalar, device=hp.device if on_device else "cpu"),
        "exp_avg": torch.zeros_like(hp, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(hp, memory_format=torch.preserve_format),
    }


def _adam_problem(optimizer) -> str | None:
    """Why ``optimizer``'s state is not what neo saves (torch Adam/AdamW without amsgrad), or None."""
    if not isinstance(optimizer, torch.optim.Adam):
        return f"the optimizer is {type(optimizer).__name__}, and neo carries the state of torch's Adam/AdamW only"
    if any(g.get("amsgrad") for g in optimizer.param_groups):
        return "amsgrad keeps a third moment that neo does not carry"
    return None


def _step_of(optimizer: torch.optim.Optimizer) -> int | None:
    """Adam's step count (the same in every state entry), or None before the first step."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return None


class _Accessor:
    """Reads and writes the optimizer state of module parameters; ``optimizer`` is the torch Adam inside."""

    optimizer: torch.optim.Optimizer

    def step(self) -> int | None:
        return _step_of(self.optimizer)

    def before_read(self) -> None:
        """Make every parameter's state reachable for ``read``."""


class _TorchAdam(_Accessor):
    """neo's own torch optimizer, not wrapped: the module parameters are the optimizer's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def read(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        state = self.optimizer.state.get(p, {})
        return {k: state[k] for k in MOMENTS if k in state}

    def prepare(self, step: int) -> None:
        """Nothing to link: each parameter's state is created when it is written."""
        self.step_count = step

    def _set(self, hp: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
        state = _fresh_adam_state(self.group_of[id(hp)], hp, self.step_count)
        for k in MOMENTS:
            state[k].copy_(moments[k])
        self.optimizer.state[hp] = state

    def _moments(self, p: torch.nn.Parameter, full: dict[str, torch.Tensor], topo, key: str) -> dict:
        return {k: local_slice(full[k], p, topo, f"{key}.{k}") for k in MOMENTS}

    def write(self, p: torch.nn.Parameter, full: dict[str, torch.Tensor], topo, key: str) -> None:
        self._set(p, self._moments(p, full, topo, key))


class _Unfused(_TorchAdam):
    """DeepSpeed's FP16_UnfusedOptimizer: one fp32 master per module parameter, state keyed by the master."""

    def __init__(self, wrapper):
        super().__init__(wrapper.optimizer)
        self.master = ds_compat.unfused_masters(wrapper)

    def read(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        hp = self.master[id(p)]
        return {**super().read(hp), MASTER: hp}

    def write(self, p: torch.nn.Parameter, full: dict[str, torch.Tensor], topo, key: str) -> None:
        hp = self.master[id(p)]  # a plain copy: the split dimension is the module parameter's
        self._set(hp, self._moments(p, full, topo, key))
        with torch.no_grad():
            hp.copy_(local_slice(full[MASTER], p, topo, key))


def _read_full(p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """``p``'s full moments (and fp32 master, when the module weight is not fp32) from a ZeRO optimizer,
    through DeepSpeed's ``safe_get_full_*``: a collective over the data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
    if p.dtype != torch.float32:
        out[MASTER] = safe_get_full_fp32_param(p)
    return out


class _Fragments(_Accessor):
    """ZeRO-1/2 and BF16_Optimizer: DeepSpeed maps each module parameter to a fragment of flat fp32 partitions."""

    def __init__(self, wrapper):
        self.wrapper, self.optimizer = wrapper, wrapper.optimizer

    def before_read(self) -> None:
        """Link the fragments again, now that every group has state (see ``ds_compat.link_fragments``)."""
        ds_compat.link_fragments(self.wrapper)

    def read(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Full tensors (all-reduced over the data-parallel group: every rank calls this, in the same order)."""
        return _read_full(p)

    def prepare(self, step: int) -> None:
        """Create Adam's state for each flat partition (ZeRO makes it in the first step) and link fragments."""
        for group in self.optimizer.param_groups:
            for hp in group["params"]:
                self.optimizer.state[hp] = _fresh_adam_state(group, hp, step)
        ds_compat.link_fragments(self.wrapper)

    def write(self, p: torch.nn.Parameter, full: dict[str, torch.Tensor], topo, key: str) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        for k in MOMENTS:
            safe_set_full_optimizer_state(p, local_slice(full[k], p, topo, f"{key}.{k}").float(), k)
        if p.dtype != torch.float32:  # fp32 masters apart from the module's bf16 weights
            safe_set_full_fp32_param(p, local_slice(full[MASTER], p, topo, key).float())


class _Zero3(_Accessor):
    """ZeRO-3: every parameter is partitioned over the data-parallel group, padded to equal slices."""

    def __init__(self, wrapper):
        self.wrapper, self.optimizer = wrapper, wrapper.optimizer

    def read(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        """Full tensors (all-gathered over the data-parallel group: every rank calls this, in the same order)."""
        return _read_full(p)

    def prepare(self, step: int) -> None:
        """Create Adam's state for each flat fp32 sub-group (ZeRO-3 makes it in the first step)."""
        for hp, group in ds_compat.zero3_flat_groups(self.wrapper):
            self.optimizer.state[hp] = _fresh_adam_state(self.optimizer.param_groups[group], hp, step)

    def _own_slice(self, full: torch.Tensor, p: torch.nn.Parameter, topo, name: str) -> torch.Tensor:
        """This rank's partition of ``p``'s value: the flat tensor cut in equal, zero-padded slices."""
        shape, size, group = ds_compat.zero3_partition(p, self.wrapper)
        flat = local_slice(full, p, topo, name, shape=shape).reshape(-1).float()
        rank = dist.get_rank(group=group)
        part = flat[rank * size : (rank + 1) * size]
        return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part

    def write(self, p: torch.nn.Parameter, full: dict[str, torch.Tensor], topo, key: str) -> None:
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        for k in MOMENTS:
            safe_set_local_optimizer_state(p, self._own_slice(full[k], p, topo, f"{key}.{k}"), k)
        if p.dtype != torch.float32:  # fp32 masters apart from the module's bf16 weights
            safe_set_local_fp32_param(p, self._own_slice(full[MASTER], p, topo, key))


def accessor(engine):
    """The accessor for the optimizer DeepSpeed built, or a sentence saying why neo cannot reach its state."""
    kinds, opt = ds_compat.optimizer_kinds(), engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return _adam_problem(opt) or _TorchAdam(opt)
    inner = getattr(opt, "optimizer", None)
    problem = _adam_problem(inner)
    if problem:
        return problem
    if isinstance(opt, kinds["unfused"]):
        return _Unfused(opt)
    if isinstance(opt, kinds["fragments"]):
        if not ds_compat.can_link_fragments(opt):
            return f"this DeepSpeed version's {type(opt).__name__} has no way to link new optimizer state"
        return _Fragments(opt)
    if isinstance(opt, kinds["zero3"]):
        if ds_compat.swaps_optimizer(opt):
            return "ZeRO-3 swaps the optimizer state to NVMe, where neo cannot set it"
        return _Zero3(opt)
    return f"DeepSpeed wrapped the optimizer in {type(opt).__name__}, whose state neo cannot reach"


def save(engine, folder: str, topo) -> tuple[dict | None, dict[str, dict]]:
    """Write this (tensor, pipeline) rank's optimizer state under ``folder/optim`` (all ranks call).

    Returns what ``neo.json`` records (Adam's step count; None before the first step, when there is nothing
    to carry) and the manifest records of the files this rank wrote.
    """
    acc = accessor(engine)
    if isinstance(acc, str):
        raise CheckpointError(f"neo cannot save this run's optimizer state: {acc}. Fix: use torch's AdamW "
                              "through neo's optimizer settings (optimizer.type: adamw).")  # fmt: skip
    if acc.step() is None:
        return None, {}
    acc.before_read()
    tensors: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue  # frozen: no optimizer state
        values = acc.read(p)  # collectives over the data-parallel group for ZeRO: all ranks, same order
        if topo.coord.data == 0:
            for kind, v in values.items():
                tensors[f"{canonical_name(name)}.{kind}"] = v.detach().to("cpu", copy=True).contiguous()
    records = {}
    if topo.coord.data == 0:
        os.makedirs(os.path.join(folder, FOLDER), exist_ok=True)
        rel = shard_file(FOLDER, topo.coord.tensor, topo.coord.pipe)
        records[rel] = write_safetensors(os.path.join(folder, rel), tensors)
    return {"step": acc.step(), "masters": any(k.endswith("." + MASTER) for k in tensors)}, records


def restore(engine, path: str, meta: dict, topo) -> str | None:
    """Set the optimizer state of every local parameter from checkpoint ``path`` (any layout).

    Returns None when it was restored, else why it was not (then the optimizer starts fresh): a checkpoint
    written before neo saved optimizer state, or an optimizer neo cannot reach. No collectives.
    """
    saved = meta.get("optimizer_state")
    if not saved:
        return "this checkpoint holds no optimizer state in neo's format (saved by an older neo or before any step)"
    acc = accessor(engine)
    if isinstance(acc, str):
        return acc
    reader, weights = ShardedTensors(path, meta, FOLDER), ShardedTensors(path, meta, "weights")
    acc.prepare(int(saved["step"]))
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue  # frozen: no optimizer state
        key = canonical_name(name)
        if not reader.has(key, MOMENTS[0]):
            raise CheckpointError(
                f"checkpoint {path} has no optimizer state for {key}; it does not match this "
                "model. Fix: load it with checkpoint.load_weights_only: true."
            )
        full = {k: reader.get(key, k) for k in MOMENTS}
        # the most precise weights the checkpoint has, for layouts that keep fp32 masters apart (bf16)
        full[MASTER] = reader.get(key, MASTER) if reader.has(key, MASTER) else weights.get(key)
        acc.write(p, full, topo, key)
    return None


def masters(path: str, meta: dict) -> ShardedTensors | None:
    """The checkpoint's fp32 master weights (``<name>.fp32``), if it was trained with separate masters:
    more precise than its bf16 module weights, so a reshape starts from them."""
    saved = meta.get("optimizer_state") or {}
    return ShardedTensors(path, meta, FOLDER) if saved.get("masters") else None
