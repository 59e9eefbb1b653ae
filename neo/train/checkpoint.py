"""Checkpoints that are either complete or invisible.

Layout of ``checkpoint.dir``::

    latest                  one line: the tag of the newest complete checkpoint
    iter_00000200/          DeepSpeed's files, rng/rank_*.pt, weights/ and optim/tp*-pp*.safetensors, neo.json (last)
    .tmp-iter_00000300/     a save in progress (or one that crashed): never loaded, removed later

Every rank writes under the temporary tag; after a barrier rank 0 writes ``neo.json``, renames the
folder to its final tag and atomically replaces ``latest``. Old checkpoints are pruned only after
that. neo reads its own files with ``weights_only`` loading (JSON and tensors, no pickled code).

Besides DeepSpeed's resumable state, each checkpoint holds the model weights in neo's own format:
one safetensors file per (tensor, pipeline) rank, with parameters under the plain model's names and
``neo.json`` recording which dimension each was split along; and the optimizer state the same way
(``optim/``, see ``neo.train.optimizer_state``). Generation, evaluation, export and loading into another
parallel layout read those, without DeepSpeed and without unpickling. ``neo.json`` also lists the size of
every file, so a truncated checkpoint is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

import neo
from neo.errors import CheckpointError  # noqa: F401 - re-exported: part of this module's API
from neo.parallel import random as tp_random

TAG_RE = re.compile(r"^iter_(\d{8,})$")
META = "neo.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """This rank's random streams: torch's default (CPU and CUDA) and the tensor-parallel dropout one."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state.update({f"tp_{k}": v for k, v in tp_random.get_state().items()})
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tp = {k[3:]: v for k, v in state.items() if k.startswith("tp_")}
    if tp:
        tp_random.set_state(tp)


def complete_tags(root: str) -> list[str]:
    """Published checkpoints in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isfile(os.path.join(root, t, META))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_latest(root: str) -> str | None:
    """The folder of the newest complete checkpoint under ``root``, or None."""
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if TAG_RE.match(tag) and os.path.isfile(os.path.join(root, tag, META)):
            return os.path.join(root, tag)
    tags = complete_tags(root)
    return os.path.join(root, tags[-1]) if tags else None


def canonical_name(name: str) -> str:
    """The plain model's parameter name for a name in the plain or the pipeline form."""
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("tied_modules.embed."):
        return "layers.0." + name[len("tied_modules.embed.") :]
    head, _, rest = name.partition(".")
    return f"layers.{head}.{rest}" if head.isdigit() else name


def _save_weights(module: torch.nn.Module, folder: str, topo, zero_stage: int) -> dict[str, int | None]:
    """Write this (tensor, pipeline) rank's weights once per data-parallel group; return split dims."""
    import contextlib

    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    splits = {canonical_name(n): getattr(p, "tp_split_dim", None) for n, p in module.named_parameters()}
    with gather:
        if topo.coord.data == 0:
            state = {
                canonical_name(n): t.detach().cpu().clone().contiguous()
                for n, t in module.state_dict().items()
                if canonical_name(n) in splits
            }
            os.makedirs(os.path.join(folder, "weights"), exist_ok=True)
            save_file(
                state,
                os.path.join(
                    folder, "weights", f"tp{topo.coord.tensor:02d}-pp{topo.coord.pipe:02d}.safetensors"
                ),
            )
    return splits


def _save_optimizer_state(engine, folder: str, topo) -> dict | None:
    from neo.train import optimizer_state  # it builds on this module's readers

    return optimizer_state.save(engine, folder, topo)


def _manifest(folder: str) -> dict[str, int]:
    sizes = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            full = os.path.join(dirpath, f)
            sizes[os.path.relpath(full, folder)] = os.path.getsize(full)
    return sizes


def verify(path: str, meta: dict) -> None:
    """Every file the manifest lists is present with its recorded size."""
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {rel} is missing. Fix: load an earlier "
                "checkpoint (delete this folder and `latest` falls back to the previous one)."
            )
        if os.path.getsize(full) != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {rel} has {os.path.getsize(full):,} bytes, "
                f"{size:,} were written. Fix: load an earlier checkpoint (delete this folder)."
            )


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
    optim = _save_optimizer_state(engine, tmp_dir, topo) if topo is not None else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, splits)
        splits = {k: v for part in gathered for k, v in part.items()}
    _barrier()
    if _rank() == 0:
        meta = dict(
            meta,
            iteration=iteration,
            neo_version=neo.__version__,
            tp_split=splits,
            optimizer_state=optim,
            files=_manifest(tmp_dir),
        )
        _atomic_write(os.path.join(tmp_dir, META), json.dumps(meta, indent=1))
        if os.path.isdir(final_dir):  # a re-save of the same step (e.g. a signal right after a save)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        _atomic_write(os.path.join(root, "latest"), tag + "\n")
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


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(
            f"{path} is not a complete neo checkpoint (no {META}; an interrupted save?). "
            "Fix: point checkpoint.load at a folder like <dir>/iter_00001000 that has one, "
            "or at the checkpoint dir to take its newest complete checkpoint."
        )
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path} is unreadable ({e}); the checkpoint is corrupt.") from None


