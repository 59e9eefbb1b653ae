"""Building a run's parts from its config, one function each: model shape, model, optimizer, engine.

The Trainer composes these; tests and benchmarks call them (or hand the Trainer their own parts).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from neo.config import Config, deepspeed_config
from neo.errors import ConfigError
from neo.model.args import ModelArgs
from neo.model.gpt import GPT, pipeline_module
from neo.model.layers import Block
from neo.parallel.topology import Topology
from neo.train.optim import (
    ClippingAdamW,
    fused_adamw_supported,
    neo_clips,
    param_groups,
)
from neo.train.schedule import LRSchedule, schedule_from_config


def model_args(cfg: Config, tokenizer, saved_model: dict | None = None) -> ModelArgs:
    """The model's shape: ``cfg.model`` with the vocabulary resolved from the tokenizer, padded to
    ``model.vocab_multiple`` whatever the tp (or kept as a loaded checkpoint saved it: its padding is part of
    its weights)."""
    from neo.data.tokenizer import padded_vocab_size

    model = cfg.model if saved_model is None else _saved_shape(cfg, saved_model)
    vocab = model.vocab_size
    if vocab is None and saved_model is not None:
        vocab = int(saved_model["vocab_size"])
    elif vocab is None:
        vocab = padded_vocab_size(tokenizer.vocab_size, model.vocab_multiple)
    elif vocab < tokenizer.vocab_size:
        raise ConfigError([f"model.vocab_size = {vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
                           f"tokens ({tokenizer.name}). Fix: remove model.vocab_size to use the tokenizer's "
                           "padded size."])  # fmt: skip
    if vocab % cfg.parallel.tp:
        where = "the checkpoint's" if saved_model is not None else "the padded"
        raise ConfigError([f"{where} vocabulary of {vocab} rows is not divisible by parallel.tp = {cfg.parallel.tp}. "
                           "Fix: choose a tp that divides it (a new model: set model.vocab_multiple to a multiple "
                           "of tp, e.g. 128)."])  # fmt: skip
    shape = {f.name: getattr(model, f.name) for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(
        **dict(shape, vocab_size=vocab)
    )  # the shape only (not model.compile): checkpoints record it


def _saved_shape(cfg: Config, saved_model: dict) -> ModelArgs:
    """``cfg.model`` where the config sets a key, the loaded checkpoint's model elsewhere: fine-tuning or
    resuming a checkpoint needs no restatement of its shape. The result is validated like a config."""
    from neo.config.checks import model_problems

    set_here = {k.split(".", 1)[1] for k in getattr(cfg, "sources", {}) if k.startswith("model.")}
    names = {f.name for f in dataclasses.fields(ModelArgs)}
    model = dataclasses.replace(
        cfg.model, **{k: v for k, v in saved_model.items() if k in names and k not in set_here}
    )
    problems = model_problems(dataclasses.replace(cfg, model=model))
    if problems:
        raise ConfigError([f"with the model shape of the checkpoint being loaded: {p}" for p in problems])
    return model


def build_model(args: ModelArgs, cfg: Config, topo: Topology) -> torch.nn.Module:
    """The plain model (pp = 1) or the DeepSpeed pipeline form (pp > 1) of the same layer list, with LoRA
    adapters (and everything else frozen) when ``lora.rank`` > 0."""
    if cfg.parallel.pp > 1:
        model = pipeline_module(args, topo, seed=cfg.seed, partition_method=cfg.parallel.partition_method,
                                recompute=cfg.parallel.activation_checkpoint, every_n=cfg.parallel.every_n,
                                sequence_parallel=cfg.parallel.sequence_parallel)  # fmt: skip
    else:
        model = GPT(args, tp_group=topo.tensor_group, seed=cfg.seed, recompute=cfg.parallel.activation_checkpoint,
                    every_n=cfg.parallel.every_n, sequence_parallel=cfg.parallel.sequence_parallel)  # fmt: skip
    if cfg.lora.rank:
        from neo.model.lora import apply_lora

        apply_lora(model, lora_spec(cfg), cfg.seed)
    return model


def lora_spec(cfg: Config):
    from neo.model.lora import LoRASpec

    lo = cfg.lora
    return LoRASpec(lo.rank, lo.alpha, lo.dropout, list(lo.targets), dict(lo.rank_pattern))


def frozen_reference(model: torch.nn.Module, cfg: Config, device: torch.device):
    """DPO's and RL's reference, as ``forward(inputs, loss_fn) -> loss_fn(head, hidden, ())``: with LoRA the
    policy with its adapters switched off; otherwise a frozen copy of ``model`` (the policy as it starts, its
    weights loaded) in the training dtype, on the training device (DeepSpeed moves only the policy). Plain
    form only (the config refuses DPO and RL with a pipeline). Under ZeRO-3 the adapter-free forward is a call
    of the whole module, whose DeepSpeed hooks gather each layer's weights as the engine's forward does."""
    import copy

    from neo.model.gpt import set_loss

    if cfg.lora.rank:  # the policy with its adapters off: the base, with no second copy of the weights
        from neo.model.lora import lora_disabled

        def base_forward(inputs, loss_fn):
            with lora_disabled(model):
                set_loss(model, loss_fn)
                try:
                    return model(inputs, labels=())
                finally:
                    set_loss(model, policy_loss)

        policy_loss = model.loss_fn
        return base_forward
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype, torch.float32)
    # a process group cannot be copied: the copy shares the policy's (its TP slices need the same group)
    groups = {id(v): v for m in model.modules() for v in vars(m).values() if isinstance(v, dist.ProcessGroup)}
    reference = copy.deepcopy(model, memo=groups).to(device=device, dtype=dtype).eval().requires_grad_(False)

    def forward(inputs, loss_fn):
        set_loss(reference, loss_fn)
        return reference(inputs, labels=())

    return forward


def inductor_problem(device: torch.device, dtype: str = "fp32") -> str | None:
    """Why torch.compile's default backend (inductor) cannot compile a block for ``device`` and the run's
    ``dtype`` here, or None.

    Asked before compiling, because inductor otherwise fails at the first step, deep in code generation:
    on a CPU it compiles C++ (it needs g++ or $CXX), on a GPU it generates Triton kernels. On a CPU in
    bf16/fp16, torch <= 2.13's C++ code for the block's backward does not compile (a vectorized reduction
    stored to two outputs, the gradients of the two output biases, declares its converted value twice;
    seen with torch 2.13.0 on an AVX512-BF16 Xeon), so those runs stay eager too."""
    try:
        import torch._inductor.config  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: no inductor
        return f"this torch ({torch.__version__}) has no inductor backend ({type(e).__name__}: {e})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton, inductor's GPU code generator, is not installed (pip install triton)"
        return None
    if dtype in ("bf16", "fp16"):
        return (f"torch {torch.__version__}'s inductor writes C++ for a {dtype} block's backward on a CPU that "
                "does not compile (a reduction stored twice); fp32 compiles")  # fmt: skip
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - torch's own check; its error type is internal
        return f"inductor finds no working C++ compiler on this CPU ({e}). Fix: install g++ or set CXX to one"
    return None


def compile_blocks(model: torch.nn.Module, cfg: Config, device: torch.device) -> str | None:
    """``model.compile``: compile each transformer block in place (``Block.compile()``), in either form.

    Regional compilation: every block runs the same code, so dynamo traces and inductor compiles one block
    (forward and backward) and the others reuse it; the embedding, final norm and fused head + loss stay
    eager. Parameter names, and so checkpoints, are unchanged. Returns the line to log (None: compile off).
    """
    if not cfg.model.compile:
        return None
    problem = inductor_problem(device, cfg.precision.dtype)
    if problem:
        return f"neo: warning: model.compile is on, but {problem}; the blocks run eager (uncompiled)."
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile()
    return (f"neo: model.compile: {len(blocks)} block{'s' * (len(blocks) != 1)} compiled with torch.compile "
            "(inductor, one block's code shared by all); the first step includes compiling")  # fmt: skip


def tied_copies(model: torch.nn.Module, topo: Topology) -> set[int]:
    """Ids of parameters that duplicate another stage's (a tied embedding on the last pipeline stage): the
    global gradient norm counts them once."""
    if topo.pp > 1 and topo.coord.pipe > 0:
        return {id(p) for p in model.tied_modules.parameters()}
    return set()


def build_optimizer(model: torch.nn.Module, cfg: Config, topo: Topology, device: torch.device):
    """AdamW over the trainable parameters (decay on matrices only). neo clips in the optimizer itself in the
    one mode where DeepSpeed would not report the norm (fp32 without ZeRO, see neo/train/optim.py)."""
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    adam = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=o.fused and fused_adamw_supported(device))
    if neo_clips(cfg.zero.stage, cfg.precision.dtype):
        return ClippingAdamW(groups, topo=topo, max_norm=o.grad_clip, skip=tied_copies(model, topo), **adam)
    return torch.optim.AdamW(groups, **adam)


def build_engine(model: torch.nn.Module, optimizer, cfg: Config, topo: Topology, device: torch.device):
    """``deepspeed.initialize`` with neo's optimizer, LR schedule and process grid: (engine, optimizer, scheduler)."""
    import deepspeed

    from neo import ds_compat

    if device.type == "cpu" and cfg.zero.stage > 0:
        ds_compat.fp32_zero_grad_norms()
    lr_fn = schedule_from_config(cfg)
    engine, ds_optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lambda opt: LRSchedule(opt, lr_fn),
        config=deepspeed_config(cfg), mpu=topo if (topo.tp > 1 and topo.pp == 1) else None,
        dist_init_required=False,
    )  # fmt: skip
    ds_compat.skip_single_rank_allreduce(engine)  # dp = 1 without ZeRO: nothing to reduce
    return engine, ds_optimizer, scheduler


def check_precision(cfg: Config, device: torch.device) -> str | None:
    """Refuse fp16 on a CPU (DeepSpeed's CPU accelerator has none); a warning for emulated bf16, or None."""
    if cfg.precision.dtype == "fp16" and device.type == "cpu":
        raise ConfigError([
            "precision.dtype = fp16 needs a GPU: DeepSpeed's CPU accelerator refuses fp16 ('Type fp16 is not "
            "supported on your device'). Fix: use precision.dtype: fp32 on CPU (or bf16 where the CPU has "
            "native bf16: AVX512-BF16 or AMX)."
        ])  # fmt: skip
    if (
        cfg.precision.dtype == "bf16"
        and device.type == "cpu"
        and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    ):
        return (f"neo: warning: precision.dtype = bf16 on a CPU without native bf16 "
                f"({torch.backends.cpu.get_cpu_capability()}, no AVX512-BF16/AMX): PyTorch emulates bf16 matrix "
                "multiplies, measured ~250x slower than fp32 on such a CPU. Use precision.dtype: fp32 here.")  # fmt: skip
    return None
