"""The mapping between neo's weights and transformers' ``GPTNeoXForCausalLM``.

neo names its parameters after GPT-NeoX (``layers.{1+i}.attention.query_key_value`` ...), and the
fused qkv rows already use GPT-NeoX's per-head interleaving, so the mapping is a renaming. The
parity tests use it as their oracle and the HF export uses it to write checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from neo.model.args import ModelArgs

_BLOCK_PARAMS = (
    "input_layernorm.weight", "input_layernorm.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias",
    "attention.dense.weight", "attention.dense.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
    "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
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
        raise ValueError("cannot express this model as GPTNeoX: " + "; ".join(problems))
    return GPTNeoXConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, intermediate_size=args.ffn_size, hidden_act="gelu",
        rotary_pct=args.rotary_pct, rotary_emb_base=args.rotary_base,
        rope_parameters={"rope_type": "default", "rope_theta": args.rotary_base,
                         "partial_rotary_factor": args.rotary_pct},
        max_position_embeddings=args.max_positions, layer_norm_eps=args.norm_eps,
        use_parallel_residual=args.parallel_residual, tie_word_embeddings=args.tie_embeddings,
        attention_dropout=0.0, hidden_dropout=0.0, attention_bias=True, **extra,
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
        raise KeyError(f"neo state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    out = {names[k]: v for k, v in state.items() if k in names}
    if args.tie_embeddings:
        out["embed_out.weight"] = out["gpt_neox.embed_in.weight"]
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """transformers' names back to neo's (the inverse of ``to_hf_state_dict``)."""
    inverse = {v: k for k, v in name_map(args).items()}
    missing = sorted(set(inverse) - set(state))
    if missing:
        raise KeyError(f"GPTNeoX state dict lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
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
    missing = [k for k in missing if not (args.tie_embeddings and k in ("lm_head.weight", "embed_out.weight"))]
    if missing or unexpected:
        raise KeyError(f"weights do not match GPTNeoX: missing {missing}, unexpected {unexpected}")
