"""A LoRA checkpoint as a PEFT adapter beside its exported base: ``neo-export CKPT OUT --peft``.

``OUT/base`` is the base checkpoint exported as a transformers folder (as ``neo-export`` writes any model);
``OUT/adapter`` holds ``adapter_config.json`` and ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT/base), OUT/adapter)`` loads.

Each neo adapter (A [r, in], B [out, r] beside a weight) maps to the transformers modules that weight maps
to. Where the family splits a fused weight by rows (Llama's q/k/v projections from neo's fused qkv), each part
gets the shared A and its rows of B: (B A)[rows] = B[rows] A, so the update is exactly the same. Which rows
go where is found by running the family's own weight mapping over row indices, so it cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from neo.errors import UsageError
from neo.model.args import ModelArgs


def peft_modules(fam, base_state: dict[str, torch.Tensor], args: ModelArgs, adapters: dict[str, torch.Tensor]
                 ) -> dict[str, tuple[str, torch.Tensor]]:  # fmt: skip
    """transformers module name -> (neo module name, the rows of its B that belong to it)."""
    state, owners, offset = dict(base_state), [], 0
    for a_name in sorted(k for k in adapters if k.endswith(".lora_A")):
        module = a_name.removesuffix(".lora_A")
        rows = adapters[f"{module}.lora_B"].shape[0]
        state[f"{module}.weight"] = torch.arange(offset, offset + rows).unsqueeze(1)  # int64 marks the rows
        owners.append((offset, offset + rows, module))
        offset += rows
    out = {}
    for key, t in fam.to_hf(state, dataclasses.replace(args, value_head=False)).items():
        if t.dtype != torch.int64 or not key.endswith(".weight"):
            continue
        first = int(t.reshape(-1)[0])
        lo, _, module = next(o for o in owners if o[0] <= first < o[1])
        out[key.removesuffix(".weight")] = (module, t.reshape(-1) - lo)
    return out


def adapter_tensors(modules: dict, adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for hf_module, (module, rows) in modules.items():
        out[f"base_model.model.{hf_module}.lora_A.weight"] = adapters[
            f"{module}.lora_A"
        ].clone()  # q, k, v share A
        out[f"base_model.model.{hf_module}.lora_B.weight"] = adapters[f"{module}.lora_B"][rows].contiguous()
    return out


def adapter_config(spec: dict, modules: dict, adapters: dict[str, torch.Tensor], base: str) -> dict:
    """PEFT's LoraConfig: targets named in full, a rank per module where it differs from ``r``."""
    ranks = {m: int(adapters[f"{module}.lora_A"].shape[0]) for m, (module, _) in modules.items()}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec["rank"], "lora_alpha": spec["alpha"],
        "lora_dropout": spec["dropout"], "target_modules": sorted(modules), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {m: r for m, r in ranks.items() if r != spec["rank"]}, "alpha_pattern": {},
        "base_model_name_or_path": base, "modules_to_save": None,
    }  # fmt: skip


def export_peft(checkpoint: str, out_dir: str, dtype: torch.dtype | None = None, arch: str | None = None,
                checksums: bool = True) -> dict:  # fmt: skip
    """Write OUT/base (the base model) and OUT/adapter (the PEFT adapter) for a LoRA checkpoint."""
    from safetensors.torch import save_file

    from neo.checkpoint import load_full_weights, read_meta, resolve, verify
    from neo.checkpoint.lora import lora_base
    from neo.checkpoint.tensors import ShardedTensors
    from neo.export.hf import export_checkpoint, family, new_folder, publish

    path = resolve(checkpoint)
    meta = read_meta(path)
    verify(path, meta, checksums=checksums)
    if not (meta.get("lora") or {}).get("base"):
        raise UsageError(
            f"{path} is not a LoRA checkpoint (no adapters beside a base). Fix: export it without --peft."
        )
    base_path = lora_base(meta, path, checksums)
    weights = ShardedTensors(path, meta, "weights")
    adapters = {n: weights.get(n) for n in weights.names()}
    args = ModelArgs(**meta["model"])
    base_state, _ = load_full_weights(base_path, checksums=checksums)
    modules = peft_modules(family(arch, args), base_state, args, adapters)
    out, tmp = new_folder(out_dir)
    base = export_checkpoint(base_path, str(tmp / "base"), dtype, arch, checksums)
    (tmp / "adapter").mkdir()
    tensors = {k: (v.to(dtype) if dtype else v) for k, v in adapter_tensors(modules, adapters).items()}
    save_file(tensors, str(tmp / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = adapter_config(meta["lora"]["spec"], modules, adapters, str(Path(out) / "base"))
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=1))
    publish(tmp, out)
    return {"path": str(out), "base": os.path.join(out, "base"), "adapter": os.path.join(out, "adapter"),
            "architecture": base["architecture"], "modules": len(modules)}  # fmt: skip
