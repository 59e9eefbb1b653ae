"""Writing checkpoint files with their checksum, and verifying them.

Every file a checkpoint holds is listed in its manifest (``neo.json``) with its size and sha256. The hash
is computed from the bytes as they are written (``write_safetensors`` streams each tensor's bytes to the
file and the hash together), so saving reads nothing back. Verifying reads each file once; across the
ranks of a job each rank hashes its share of the files and all agree on the outcome.

The tensor files are safetensors (https://github.com/huggingface/safetensors, "format"): an 8-byte
little-endian header length, a JSON header (dtype, shape, byte offsets per tensor, padded with spaces to
8 bytes), then the tensors' bytes back to back. Any safetensors reader opens them.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from neo.errors import CheckpointError

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_CHUNK = 1 << 24  # bytes hashed and written at a time


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes without a copy (one if it is not contiguous)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict:
    """Write ``tensors`` as a safetensors file at ``path``; return its manifest record (bytes, sha256)."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    digest, written = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for piece in (len(head).to_bytes(8, "little"), head):
            f.write(piece)
            digest.update(piece)
            written += len(piece)
        for name in names:
            data = _bytes_of(tensors[name])
            for start in range(0, len(data), _CHUNK):
                piece = data[start : start + _CHUNK]
                f.write(piece)
                digest.update(piece)
                written += len(piece)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": written, "sha256": digest.hexdigest()}


def file_digest(path: str) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str) -> dict:
    """The manifest record of a file written by other means (a copied tokenizer file): size and sha256."""
    return {"bytes": os.path.getsize(path), "sha256": file_digest(path)}


def _record(value) -> dict:
    """A manifest entry: neo <= 0.1 checkpoints recorded the size alone."""
    return value if isinstance(value, dict) else {"bytes": int(value)}


def check_file(path: str, rel: str, record, checksums: bool = True) -> str | None:
    """Why file ``rel`` of checkpoint ``path`` does not match its manifest record, or None when it does."""
    record, full = _record(record), os.path.join(path, rel)
    if not os.path.isfile(full):
        return (f"checkpoint {path} is incomplete: {rel} is missing. Fix: load an earlier checkpoint (delete "
                "this folder and `latest` falls back to the previous one).")  # fmt: skip
    size = os.path.getsize(full)
    if size != record["bytes"]:
        return (f"checkpoint {path} is corrupt: {rel} has {size:,} bytes, {record['bytes']:,} were written. "
                "Fix: load an earlier checkpoint (delete this folder).")  # fmt: skip
    if checksums and "sha256" in record and file_digest(full) != record["sha256"]:
        return (f"checkpoint {path} is corrupt: {rel} does not match the sha256 recorded when it was written "
                "(its content changed on disk). Fix: load an earlier checkpoint (delete this folder).")  # fmt: skip
    return None


def verify(path: str, meta: dict, *, checksums: bool = True) -> None:
    """Every file of the manifest is there with its size and (with ``checksums``) its content.

    Under torch.distributed each rank hashes every world-size-th file and the ranks agree on the first
    problem, so a job reads each file once and every rank raises the same error."""
    import torch.distributed as dist

    files = sorted(meta.get("files", {}).items())
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    problems = [p for rel, rec in files[rank::world] if (p := check_file(path, rel, rec, checksums))]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for part in gathered for p in part)
    if problems:
        raise CheckpointError(problems[0])


def has_checksums(meta: dict) -> bool:
    files = meta.get("files", {})
    return bool(files) and all(isinstance(v, dict) and "sha256" in v for v in files.values())
