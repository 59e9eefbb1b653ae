"""The optimizer neo hands to DeepSpeed.

AdamW with weight decay on matrices only. In fp32 without ZeRO, DeepSpeed clips gradients but throws
the norm away (and inside a pipeline's ``train_batch`` there is no moment to measure it), so in that
one mode neo clips in the optimizer's ``step`` itself, over the whole model (every TP and PP rank),
and keeps the norm for the log. In every other mode DeepSpeed's wrapped optimizer clips and reports;
on a CPU neo has it take that norm in fp32, as neo's own clipping does (``ds_compat.fp32_zero_grad_norms``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings) only; never on biases or norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CUDA, and the CPU since torch 2.4)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device.type in _get_fused_kernels_supported_devices()


def global_grad_norm(params, topo, skip: set[int] = frozenset()) -> float:
    """2-norm of all gradients of the model: TP-split parameters summed over the TP group, replicated ones
    counted once, pipeline stages summed; ``skip`` holds ids of duplicated (tied) parameters."""
    grads = [
        p.grad.detach()
        for p in params
        if p.grad is not None
        and id(p) not in skip
        and (getattr(p, "model_parallel", False) or topo.coord.tensor == 0)
    ]
    device = grads[0].device if grads else ("cuda" if torch.cuda.is_available() else "cpu")
    total = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:  # one fused kernel per dtype, one host transfer at the end
        total += torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
    if topo.tp * topo.pp > 1:
        dist.all_reduce(total, group=topo.mp_group)
    return math.sqrt(total.item())


class ClippingAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm in ``step`` (see the module docstring)."""

    def __init__(self, params, *, topo, max_norm: float, skip: set[int] = frozenset(), **kwargs):
        super().__init__(params, **kwargs)
        self.topo, self.max_norm, self.skip = topo, max_norm, skip
        self.grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.grad_norm = global_grad_norm(params, self.topo, self.skip)
        if self.max_norm > 0 and self.grad_norm > self.max_norm:
            scale = self.max_norm / (self.grad_norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return super().step(closure)


def neo_clips(zero_stage: int, dtype: str) -> bool:
    """Whether neo (not DeepSpeed) clips and measures the gradient norm in this mode."""
    return zero_stage == 0 and dtype == "fp32"
