"""Checkpoints that are either complete or invisible.

Layout of ``checkpoint.dir``::

    latest                  one line: the tag of the newest complete checkpoint
    iter_00000200/          DeepSpeed's files + rng/rank_*.pt + neo.json (written last)
    .tmp-iter_00000300/     a save in progress (or one that crashed): never loaded, removed later

Every rank writes under the temporary tag; after a barrier rank 0 writes ``neo.json``, renames the
folder to its final tag and atomically replaces ``latest``. Old checkpoints are pruned only after
that. neo reads its own files with ``weights_only`` loading (JSON and tensors, no pickled code).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
import torch.distributed as dist

import neo

TAG_RE = re.compile(r"^iter_(\d{8,})$")
META = "neo.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


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
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def save(engine, root: str, iteration: int, meta: dict, keep_last_n: int | None) -> str:
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
    _barrier()
    if _rank() == 0:
        meta = dict(meta, iteration=iteration, neo_version=neo.__version__)
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
        raise CheckpointError(f"{path} is not a complete neo checkpoint (no {META}; an interrupted save?). "
                              "Fix: point checkpoint.load at a folder like <dir>/iter_00001000 that has one, "
                              "or at the checkpoint dir to take its newest complete checkpoint.")
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


_SHAPE_KEYS = ("n_layers", "hidden_size", "n_heads", "ffn_hidden_size", "vocab_size", "position_embedding",
               "rotary_pct", "parallel_residual", "norm", "activation", "tie_embeddings")


def check_compatible(meta: dict, model: dict, layout: dict, path: str, weights_only: bool) -> None:
    """Refuse a checkpoint of another model shape, or (for a full resume) another parallel layout."""
    saved = meta.get("model", {})
    diffs = [f"model.{k}: saved {saved.get(k)!r}, now {model.get(k)!r}" for k in _SHAPE_KEYS
             if k in saved and saved.get(k) != model.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}. "
                              "Fix: use the model config it was trained with.")
    saved_layout = meta.get("layout", {})
    if saved_layout.get("tp") != layout["tp"] or saved_layout.get("pp") != layout["pp"]:
        raise CheckpointError(f"checkpoint {path} was saved with tp={saved_layout.get('tp')} "
                              f"pp={saved_layout.get('pp')}, this run uses tp={layout['tp']} pp={layout['pp']}. "
                              "Fix: resume with the saved tp/pp.")
    if not weights_only and (saved_layout.get("dp") != layout["dp"] or saved_layout.get("zero") != layout["zero"]):
        raise CheckpointError(f"checkpoint {path} was saved with dp={saved_layout.get('dp')} "
                              f"zero={saved_layout.get('zero')}, this run uses dp={layout['dp']} "
                              f"zero={layout['zero']}: the optimizer state is sharded differently. Fix: resume with "
                              "the saved layout, or set checkpoint.load_weights_only: true to continue with the "
                              "weights and a fresh optimizer.")


def load(engine, path: str, *, weights_only: bool) -> None:
    """Load DeepSpeed's state (all ranks) and, for a full resume, this rank's RNG state."""
    root, tag = os.path.split(os.path.normpath(path))
    loaded, _ = engine.load_checkpoint(root, tag=tag, load_module_only=weights_only,
                                       load_optimizer_states=not weights_only,
                                       load_lr_scheduler_states=not weights_only)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {path}; files are missing or unreadable.")
    if not weights_only:
        rng_file = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
