"""neo <-> transformers ``MistralForCausalLM``: Llama's mapping, no biases, a sliding window.

Mistral's attention sees the last ``sliding_window`` positions (``model.sliding_window``), in every layer;
its linears have no biases at all.
"""

from __future__ import annotations

from typing import Any

from neo.export.llama import Llama
from neo.model.args import ModelArgs


class Mistral(Llama):
    arch, model_type, config_class = "MistralForCausalLM", "mistral", "MistralConfig"

    def unsupported(self, args: ModelArgs) -> list[str]:
        problems = self._block_problems(args)
        if args.bias or args.use_qkv_bias:
            problems.append("model.bias / model.qkv_bias = true (Mistral's linears have no biases)")
        return problems

    def _variant_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        return dict(sliding_window=args.sliding_window)

    def _family_problems(self, config) -> list[str]:
        return []

    def _args_extra(self, config) -> dict[str, Any]:
        return dict(bias=False, sliding_window=config.sliding_window)
