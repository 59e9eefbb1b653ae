"""Where things are in a checkpoint dir: tags, ``latest``, the manifest file, shard file names.

Layout of ``checkpoint.dir``::

    latest                  one line: the tag of the newest complete checkpoint
    iter_00000200/          one checkpoint; ``neo.json`` (its manifest) is written last
    .tmp-iter_00000300/     a save in progress (or one that crashed): never loaded, removed later
"""

from __future__ import annotations

import os
import re

from neo.errors import CheckpointError

TAG_RE = re.compile(r"^iter_(\d{8,})$")
META = "neo.json"


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def shard_file(folder: str, tensor_rank: int, pipe_rank: int) -> str:
    """``weights/`` or ``optim/`` file of one (tensor, pipeline) rank, relative to the checkpoint."""
    return os.path.join(folder, f"tp{tensor_rank:02d}-pp{pipe_rank:02d}.safetensors")


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


def resolve(path: str) -> str:
    """A checkpoint folder from a path that is either one or a checkpoint dir holding several."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    found = find_latest(path)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {path}. Fix: check checkpoint.load / the path.")
    return found


def resolve_run_or_checkpoint(path: str) -> str:
    """``path`` itself, or ``path/checkpoints`` when ``path`` is a run's logging dir (runs/quickstart):
    the folder a user has in mind after training is the run's, not the checkpoint dir inside it."""
    inner = os.path.join(path, "checkpoints")
    if not os.path.isfile(os.path.join(path, META)) and find_latest(path) is None and find_latest(inner):
        return inner
    return path


def canonical_name(name: str) -> str:
    """The plain model's parameter name for a name in the plain or the pipeline form."""
    if name.startswith("module."):
        name = name[len("module.") :]
    if name.startswith("tied_modules.embed."):
        return "layers.0." + name[len("tied_modules.embed.") :]
    head, _, rest = name.partition(".")
    return f"layers.{head}.{rest}" if head.isdigit() else name
