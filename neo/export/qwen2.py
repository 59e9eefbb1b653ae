"""neo <-> transformers ``Qwen2ForCausalLM``: Llama's mapping with biases on q, k and v only.

Qwen2's q/k/v projections always have biases and nothing else does: neo's ``model.bias: false`` with
``model.qkv_bias: true``. Its optional sliding window applies to the layers from ``max_window_layers`` on;
neo's window is the same in every layer, so a config that mixes windowed and full layers is refused.
"""

from __future__ import annotations

from typing import Any

from neo.export.llama import Llama
from neo.model.args import ModelArgs


class Qwen2(Llama):
    arch, model_type, config_class = "Qwen2ForCausalLM", "qwen2", "Qwen2Config"

    def unsupported(self, args: ModelArgs) -> list[str]:
        problems = self._block_problems(args)
        if args.bias or not args.use_qkv_bias:
            problems.append(
                f"model.bias = {args.bias}, model.qkv_bias = {args.qkv_bias} (Qwen2 has biases on q, k, v "
                "only: bias false, qkv_bias true)"
            )
        return problems

    passive_keys = ("max_window_layers",)  # no effect without use_sliding_window

    def config_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        kwargs = super().config_kwargs(args)
        del kwargs["head_dim"]  # not a Qwen2 option: always hidden_size / num_attention_heads
        return kwargs

    def _variant_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        if args.sliding_window is None:
            return dict(use_sliding_window=False)
        return dict(
            use_sliding_window=True,
            sliding_window=args.sliding_window,
            max_window_layers=0,  # windowed from layer 0 on: every layer
            layer_types=["sliding_attention"] * args.n_layers,
        )

    def _family_problems(self, config) -> list[str]:
        kinds = set(config.layer_types or ["full_attention"])
        if len(kinds) > 1:
            return [f"layer_types = {config.layer_types} (neo's sliding window is the same in every layer)"]
        if kinds - {"full_attention", "sliding_attention"}:
            return [f"layer_types = {sorted(kinds)}"]
        return []

    def _args_extra(self, config) -> dict[str, Any]:
        sliding = "sliding_attention" in (config.layer_types or [])
        return dict(bias=False, qkv_bias=True, sliding_window=config.sliding_window if sliding else None)
