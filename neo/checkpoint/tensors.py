"""Reading neo's tensor files: full (unsplit) tensors from the shards of any tp/pp layout, and a model.

Weights live in ``weights/tp{t}-pp{p}.safetensors`` under the plain model's parameter names; ``neo.json``
records which dimension each tensor-parallel parameter was split along. Nothing here unpickles.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from neo.checkpoint.files import verify
from neo.checkpoint.layout import resolve, shard_file
from neo.checkpoint.manifest import read_meta
from neo.errors import CheckpointError


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
            files = [os.path.join(path, shard_file(folder, t, stage)) for t in range(tp)]
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


def load_full_weights(path: str, *, checksums: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The unsplit model weights of checkpoint ``path`` (TP shards concatenated, PP stages joined), after
    verifying its files (sizes, and contents unless ``checksums`` is False). A LoRA checkpoint's adapters come
    back merged into its base's weights."""
    path = resolve(path)
    meta = read_meta(path)
    verify(path, meta, checksums=checksums)
    weights = ShardedTensors(path, meta, "weights")
    state = {name: weights.get(name) for name in weights.names()}
    if (meta.get("lora") or {}).get("base"):  # adapters alone: folded into their base's weights
        from neo.checkpoint.lora import lora_base
        from neo.model.lora import merge

        base_state, _ = load_full_weights(lora_base(meta, path, checksums), checksums=checksums)
        from neo.model.args import ModelArgs
        from neo.model.gpt import parameter_names

        names = parameter_names(ModelArgs(**meta["model"]))  # a reward model's base has an LM head it lacks
        state = merge({k: v for k, v in base_state.items() if k in names}, state, meta["lora"]["spec"])
    return state, meta


def _shape(model: dict) -> dict:
    """What makes two models' weights interchangeable (defaults like ffn_hidden_size=None resolved)."""
    from neo.model.args import ModelArgs

    a = ModelArgs(**model)
    keys = ("n_layers", "hidden_size", "n_heads", "ffn_size", "vocab_size", "position_embedding", "rotary_dim",
            "parallel_residual", "norm", "activation", "tie_embeddings", "bias", "head", "value_head")  # fmt: skip
    shape = {k: getattr(a, k) for k in keys}
    shape.update(n_kv_heads=a.kv_heads, qkv_bias=a.use_qkv_bias)  # resolved: None means "as n_heads / bias"
    if a.position_embedding == "learned":
        shape["max_positions"] = a.max_positions
    return shape


HEADS = ("head", "value_head")  # a fine-tune may change the heads: new ones start from their initialisation


def check_compatible(meta: dict, model: dict, path: str, heads_may_differ: bool = False) -> None:
    """Refuse a checkpoint of another model shape (the output heads may differ when only its weights seed a
    fine-tune, e.g. a reward model started from a language model)."""
    saved, now = _shape(meta.get("model", {})), _shape(model)
    keys = [k for k in saved if not (heads_may_differ and k in HEADS)]
    diffs = [f"model.{k}: saved {saved[k]!r}, now {now[k]!r}" for k in keys if saved[k] != now.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} holds a different model shape: {'; '.join(diffs)}. "
            "Fix: use the model config it was trained with."
        )


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
               checksums: bool = True):  # fmt: skip
    """A plain (tp = 1, pp = 1) ``GPT`` with the weights of checkpoint ``path``, in eval mode.

    Returns (model, ModelArgs, meta). Works for any tp/pp/dp/ZeRO layout the checkpoint was saved with.
    """
    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT

    state, meta = load_full_weights(path, checksums=checksums)
    args = ModelArgs(**meta["model"])
    model = GPT(args) if dtype is None else GPT(args).to(dtype)  # fp64 weights must not pass through fp32
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match its recorded model shape: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
    return model.eval(), args, meta
