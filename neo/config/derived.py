"""Values derived from a validated config: the DeepSpeed dict (the one place it is built), YAML, batch text."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from neo.config.schema import Config


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def _deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config dict: the one place it is derived. ``deepspeed:`` keys are merged last."""
    z = cfg.zero
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage > 0:
        zero.update(
            overlap_comm=z.overlap_comm,
            contiguous_gradients=z.contiguous_gradients,
            reduce_bucket_size=z.reduce_bucket_size,
            allgather_bucket_size=z.allgather_bucket_size,
        )
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": z.offload_optimizer, "pin_memory": True}
    fp = cfg.precision.fp16
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch.grad_accum,
        # fp32 without ZeRO: neo's optimizer clips (and measures the norm), see neo/train/optim.py
        "gradient_clipping": 0.0
        if (z.stage == 0 and cfg.precision.dtype == "fp32")
        else cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision.dtype == "bf16"},
        "fp16": {
            "enabled": cfg.precision.dtype == "fp16",
            "loss_scale": fp.loss_scale,
            "initial_scale_power": fp.initial_scale_power,
            "loss_scale_window": fp.loss_scale_window,
            "hysteresis": fp.hysteresis,
            "min_loss_scale": fp.min_loss_scale,
        },
        # neo passes its own torch optimizer; ZeRO must accept it.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # neo logs once per logging.interval itself; silence DeepSpeed's own step printing.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.pp > 1:
        full = cfg.parallel.activation_checkpoint == "full"
        ds["pipeline"] = {"activation_checkpoint_interval": cfg.parallel.every_n if full else 0}
        if (
            cfg.parallel.sequence_parallel
        ):  # DeepSpeed would send 1/tp of each (assumed replicated) activation
            ds["pipeline"].update(pipe_partitioned=False, grad_partitioned=False)  # and gather them: not ours
    return _deep_update(ds, cfg.deepspeed)


def lean_config(cfg: Config) -> tuple[Config, str | None]:
    """The config to run, and a line for the log when it differs from ``cfg``.

    ZeRO-1/2 partition optimizer state and gradients over the data-parallel ranks; over one rank they
    partition nothing, yet every step still copies gradients into buckets and flat fp32 partitions and
    the weights back out, and they keep a second fp32 copy of the weights. In fp32 (no offload) neo runs
    such a config as ZeRO-0, which trains the same model (the same AdamW on the same gradients) and
    says so; ``zero.single_rank_stage0: false`` keeps the stage. bf16 keeps it: there DeepSpeed's ZeRO-0
    is another optimizer wrapper (one fp32 master per tensor), not measured to be cheaper.
    """
    z = cfg.zero
    if not (z.single_rank_stage0 and cfg.dp == 1 and z.stage in (1, 2) and z.offload_optimizer == "none"
            and cfg.precision.dtype == "fp32"):  # fmt: skip
        return cfg, None
    lean = dataclasses.replace(cfg, zero=dataclasses.replace(z, stage=0))
    return lean, (f"neo: zero.stage = {z.stage} with one data-parallel rank partitions nothing: running ZeRO-0 "
                  "(the same training without ZeRO's gradient copies and second fp32 copy of the weights; "
                  "zero.single_rank_stage0: false keeps the stage)")  # fmt: skip


def batch_arithmetic(cfg: Config) -> str:
    b = cfg.batch
    return (
        f"global_batch_size {b.global_batch_size} = micro_batch_size {b.micro_batch_size} x grad_accum "
        f"{b.grad_accum} x data-parallel {cfg.dp} (world {cfg.world_size} / tp {cfg.parallel.tp} / "
        f"pp {cfg.parallel.pp}); {b.global_batch_size * cfg.model.seq_length:,} tokens per step, "
        f"{b.global_batch_size * cfg.model.seq_length * cfg.schedule.iterations:,} in the run"
    )
