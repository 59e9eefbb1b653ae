"""neo <-> transformers ``LlamaForCausalLM`` (and the shared mapping of its relatives, Mistral and Qwen2).

The Llama block is neo's sequential block with RMSNorm, SwiGLU and full rotary. Weights map by renaming
except the attention input: neo fuses q, k and v into one projection whose rows are grouped per
key/value head ([q_{g r} .. q_{g r + r - 1}, k_g, v_g] for each kv head g, r = n_heads / n_kv_heads;
see ``neo.model.layers.Attention``), transformers keeps q_proj, k_proj and v_proj apart. ``split_qkv``
and ``join_qkv`` are that reshape, both ways, exactly.

Llama's ``attention_bias`` puts biases on q, k, v and o together, and ``mlp_bias`` on the MLP; neo's
``model.bias`` covers all of them, so the two must agree (``qkv_bias`` alone is Qwen2's pattern).
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

# neo's name inside a block -> transformers' name inside ``model.layers.{i}`` (q/k/v are split separately)
RENAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "mlp.dense_gate.weight": "mlp.gate_proj.weight",
    "mlp.dense_gate.bias": "mlp.gate_proj.bias",
    "mlp.dense_h_to_4h.weight": "mlp.up_proj.weight",
    "mlp.dense_h_to_4h.bias": "mlp.up_proj.bias",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.down_proj.bias",
}
QKV = "attention.query_key_value"


def split_qkv(fused: torch.Tensor, args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """neo's fused qkv weight [(n_heads + 2 kv) d, h] (or bias) -> q [n_heads d, ...], k, v [kv d, ...]."""
    kv, r, d = args.kv_heads, args.n_heads // args.kv_heads, args.head_dim
    rest = fused.shape[1:]
    groups = fused.reshape(kv, r + 2, d, *rest)
    q = groups[:, :r].reshape(kv * r * d, *rest).contiguous()
    return (
        q,
        groups[:, r].reshape(kv * d, *rest).contiguous(),
        groups[:, r + 1].reshape(kv * d, *rest).contiguous(),
    )


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of ``split_qkv``."""
    kv, r, d = args.kv_heads, args.n_heads // args.kv_heads, args.head_dim
    rest = q.shape[1:]
    parts = (q.reshape(kv, r, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest).contiguous()


class Llama(Family):
    arch, model_type, config_class = "LlamaForCausalLM", "llama", "LlamaConfig"

    def unsupported(self, args: ModelArgs) -> list[str]:
        problems = self._block_problems(args)
        if args.use_qkv_bias != args.bias:
            problems.append(
                f"model.qkv_bias = {args.qkv_bias} with model.bias = {args.bias} (Llama's attention_bias covers "
                "q, k, v and o together; a q/k/v bias alone is Qwen2)"
            )
        if args.sliding_window is not None:
            problems.append(
                f"model.sliding_window = {args.sliding_window} (Llama attends to everything; Mistral)"
            )
        return problems

    def _block_problems(self, args: ModelArgs) -> list[str]:
        """What none of the Llama family can express: the block itself."""
        wanted = dict(
            norm="rmsnorm", activation="swiglu", position_embedding="rotary", parallel_residual=False
        )
        problems = [
            f"model.{k} = {getattr(args, k)} ({self.arch} needs {v})"
            for k, v in wanted.items()
            if getattr(args, k) != v
        ]
        if args.position_embedding == "rotary" and args.rotary_pct != 1.0:
            problems.append(f"model.rotary_pct = {args.rotary_pct} ({self.arch} rotates every channel: 1.0)")
        return problems

    def config_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        return dict(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=args.ffn_size,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            num_key_value_heads=args.kv_heads,
            head_dim=args.head_dim,
            hidden_act="silu",
            max_position_embeddings=args.max_positions,
            rms_norm_eps=args.norm_eps,
            tie_word_embeddings=args.tie_embeddings,
            rope_parameters=rope_parameters(args),
            attention_dropout=args.attention_dropout,
            **self._variant_kwargs(args),
        )

    def _variant_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        return dict(attention_bias=args.bias, mlp_bias=args.bias)

    def to_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        check_names(set(state), parameter_names(args), f"neo weights vs {self.arch}")
        L = args.n_layers
        out = {"model.embed_tokens.weight": state["layers.0.word_embeddings.weight"]}
        for i in range(L):
            src, dst = f"layers.{1 + i}.", f"model.layers.{i}."
            out.update(
                {dst + theirs: state[src + ours] for ours, theirs in RENAMES.items() if src + ours in state}
            )
            for kind in ("weight", "bias"):
                if f"{src}{QKV}.{kind}" in state:
                    q, k, v = split_qkv(state[f"{src}{QKV}.{kind}"], args)
                    out.update({f"{dst}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
        out["model.norm.weight"] = state[f"layers.{L + 1}.final_layer_norm.weight"]
        if not args.tie_embeddings:
            out["lm_head.weight"] = state[f"layers.{L + 2}.embed_out.weight"]
        return out

    def from_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in state.items() if not (args.tie_embeddings and k == "lm_head.weight")}
        L = args.n_layers
        out = {"layers.0.word_embeddings.weight": state.pop("model.embed_tokens.weight", None)}
        for i in range(L):
            src, dst = f"model.layers.{i}.", f"layers.{1 + i}."
            out.update(
                {
                    dst + ours: state.pop(src + theirs)
                    for ours, theirs in RENAMES.items()
                    if src + theirs in state
                }
            )
            for kind in ("weight", "bias"):
                names = [f"{src}self_attn.{n}_proj.{kind}" for n in "qkv"]
                if all(n in state for n in names):
                    out[f"{dst}{QKV}.{kind}"] = join_qkv(*(state.pop(n) for n in names), args)
        out[f"layers.{L + 1}.final_layer_norm.weight"] = state.pop("model.norm.weight", None)
        if not args.tie_embeddings:
            out[f"layers.{L + 2}.embed_out.weight"] = state.pop("lm_head.weight", None)
        out = {k: v for k, v in out.items() if v is not None}
        check_names(set(out) | set(state), parameter_names(args), f"{self.arch} weights (as neo names)")
        return out

    def args_from_config(self, config) -> ModelArgs:
        problems = self._config_problems(config)
        rope = dict(config.rope_parameters or {})
        scaling = rope_scaling_from(rope, problems)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(
                f"partial_rotary_factor = {rope['partial_rotary_factor']} ({self.arch} rotates all)"
            )
        refuse(self.arch, problems)
        return ModelArgs(
            n_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            ffn_hidden_size=config.intermediate_size,
            seq_length=config.max_position_embeddings,
            max_position_embeddings=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            position_embedding="rotary",
            rotary_pct=1.0,
            rotary_base=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            parallel_residual=False,
            norm="rmsnorm",
            norm_eps=config.rms_norm_eps,
            activation="swiglu",
            tie_embeddings=config.tie_word_embeddings,
            init_method="normal",
            init_std=config.initializer_range,
            attention_dropout=float(config.attention_dropout or 0.0),
            **self._args_extra(config),
        )

    def _config_problems(self, config) -> list[str]:
        """Refusals every Llama-family config shares, plus ``_family_problems``."""
        problems = common_problems(config.to_dict(), self.arch)
        if config.hidden_act != "silu":
            problems.append(f"hidden_act = {config.hidden_act!r} (neo's SwiGLU uses silu)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if (
            config.hidden_size % config.num_attention_heads
            or head_dim * config.num_attention_heads != config.hidden_size
        ):
            problems.append(
                f"head_dim = {head_dim} with hidden_size = {config.hidden_size} and num_attention_heads = "
                f"{config.num_attention_heads} (neo's head size is hidden_size / n_heads)"
            )
        kv = config.num_key_value_heads or config.num_attention_heads
        if config.num_attention_heads % kv:
            problems.append(f"num_key_value_heads = {kv} does not divide num_attention_heads")
        return problems + self._family_problems(config)

    def _family_problems(self, config) -> list[str]:
        if getattr(config, "attention_bias", False) != getattr(config, "mlp_bias", False):
            return [
                f"attention_bias = {config.attention_bias} with mlp_bias = {config.mlp_bias} (neo's model.bias "
                "covers attention and MLP together)"
            ]
        return []

    def _args_extra(self, config) -> dict[str, Any]:
        return dict(bias=bool(getattr(config, "attention_bias", False)))