def resolve(path: str) -> str:
    """A checkpoint folder from a path that is either one or a checkpoint dir holding several."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}. Fix: check checkpoint.load / the path.")
    return found


def _shape(model: dict) -> dict:
    """What makes two models' weights interchangeable (defaults like ffn_hidden_size=None resolved)."""
    from neo.model.args import ModelArgs

    a = ModelArgs(**model)
    shape = {
        k: getattr(a, k)
        for k in (
            "n_layers",
            "hidden_size",
            "n_heads",
            "ffn_size",
            "vocab_size",
            "position_embedding",
            "rotary_dim",
            "parallel_residual",
            "norm",
            "activation",
            "tie_embeddings",
        )
    }
    if a.position_embedding == "learned":
        shape["max_positions"] = a.max_positions
    return shape


def check_compatible(meta: dict, model: dict, path: str) -> None:
    """Refuse a checkpoint of another model shape."""
    saved, now = _shape(meta.get("model", {})), _shape(model)
    diffs = [f"model.{k}: saved {saved[k]!r}, now {now[k]!r}" for k in saved if saved[k] != now.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}. "
            "Fix: use the model config it was trained with."
        )


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


def local_slice(full: torch.Tensor, p: torch.nn.Parameter, topo, name: str, shape=None) -> torch.Tensor:
    """This tensor-parallel rank's part of checkpoint tensor ``name`` for parameter ``p`` (split along
    ``tp_split_dim``). ``shape``: the local shape to expect when ``p`` no longer has it (ZeRO-3 partitions it)."""
    dim = getattr(p, "tp_split_dim", None)
    part = full.chunk(topo.tp, dim=dim)[topo.coord.tensor] if dim is not None else full
    want = tuple(shape if shape is not None else p.shape)
    if tuple(part.shape) != want:
        raise CheckpointError(
            f"checkpoint tensor {name} has shape {tuple(full.shape)}, {tuple(part.shape)} for this "
            f"rank; the model expects {want}: the checkpoint does not match this model."
        )
    return part


def copy_weights_into(module: torch.nn.Module, path: str, topo) -> None:
    """Fill ``module`` (plain or pipeline form, any tp) with its slice of the checkpoint's full weights.

    Where the checkpoint kept fp32 master weights apart from bf16 module weights, those are the source.
    """
    from neo.train import optimizer_state  # it builds on this module's readers

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


class ShardedTensors:
    """Full (unsplit) tensors of one kind of neo file in a checkpoint, ``weights/`` or ``optim/``, read one
    at a time: TP shards concatenated along the split the checkpoint recorded, the first pipeline stage that
    holds a name wins (a tied weight is on the first and the last stage, with the same values)."""

    def __init__(self, path: str, meta: dict, folder: str):
        layout = meta.get("layout", {})
        tp, pp = int(layout.get("tp", 1)), int(layout.get("pp", 1))
        self.path, self.splits = path, meta.get("tp_split", {})
        self.files: dict[str, list[str]] = {}  # tensor key -> its shard files, tensor rank order
        for stage in range(pp):
            files = [os.path.join(path, folder, f"tp{t:02d}-pp{stage:02d}.safetensors") for t in range(tp)]
            for file in files:
                if not os.path.isfile(file):
                    raise CheckpointError(
                        f"checkpoint {path} lacks {os.path.relpath(file, path)} (saved with "
                        f"tp={tp} pp={pp}). Fix: load an earlier checkpoint."
                    )
            for key in self._read(files[0], lambda f: list(f.keys())):
                self.files.setdefault(key, files)

    def _read(self, file: str, fn):
        try:
            with safe_open(file, framework="pt") as f:
                return fn(f)
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise CheckpointError(f"{file} is unreadable ({e}); the checkpoint is corrupt.") from None

    @staticmethod
    def _key(name: str, kind: str | None) -> str:
        return name if kind is None else f"{name}.{kind}"

    def names(self) -> list[str]:
        return list(self.files)

    def has(self, name: str, kind: str | None = None) -> bool:
        return self._key(name, kind) in self.files

    def get(self, name: str, kind: str | None = None) -> torch.Tensor:
        """The full tensor of parameter ``name`` (``kind``: e.g. ``exp_avg`` in ``optim/``; None in ``weights/``)."""
        key = self._key(name, kind)
        files = self.files[key]
        dim = self.splits.get(name)
        if dim is None:
            return self._read(files[0], lambda f: f.get_tensor(key))
        shards = [self._read(file, lambda f: f.get_tensor(key)) for file in files]
        return torch.cat(shards, dim=dim) if len(shards) > 1 else shards[0]


def load_full_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The unsplit model weights of checkpoint ``path`` (TP shards concatenated, PP stages joined)."""
    path = resolve(path)
    meta = read_meta(path)
    verify(path, meta)
    weights = ShardedTensors(path, meta, "weights")
    return {name: weights.get(name) for name in weights.names()}, meta


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A plain (tp = 1, pp = 1) ``GPT`` with the weights of checkpoint ``path``, in eval mode.

    Returns (model, ModelArgs, meta). Works for any tp/pp/dp/ZeRO layout the checkpoint was saved with.
    """
    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT

    state, meta = load_full_weights(path)
    args = ModelArgs(**meta["model"])
    model = GPT(args)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its recorded model shape: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), args, meta
