"""What every Hugging Face family shares: the ``Family`` interface, rotary parameters, name checks.

A family (``gpt_neox``, ``llama``, ``mistral``, ``qwen2``) maps neo's shape (``ModelArgs``) and its full
(tp = 1) weights to one transformers architecture and back, exactly: renames and reshapes only, never
a conversion that changes a value. What a family cannot express is listed by name (``unsupported``
for an export, ``ExportError`` for an import) instead of being approximated.
"""

from __future__ import annotations

from typing import Any

import torch

from neo.errors import CheckpointError, ExportError
from neo.model.args import ModelArgs, RopeScaling

# Keys of a config.json that mean a mixture of experts (Mixtral, Qwen2-MoE, DeepSeek, ...) when set.
MOE_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
# Fields of config.json that are not the architecture; an export of an imported model carries them over.
PASSIVE_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


class Family:
    """One transformers causal-LM architecture. Subclasses fill the class attributes and the methods."""

    arch = ""  # "LlamaForCausalLM": config.json's architectures[0]
    model_type = ""  # "llama": config.json's model_type
    config_class = ""  # "LlamaConfig": the transformers class that reads config.json
    passive_keys: tuple[str, ...] = ()  # config.json fields beyond PASSIVE_KEYS that do not change the model

    def unsupported(self, args: ModelArgs) -> list[str]:
        """Options of ``args`` this architecture cannot express (empty: the model exports exactly)."""
        raise NotImplementedError

    def config_kwargs(self, args: ModelArgs) -> dict[str, Any]:
        raise NotImplementedError

    def to_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """A full neo state dict under this architecture's names (a tied head is left out)."""
        raise NotImplementedError

    def from_hf(self, state: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def args_from_config(self, config) -> ModelArgs:
        """neo's shape for a transformers config object of this family; ExportError names what neo lacks."""
        raise NotImplementedError

    def hf_config(self, args: ModelArgs, **extra: Any):
        """The transformers config of the same shape (transformers imported lazily: an optional extra)."""
        import transformers

        problems = self.unsupported(args)
        if problems:
            raise ExportError(f"cannot express this model as {self.arch}: " + "; ".join(problems))
        return getattr(transformers, self.config_class)(**self.config_kwargs(args), **extra)

    def read_config(self, raw: dict):
        """config.json as transformers reads it (legacy keys such as ``rope_scaling`` standardised)."""
        import transformers

        return getattr(transformers, self.config_class).from_dict(dict(raw))


def refuse(arch: str, problems: list[str]) -> None:
    if problems:
        raise ExportError(f"neo cannot represent this {arch} exactly: " + "; ".join(problems))


def rope_parameters(args: ModelArgs) -> dict[str, Any]:
    """transformers' ``rope_parameters`` for neo's rotary base and scaling (partial rotary excluded)."""
    sc = args.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rotary_base}
    if sc.type == "linear":
        params.update(rope_type="linear", factor=sc.factor)
    elif sc.type == "llama3":
        params.update(
            rope_type="llama3",
            factor=sc.factor,
            low_freq_factor=sc.low_freq_factor,
            high_freq_factor=sc.high_freq_factor,
            original_max_position_embeddings=sc.original_max_positions,
        )
    return params


def rope_scaling_from(params: dict, problems: list[str]) -> RopeScaling:
    """neo's ``RopeScaling`` for a transformers ``rope_parameters`` dict; other types are named in problems."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(type="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params["original_max_position_embeddings"]),
        )
    problems.append(
        f"rope_parameters.rope_type = {kind!r} (neo implements default, linear and llama3 rotary scaling; "
        "dynamic, yarn, longrope and the others are not implemented)"
    )
    return RopeScaling()


def common_problems(raw: dict, arch: str) -> list[str]:
    """What no family neo supports has: mixture-of-experts keys, another head than the causal LM."""
    problems = [f"{k} = {raw[k]!r} (mixture of experts)" for k in MOE_KEYS if raw.get(k)]
    archs = raw.get("architectures") or [arch]
    if archs != [arch]:
        problems.append(f"architectures = {archs} (neo imports {arch} causal language models)")
    return problems


def check_names(got: set[str], expected: set[str], what: str) -> None:
    """The state dict holds exactly the expected tensors; name the first few that differ."""
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        raise CheckpointError(
            f"{what}: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}"
        )
