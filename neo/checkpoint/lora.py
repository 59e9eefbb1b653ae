"""LoRA checkpoints hold their adapters alone, plus the path and manifest hash of the base checkpoint whose
weights they adapt; these find and check that base."""

from __future__ import annotations

import hashlib
import os

from neo.checkpoint.files import verify
from neo.checkpoint.manifest import read_meta
from neo.errors import CheckpointError


def lora_base(meta: dict, path: str, checksums: bool = True) -> str:
    """The base checkpoint a LoRA checkpoint's adapters belong to, checked against the hash it recorded."""
    base = meta["lora"]["base"]
    manifest = os.path.join(base["path"], "neo.json")
    if not os.path.isfile(manifest):
        raise CheckpointError(f"LoRA checkpoint {path} needs its base checkpoint {base['path']}, which is gone. Fix: "
                              "restore that folder (the adapters alone are not a model).")  # fmt: skip
    with open(manifest, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != base["sha256"]:
        raise CheckpointError(f"LoRA checkpoint {path} was trained on a different {base['path']} (its manifest's "
                              "sha256 changed). Fix: restore the base checkpoint it was trained on.")  # fmt: skip
    verify(base["path"], read_meta(base["path"]), checksums=checksums)
    return base["path"]


def base_record(path: str) -> dict:
    """What a LoRA checkpoint records of the checkpoint its base weights come from: path and manifest hash."""
    with open(os.path.join(path, "neo.json"), "rb") as f:
        return {"path": os.path.abspath(path), "sha256": hashlib.sha256(f.read()).hexdigest()}
