"""neo <-> transformers ``GPTNeoXForCausalLM``: a renaming.

neo names its parameters after GPT-NeoX (``layers.{1+i}.attention.query_key_value`` ...), and with one
key/value head per query head neo's fused qkv rows are GPT-NeoX's per-head interleaving, so nothing is
reshaped. GPT-NeoX has no grouped-query attention, RMSNorm, SwiGLU or bias-free MLP: those are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from neo.export.common import (
    Family,
    check_names,
    common_problems,
    refuse,
    rope_parameters,
    rope_scaling_from,
)
from neo.model.args import ModelArgs
from neo.model.gpt import parameter_names

BLOCK_PARAMS = (
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


def name_map(args: ModelArgs) -> dict[str, str]:
    """neo parameter name -> transformers parameter name (as on disk: the head is ``embed_out``)."""
    L = args.n_layers
    names = {"layers.0.word_embeddings.weight": "gpt_neox.embed_in.weight"}
    for i in range(L):
        for p in BLOCK_PARAMS:
            names[f"layers.{1 + i}.{p}"] = f"gpt_neox.layers.{i}.{p}"
    names[f"layers.{L + 1}.final_layer_norm.weight"] = "gpt_neox.final_layer_norm.weight"
    names[f"layers.{L + 1}.final_layer_norm.bias"] = "gpt_neox.final_layer_norm.bias"
    if not args.tie_embeddings:
        names[f"layers.{L + 2}.embed_out.weight"] = "embed_out.weight"
    return names


class GPTNeoX(Family):
    arch, model_type, config_class = "GPTNeoXForCausalLM", "gpt_neox", "GPTNeoXConfig"

    def unsupported(self, args: ModelArgs) -> list[str]:
        problems = []
        if args.norm != "layernorm":
            problems.append(f"model.norm = {args.norm} (GPTNeoX has LayerNorm only)")
        if args.activation != "gelu":
            problems.append(f"model.activation = {args.activation} (GPTNeoX export supports gelu)")
        if args.position_embedding != "rotary":
            problems.append(f"model.position_embedding = {args.position_embedding} (GPTNeoX uses rotary)")
        if args.kv_heads != args.n_heads:
            problems.append(
                f"model.n_kv_heads = {args.kv_heads} with n_heads = {args.n_heads} "
                "(GPTNeoX has no grouped-query attention)"
            )
        if not args.bias or not args.use_qkv_bias:
            problems.append("model.bias / model.qkv_bias = false (GPTNeoX's MLP always has biases)")
        if args.sliding_window is not None:
            problems.append(f"model.sliding_window = {args.sliding_window} (GPTNeoX attends to everything)")
        return problems

    def config_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            intermediate_size=args.ffn_size,
            hidden_act="gelu",
            rotary_pct=args.rotary_pct,
            rotary_emb_base=args.rotary_base,
            rope_parameters={**rope_parameters(args), "partial_rotary_factor": args.rotary_pct},
            max_position_embeddings=args.max_positions,
            layer_norm_eps=args.norm_eps,
            use_parallel_residual=args.parallel_residual,
            tie_word_embeddings=args.tie_embeddings,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            attention_bias=True,
        )

    def to_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        names = name_map(args)
        check_names(set(state), set(names), "neo weights vs GPTNeoX")
        return {names[k]: v for k, v in state.items()}

    def from_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        inverse = {v: k for k, v in name_map(args).items()}
        state = dict(state)
        if "lm_head.weight" in state and "embed_out.weight" not in state:  # transformers 5's in-memory name
            state["embed_out.weight"] = state.pop("lm_head.weight")
        if args.tie_embeddings:
            state.pop("embed_out.weight", None)
        state = {
            k: v for k, v in state.items() if not k.endswith((".attention.bias", ".attention.masked_bias"))
        }
        check_names(set(state), set(inverse), "GPTNeoX weights")
        out = {inverse[k]: v for k, v in state.items()}
        check_names(set(out), parameter_names(args), "GPTNeoX weights vs neo's model")
        return out

    def args_from_config(self, config) -> ModelArgs:
        raw = config.to_dict()
        problems = common_problems(raw, self.arch)
        if config.hidden_act != "gelu":
            problems.append(f"hidden_act = {config.hidden_act!r} (neo's GeLU is the exact erf 'gelu')")
        if not getattr(config, "attention_bias", True):
            problems.append("attention_bias = false (neo's bias switch covers the MLP too)")
        rope = dict(config.rope_parameters or {})
        scaling = rope_scaling_from(rope, problems)
        refuse(self.arch, problems)
        return ModelArgs(
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            n_heads=config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size,
            seq_length=config.max_position_embeddings,
            max_position_embeddings=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            rotary_pct=rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 0.25)),
            rotary_base=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            parallel_residual=config.use_parallel_residual,
            norm_eps=config.layer_norm_eps,
            tie_embeddings=config.tie_word_embeddings,
        )
