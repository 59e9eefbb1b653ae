"""neo's checkpoint format: layout, manifest, atomic publication, reading, verifying, loading plans.

Generation, evaluation and export read weights from here without importing the training package;
training saves and resumes through the same modules:

    layout.py           tags, ``latest``, shard file names, parameter names across the two model forms
    manifest.py         ``neo.json``: atomic write and read
    files.py            tensor files written with their sha256; verification of a checkpoint's files
    tensors.py          full tensors from the shards of any tp/pp layout; a plain model for inference
    rng.py              each rank's random streams
    optimizer_state.py  Adam's moments (and fp32 masters) in neo's own files, for any ZeRO stage
    save.py             write + publish a checkpoint (all ranks)
    load.py             what to start from (a plan) and loading it into a model and engine
"""

from neo.checkpoint.files import verify
from neo.checkpoint.layout import META, find_latest, resolve, resolve_run_or_checkpoint
from neo.checkpoint.manifest import read_meta
from neo.checkpoint.tensors import load_full_weights, load_model
from neo.errors import CheckpointError

__all__ = [
    "META",
    "CheckpointError",
    "find_latest",
    "load_full_weights",
    "load_model",
    "read_meta",
    "resolve",
    "resolve_run_or_checkpoint",
    "verify",
]
