"""LoRA, a model option: low-rank adapters beside chosen linears of every block, the rest frozen.

``apply_lora(model, spec, seed)`` attaches adapters to the targets of every ``Block`` (plain or pipeline form)
and freezes every other parameter, so the optimizer (and ZeRO) hold only the adapters. The adapter math,
including how A and B are split under tensor parallelism, is in ``neo/parallel/layers.py: LoRALinear``.

Targets (PEFT names of GPT-NeoX in brackets): ``qkv`` the fused query/key/value projection
(query_key_value), ``attn_out`` the attention output (dense), ``mlp_in`` the MLP's up projection and, with
SwiGLU, its gate (dense_h_to_4h), ``mlp_out`` the down projection (dense_4h_to_h).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

TARGETS = ("qkv", "attn_out", "mlp_in", "mlp_out")
_MODULES = {"qkv": ("attention.query_key_value",), "attn_out": ("attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h", "mlp.dense_gate"), "mlp_out": ("mlp.dense_4h_to_h",)}  # fmt: skip


@dataclass
class LoRASpec:
    """What ``lora:`` in a config says (neo/config/schema.py documents each key)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def rank_of(self, target: str) -> int:
        return int(self.rank_pattern.get(target, self.rank))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "rank_pattern": dict(self.rank_pattern)}  # fmt: skip


def lora_seed(seed: int, layer: int, module: str) -> int:
    """The generator seed of one adapter: the same on every rank and stage that builds it."""
    return (seed * 1_000_003 + 104_729 * (layer + 1) + sum(map(ord, module)) * 7_919) % (2**63 - 1)


def _blocks(model: torch.nn.Module):
    from neo.model.layers import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def target_modules(block: torch.nn.Module, targets: list[str]):
    """(target, module name within the block, module) for each adapted linear of ``block``."""
    for target in targets:
        for name in _MODULES[target]:
            module = block.get_submodule(name) if _has(block, name) else None
            if module is not None:
                yield target, name, module


def _has(block: torch.nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def apply_lora(model: torch.nn.Module, spec: LoRASpec, seed: int) -> int:
    """Attach the adapters and freeze the rest, except the scalar heads an objective adds (a reward model's
    score head, PPO's value head: ``neo_fresh``, new to the checkpoint the run starts from), which train in
    full and are saved beside the adapters (PEFT's ``modules_to_save``). Returns the trainable parameter count
    on this rank."""
    for p in model.parameters():
        p.requires_grad_(bool(getattr(p, "neo_fresh", False)))
    for block in _blocks(model):
        for target, name, linear in target_modules(block, spec.targets):
            generator = torch.Generator().manual_seed(lora_seed(seed, block.attention.layer_number, name))
            linear.add_lora(spec.rank_of(target), spec.alpha, spec.dropout, generator)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module):
    """The base model: every adapter switched off (DPO's reference without a second copy of the weights)."""
    linears = [m for m in model.modules() if getattr(m, "lora_A", None) is not None]
    for m in linears:
        m.lora_enabled = False
    try:
        yield model
    finally:
        for m in linears:
            m.lora_enabled = True


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def merge(
    state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], spec: dict
) -> dict[str, torch.Tensor]:
    """Full (unsplit) base weights with the full adapters folded in: W + (alpha / r) B A for every adapted
    linear, computed in fp64 and cast back to W's dtype. The checkpoint's other tensors (the heads trained in
    full beside the adapters) are taken as they are."""
    out = dict(state)
    out.update({k: v for k, v in adapters.items() if not is_adapter(k)})
    for name in [k for k in adapters if k.endswith(".lora_A")]:
        module = name.removesuffix(".lora_A")
        a, b = adapters[name].double(), adapters[f"{module}.lora_B"].double()
        weight = out[f"{module}.weight"]
        out[f"{module}.weight"] = (weight.double() + spec["alpha"] / a.shape[0] * (b @ a)).to(weight.dtype)
    return out
