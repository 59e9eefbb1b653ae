"""A transformers folder (GPTNeoX, Llama, Mistral, Qwen2) as a weights-only neo checkpoint.

The checkpoint is what training writes, minus optimizer and DeepSpeed state: ``weights/tp{t}-pp{p}`` files
under the plain model's names, split for the tp/pp asked for (any layout loads into any other anyway),
and ``neo.json``. Its tokenizer files are copied into ``tokenizer/`` and recorded as the checkpoint's
tokenizer (``hf:<folder>``), so generating from it needs no flags. The config.json is kept in the
manifest, so an export of the model writes the same token ids and initializer range back.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from neo.checkpoint.files import file_record, write_safetensors
from neo.checkpoint.layout import shard_file
from neo.errors import CheckpointError, UsageError
from neo.export.hf import FAMILIES, args_from_hf_config, new_folder, publish
from neo.model.args import ModelArgs


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder: model*.safetensors (sharded or not), else pytorch_model*.bin."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    files = sorted(src.glob("model*.safetensors")) or sorted(src.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    if not files:
        for file in sorted(src.glob("pytorch_model*.bin")):
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    if not state:
        raise CheckpointError(f"{src} holds no model.safetensors or pytorch_model.bin")
    # rotary tables some older checkpoints saved: computed, not parameters
    return {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _tokenizer(src: Path, tmp: Path, out: Path, spec: str | None) -> tuple[str | None, str | None]:
    """(spec, name) of the tokenizer to record: ``spec`` when given; else the folder's tokenizer.json, copied
    into the checkpoint (``OUT/tokenizer``); else GPT-2's BPE when vocab.json + merges.txt are GPT-2's own
    files (what neo exports for ``gpt2``); else none (pass --tokenizer)."""
    from neo.data.tokenizer import HF_FILES, is_gpt2_bpe, load_tokenizer

    if spec is None and (src / "tokenizer.json").is_file():
        (tmp / "tokenizer").mkdir()
        for name in HF_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / "tokenizer" / name)
        name = load_tokenizer(f"hf:{tmp / 'tokenizer'}").name
        return f"hf:{os.path.abspath(out / 'tokenizer')}", name
    if spec is None and is_gpt2_bpe(src / "vocab.json", src / "merges.txt"):
        spec = "gpt2"
    if spec is None:
        return None, None
    return spec, load_tokenizer(spec).name


def _stage_of(n_layers: int, pp: int) -> list[int]:
    """Pipeline stage of each layer of the flat list (embedding, blocks, final norm, head): even runs.

    Any assignment reads back the same (a reader takes each tensor from the first stage holding it); an even
    split keeps the files of similar size.
    """
    if not 1 <= pp <= n_layers:
        raise UsageError(
            f"--pp {pp}: the model has {n_layers} layers to place (embedding, blocks, norm, head)"
        )
    return [i * pp // n_layers for i in range(n_layers)]


def write_weights(folder: Path, state: dict[str, torch.Tensor], args: ModelArgs, tp: int, pp: int
                  ) -> tuple[dict, dict]:  # fmt: skip
    """``weights/tp{t}-pp{p}.safetensors`` for ``state``; returns the tp_split record of neo.json and the
    files' manifest records (size, sha256 computed while writing).

    The split dimension of each tensor comes from the model code (the plain model built on the meta device).
    """
    from neo.model.gpt import GPT

    if args.kv_heads % tp or args.n_heads % tp:
        raise UsageError(f"--tp {tp} must divide n_heads = {args.n_heads} and n_kv_heads = {args.kv_heads}")
    with torch.device("meta"):
        splits = {n: getattr(p, "tp_split_dim", None) for n, p in GPT(args).named_parameters()}
    for name, dim in splits.items():
        if dim is not None and state[name].shape[dim] % tp:
            raise UsageError(
                f"--tp {tp} does not divide {name} ({tuple(state[name].shape)}). Fix: import with --tp 1 "
                "(the checkpoint loads into any tp)."
            )
    stages = _stage_of(args.n_layers + 3, pp)
    (folder / "weights").mkdir()
    records = {}
    for stage in range(pp):
        names = [n for n in state if stages[int(n.split(".")[1])] == stage]
        for t in range(tp):
            shard = {
                n: (state[n] if splits[n] is None else state[n].chunk(tp, dim=splits[n])[t]).contiguous()
                for n in names
            }
            rel = shard_file("weights", t, stage)
            records[rel] = write_safetensors(str(folder / rel), shard)
    return splits, records


def _other_files(folder: Path, written: dict) -> dict:
    """Manifest records of the files copied into ``folder`` (the tokenizer's), beside the weights."""
    paths = (p for p in folder.rglob("*") if p.is_file())
    return {
        str(p.relative_to(folder)): file_record(str(p))
        for p in paths
        if str(p.relative_to(folder)) not in written
    }


def import_hf(hf_dir: str, out_dir: str, tokenizer: str | None = None, tp: int = 1, pp: int = 1) -> dict:
    """Turn a transformers folder into a neo checkpoint (weights only) that ``checkpoint.load: OUT`` with
    ``checkpoint.load_weights_only: true`` continues training from, at any tp/pp."""
    import neo

    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src} has no config.json: not a transformers model folder")
    config = json.loads((src / "config.json").read_text())
    args = args_from_hf_config(config)
    fam = FAMILIES[config["model_type"]]
    state = {k: v.contiguous() for k, v in fam.from_hf(read_hf_weights(src), args).items()}

    out, tmp = new_folder(out_dir)
    try:
        splits, files = write_weights(tmp, state, args, tp, pp)
        spec, name = _tokenizer(src, tmp, out, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {
        "iteration": 0,
        "consumed_samples": 0,
        "model": asdict(args),
        "layout": {"tp": tp, "pp": pp, "dp": 1, "zero": None},
        "tokenizer": name,
        "tokenizer_spec": spec,
        "neo_version": neo.__version__,
        "tp_split": splits,
        "imported_from": os.path.abspath(hf_dir),
        "hf_config": config,
        "files": {**files, **_other_files(tmp, files)},
    }
    (tmp / "neo.json").write_text(json.dumps(meta, indent=1))
    publish(tmp, out)
    return {"path": str(out), "model": asdict(args), "architecture": fam.arch, "tokenizer_spec": spec}
