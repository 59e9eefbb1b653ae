"""Validation: every impossible value or combination, each reported with its key, its source and the fix."""

from __future__ import annotations

import importlib.util
from typing import Any

from neo.config.build import _Builder
from neo.config.schema import Config
from neo.data.splits import parse_split
from neo.errors import DataError


def _check(cfg: Config, b: _Builder) -> None:
    """Every check; combination checks run only when the sizes they divide are valid."""
    if _check_sizes(cfg, b):
        _check_model(cfg, b)
        _check_parallel(cfg, b)
        _check_zero_and_precision(cfg, b)
    _check_lora(cfg, b)
    _check_passthrough(cfg, b)
    _check_training(cfg, b)
    _check_launch(cfg, b)
    _check_wandb(cfg, b)
    _resolve_batch(cfg, b)
    _check_objective(cfg, b)


def model_problems(cfg: Config) -> list[str]:
    """The problems of ``cfg.model`` and its parallel layout alone (a model shape taken from a checkpoint)."""
    b = _Builder({})
    if _check_sizes(cfg, b):
        _check_model(cfg, b)
        _check_parallel(cfg, b)
    return b.problems


def _check_sizes(cfg: Config, b: _Builder) -> bool:
    """Sizes that must be positive; False when one is not (the checks that divide by them wait)."""
    p, m, par, w = b.problems, cfg.model, cfg.parallel, b.where

    def positive(key: str, value, allow_zero: bool = False) -> bool:
        if value is None or value > 0 or (allow_zero and value == 0):
            return True
        p.append(f"{key} = {value} {w(key)} must be {'>= 0' if allow_zero else '> 0'}")
        return False

    sizes_ok = all(
        [
            positive("model.n_layers", m.n_layers),
            positive("model.hidden_size", m.hidden_size),
            positive("model.n_heads", m.n_heads),
            positive("model.n_kv_heads", m.n_kv_heads),
            positive("model.seq_length", m.seq_length),
            positive("model.ffn_hidden_size", m.ffn_hidden_size),
            positive("model.vocab_size", m.vocab_size),
            positive("model.vocab_multiple", m.vocab_multiple),
            positive("model.max_position_embeddings", m.max_position_embeddings),
            positive("parallel.tp", par.tp),
            positive("parallel.pp", par.pp),
        ]
    )
    positive("parallel.every_n", par.every_n)
    positive("model.loss_chunk_size", m.loss_chunk_size, allow_zero=True)
    positive("model.sliding_window", m.sliding_window)
    return sizes_ok


def _check_model(cfg: Config, b: _Builder) -> None:
    p, m, w = b.problems, cfg.model, b.where
    if m.hidden_size % m.n_heads:
        p.append(
            f"model.hidden_size = {m.hidden_size} {w('model.hidden_size')} is not divisible by "
            f"model.n_heads = {m.n_heads} {w('model.n_heads')}. Fix: make hidden_size a multiple of n_heads "
            f"(e.g. {m.hidden_size // m.n_heads * m.n_heads or m.n_heads})."
        )
    elif m.position_embedding == "rotary":
        if not 0.0 < m.rotary_pct <= 1.0:
            p.append(f"model.rotary_pct = {m.rotary_pct} {w('model.rotary_pct')} must be in (0, 1]")
        elif m.rotary_dim % 2:
            p.append(
                f"model.rotary_pct = {m.rotary_pct} {w('model.rotary_pct')} gives an odd rotary dimension "
                f"{m.rotary_dim} of head_dim {m.head_dim}. Fix: choose rotary_pct so head_dim * rotary_pct "
                "is even (0.25, 0.5, 1.0 with head_dim a multiple of 8)."
            )
    if m.n_heads % m.kv_heads:
        p.append(
            f"model.n_kv_heads = {m.n_kv_heads} {w('model.n_kv_heads')} does not divide model.n_heads = "
            f"{m.n_heads} {w('model.n_heads')}: each key/value head serves a whole group of query heads. "
            f"Fix: choose n_kv_heads among the divisors of n_heads (1 is multi-query, n_heads is multi-head)."
        )
    _check_rope_scaling(cfg, b)
    if m.seq_length > m.max_positions:
        p.append(
            f"model.seq_length = {m.seq_length} {w('model.seq_length')} is above "
            f"model.max_position_embeddings = {m.max_positions} {w('model.max_position_embeddings')}. "
            "Fix: lower seq_length or raise max_position_embeddings."
        )
    for key, value in (
        ("model.attention_dropout", m.attention_dropout),
        ("model.hidden_dropout", m.hidden_dropout),
    ):
        if not 0.0 <= value < 1.0:
            p.append(f"{key} = {value} {w(key)} must be in [0, 1)")


def _check_rope_scaling(cfg: Config, b: _Builder) -> None:
    p, m, w = b.problems, cfg.model, b.where
    sc, key = m.rope_scaling, "model.rope_scaling"
    if sc.type == "none":
        return
    if m.position_embedding != "rotary":
        p.append(
            f"{key}.type = {sc.type} {w(key + '.type')} scales rotary frequencies, but "
            f"model.position_embedding = {m.position_embedding}. Fix: remove {key} or use rotary."
        )
    if not sc.factor >= 1.0:
        p.append(
            f"{key}.factor = {sc.factor} {w(key + '.factor')} must be >= 1 (how much longer the context is)"
        )
    if sc.type == "llama3":
        if sc.original_max_positions <= 0:
            p.append(f"{key}.original_max_positions = {sc.original_max_positions} must be > 0")
        if not 0 < sc.low_freq_factor < sc.high_freq_factor:
            p.append(
                f"{key}: low_freq_factor = {sc.low_freq_factor} {w(key + '.low_freq_factor')} and "
                f"high_freq_factor = {sc.high_freq_factor} {w(key + '.high_freq_factor')} must satisfy "
                "0 < low_freq_factor < high_freq_factor (Llama 3.1: 1 and 4)"
            )


def _check_parallel(cfg: Config, b: _Builder) -> None:
    p, m, par, w = b.problems, cfg.model, cfg.parallel, b.where
    if par.tp > 1:
        for key, value in (
            ("model.n_heads", m.n_heads),
            ("model.hidden_size", m.hidden_size),
            ("model.ffn_hidden_size", m.ffn_size),
            ("model.vocab_size", m.vocab_size),
            ("model.vocab_multiple", m.vocab_multiple if m.vocab_size is None else None),
        ):
            if value is not None and value % par.tp:
                p.append(
                    f"{key} = {value} {w(key)} is not divisible by parallel.tp = {par.tp} {w('parallel.tp')}. "
                    f"Fix: choose a tp that divides {key.split('.')[1]}, or change {key}."
                )
        if m.n_kv_heads is not None and m.n_kv_heads % par.tp:
            p.append(
                f"model.n_kv_heads = {m.n_kv_heads} {w('model.n_kv_heads')} is not divisible by parallel.tp = "
                f"{par.tp} {w('parallel.tp')}: neo splits key/value heads across tensor-parallel ranks and does "
                "not replicate them. Fix: choose a tp that divides n_kv_heads."
            )
    if par.sequence_parallel and par.tp == 1:
        p.append(
            f"parallel.sequence_parallel = true {w('parallel.sequence_parallel')} splits the sequence across "
            f"tensor-parallel ranks, but parallel.tp = 1 {w('parallel.tp')}. Fix: set parallel.tp >= 2, or "
            "sequence_parallel: false."
        )
    elif par.sequence_parallel and m.seq_length % par.tp:
        p.append(
            f"model.seq_length = {m.seq_length} {w('model.seq_length')} is not divisible by parallel.tp = "
            f"{par.tp} {w('parallel.tp')}, which parallel.sequence_parallel splits it by. Fix: choose a "
            "seq_length that tp divides, or sequence_parallel: false."
        )
    if par.pp > m.n_layers + 2:
        p.append(
            f"parallel.pp = {par.pp} {w('parallel.pp')} is more stages than layers to place "
            f"(model.n_layers = {m.n_layers} blocks + embedding + head). Fix: lower parallel.pp."
        )
    method = par.partition_method
    if method not in ("parameters", "uniform") and not method.startswith("type:"):
        p.append(
            f"parallel.partition_method = {method!r} {w('parallel.partition_method')} must be 'parameters', "
            "'uniform' or 'type:<layer class regex>' (e.g. 'type:Block')"
        )
    if cfg.world_size % (par.tp * par.pp):
        p.append(
            f"world size {cfg.world_size} (processes launched) is not divisible by parallel.tp x parallel.pp = "
            f"{par.tp} x {par.pp} = {par.tp * par.pp}. Fix: launch a multiple of {par.tp * par.pp} processes "
            "or change tp/pp."
        )


def _check_lora(cfg: Config, b: _Builder) -> None:
    from neo.model.lora import TARGETS

    p, lo, w = b.problems, cfg.lora, b.where
    if lo.rank < 0 or any(not isinstance(v, int) or v <= 0 for v in lo.rank_pattern.values()):
        p.append(
            f"lora.rank = {lo.rank} {w('lora.rank')} must be >= 0 (0: off), and lora.rank_pattern's ranks > 0"
        )
    unknown = [t for t in [*lo.targets, *lo.rank_pattern] if t not in TARGETS]
    if unknown:
        p.append(f"lora targets {unknown} {w('lora.targets')} are not among {', '.join(TARGETS)}")
    if lo.rank and (lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0 or not lo.targets):
        p.append(f"lora: alpha must be > 0, dropout in [0, 1) and targets not empty {w('lora')}")


def _check_objective(cfg: Config, b: _Builder) -> None:
    p, o, w = b.problems, cfg.objective, b.where
    if o.type == "dpo" and cfg.parallel.pp > 1:
        p.append(f"objective.type = dpo {w('objective.type')} cannot run with parallel.pp = {cfg.parallel.pp} "
                 f"{w('parallel.pp')}: the reference model's log-probabilities are computed in the same step, "
                 "outside the pipeline. Fix: use tensor parallelism (parallel.tp) and ZeRO instead of pp.")  # fmt: skip
    if o.beta <= 0:
        p.append(f"objective.beta = {o.beta} {w('objective.beta')} must be > 0")
    if not 0.0 <= o.label_smoothing < 0.5:
        p.append(
            f"objective.label_smoothing = {o.label_smoothing} {w('objective.label_smoothing')} must be in [0, 0.5)"
        )
    if o.centering < 0:
        p.append(f"objective.centering = {o.centering} {w('objective.centering')} must be >= 0")
    if o.type in ("ppo", "grpo"):
        _check_online(cfg, b)


def _check_online(cfg: Config, b: _Builder) -> None:
    """PPO/GRPO: a reward, no pipeline, and rollouts that divide into whole optimizer steps."""
    p, o, w = b.problems, cfg.objective, b.where
    if cfg.parallel.pp > 1:
        p.append(f"objective.type = {o.type} needs parallel.pp = 1 {w('parallel.pp')}: the rollouts sample token by "
                 "token from the whole policy. Fix: use parallel.tp and ZeRO instead.")  # fmt: skip
    if bool(o.reward) == bool(o.reward_model):
        p.append(f"objective.type = {o.type} needs exactly one of objective.reward (a 'module:function') and "
                 "objective.reward_model (a reward checkpoint)")  # fmt: skip
    group = o.group_size or (4 if o.type == "grpo" else 1)
    if o.type == "grpo" and group < 2:
        p.append(f"objective.group_size = {group} {w('objective.group_size')}: GRPO compares responses within a "
                 "group, so it needs at least 2")  # fmt: skip
    sequences = o.rollout_prompts * group
    g = cfg.batch.global_batch_size
    if o.rollout_prompts % max(cfg.dp, 1) or (g and (sequences * o.ppo_epochs) % g):
        p.append(f"objective.rollout_prompts = {o.rollout_prompts} x group_size {group} x ppo_epochs "
                 f"{o.ppo_epochs} must split into whole steps of batch.global_batch_size = {g}, and the prompts "
                 f"evenly over {cfg.dp} data-parallel ranks")  # fmt: skip


def _check_zero_and_precision(cfg: Config, b: _Builder) -> None:
    p, par, w = b.problems, cfg.parallel, b.where
    z = cfg.zero
    if z.stage not in (0, 1, 2, 3):
        p.append(f"zero.stage = {z.stage} {w('zero.stage')} must be 0, 1, 2 or 3")
    if z.stage >= 2 and par.pp > 1:
        p.append(
            f"zero.stage = {z.stage} {w('zero.stage')} cannot be combined with pipeline parallelism "
            f"(parallel.pp = {par.pp} {w('parallel.pp')}): DeepSpeed partitions gradients/parameters across "
            "micro-batches only without a pipeline. Fix: use zero.stage 0 or 1 with pp > 1."
        )
    if z.offload_optimizer != "none" and z.stage == 0:
        p.append(
            f"zero.offload_optimizer = {z.offload_optimizer} {w('zero.offload_optimizer')} needs "
            "zero.stage >= 1. Fix: set zero.stage: 1 (or 2, 3)."
        )
    if cfg.precision.dtype == "bf16" and par.pp > 1 and z.stage == 0:
        p.append(
            f"precision.dtype = bf16 with parallel.pp = {par.pp} needs zero.stage >= 1 {w('zero.stage')}: "
            "DeepSpeed 0.19 cannot resume a bf16 pipeline checkpoint saved with ZeRO-0 (KeyError in its "
            "bf16 optimizer). Fix: set zero.stage: 1 (same memory on one data-parallel rank)."
        )
    if cfg.model.compile and z.stage == 3:
        p.append(
            f"model.compile = true {w('model.compile')} cannot be combined with zero.stage = 3 {w('zero.stage')}: "
            "ZeRO-3 gathers each partitioned weight in module hooks that torch.compile traces as empty "
            "tensors. Fix: use zero.stage 0-2 with model.compile, or model.compile: false."
        )
    fp = cfg.precision.fp16
    if fp.loss_scale < 0 or fp.min_loss_scale <= 0 or fp.loss_scale_window <= 0 or fp.hysteresis < 1:
        p.append(
            "precision.fp16: loss_scale must be >= 0, min_loss_scale > 0, loss_scale_window > 0, "
            "hysteresis >= 1"
        )


_OWNED = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.grad_accum",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer": "optimizer",
    "scheduler": "schedule",
    "zero_optimization.stage": "zero.stage",
    "fp16.enabled": "precision.dtype",
    "bf16.enabled": "precision.dtype",
}


def _check_passthrough(cfg: Config, b: _Builder) -> None:
    """The deepspeed: section may add keys, not contradict ones neo derives."""
    ds = cfg.deepspeed
    for key, owner in _OWNED.items():
        node: Any = ds
        for part in key.split("."):
            node = node.get(part, None) if isinstance(node, dict) else None
        if node is None:
            continue
        if key in ("fp16.enabled", "bf16.enabled"):
            wanted = cfg.precision.dtype == key.split(".")[0]
            if bool(node) == wanted:
                continue
            b.problems.append(
                f"deepspeed.{key} = {node} {b.where('deepspeed.' + key)} contradicts "
                f"precision.dtype = {cfg.precision.dtype} {b.where('precision.dtype')} (fp16 and bf16 "
                f"are never both on). Fix: choose fp32, bf16 or fp16 with precision.dtype and remove "
                f"deepspeed.{key}."
            )
            continue
        b.problems.append(
            f"deepspeed.{key} {b.where('deepspeed.' + key)} is derived by neo from {owner}. "
            f"Fix: set {owner} instead and remove deepspeed.{key}."
        )


def _check_warmup(cfg: Config, b: _Builder) -> None:
    """Warmup in steps (an int, or a whole float >= 1) or as a fraction of the run (a float below 1)."""
    p, w, s = b.problems, b.where, cfg.schedule
    if s.warmup < 0 or (isinstance(s.warmup, float) and s.warmup >= 1 and not s.warmup.is_integer()):
        p.append(f"schedule.warmup = {s.warmup} {w('schedule.warmup')} must be a number of steps (>= 0) or a "
                 "fraction of schedule.iterations below 1 (e.g. 0.1)")  # fmt: skip
        return
    steps = cfg.warmup_steps
    if s.iterations > 0 and steps > s.iterations:
        p.append(f"schedule.warmup = {s.warmup} {w('schedule.warmup')} is {steps} steps, longer than the run "
                 f"(schedule.iterations = {s.iterations} {w('schedule.iterations')}). Fix: give the warmup as a "
                 f"fraction of the run (e.g. schedule.warmup=0.1), or lower it, or raise schedule.iterations.")  # fmt: skip
    if s.decay_iters is not None and s.decay_iters <= steps:
        p.append(f"schedule.decay_iters = {s.decay_iters} {w('schedule.decay_iters')} must be above the warmup "
                 f"({steps} steps from schedule.warmup = {s.warmup})")  # fmt: skip


def _check_training(cfg: Config, b: _Builder) -> None:
    p, w = b.problems, b.where
    s, o = cfg.schedule, cfg.optimizer
    if s.iterations <= 0:
        p.append(f"schedule.iterations = {s.iterations} {w('schedule.iterations')} must be > 0")
    _check_warmup(cfg, b)
    if s.exit_interval is not None and s.exit_interval <= 0:
        p.append(
            f"schedule.exit_interval = {s.exit_interval} {w('schedule.exit_interval')} must be > 0 (or null)"
        )
    if o.lr <= 0:
        p.append(f"optimizer.lr = {o.lr} {w('optimizer.lr')} must be > 0")
    elif not 0 <= s.min_lr <= o.lr:
        p.append(
            f"schedule.min_lr = {s.min_lr} {w('schedule.min_lr')} must be between 0 and "
            f"optimizer.lr = {o.lr} {w('optimizer.lr')}"
        )
    if len(o.betas) != 2 or not all(0 <= x < 1 for x in o.betas):
        p.append(f"optimizer.betas = {o.betas} {w('optimizer.betas')} must be two numbers in [0, 1)")
    if o.weight_decay < 0 or o.grad_clip < 0 or o.eps <= 0:
        p.append("optimizer: weight_decay and grad_clip must be >= 0 and eps > 0")
    d = cfg.data
    if d.train_weights is not None and len(d.train_weights) != len(d.train_paths):
        p.append(
            f"data.train_weights {w('data.train_weights')} has {len(d.train_weights)} weights for "
            f"{len(d.train_paths)} data.train_paths. Fix: give one weight per path."
        )
    if d.train_weights is not None and (any(x < 0 for x in d.train_weights) or sum(d.train_weights) <= 0):
        p.append(
            f"data.train_weights = {d.train_weights} {w('data.train_weights')} must be >= 0 with a positive sum"
        )
    try:
        parse_split(d.split)
    except DataError as e:
        p.append(f"data.split = {d.split!r} {w('data.split')}: {e}")
    if cfg.eval.interval < 0 or cfg.eval.iters < 0:
        p.append("eval.interval and eval.iters must be >= 0")
    if cfg.logging.interval <= 0:
        p.append(f"logging.interval = {cfg.logging.interval} {w('logging.interval')} must be > 0")
    c = cfg.checkpoint
    if c.save_interval < 0:
        p.append(f"checkpoint.save_interval = {c.save_interval} {w('checkpoint.save_interval')} must be >= 0")
    if c.keep_last_n is not None and c.keep_last_n < 1:
        p.append(
            f"checkpoint.keep_last_n = {c.keep_last_n} {w('checkpoint.keep_last_n')} must be >= 1 "
            "(or null to keep every checkpoint)"
        )
    if c.load_weights_only and not c.load:
        p.append(
            f"checkpoint.load_weights_only {w('checkpoint.load_weights_only')} needs checkpoint.load "
            "(the checkpoint to take the weights from)"
        )


def _check_launch(cfg: Config, b: _Builder) -> None:
    for key in ("rendezvous_timeout", "collective_timeout"):
        value = getattr(cfg.launch, key)
        if not value > 0:
            b.problems.append(
                f"launch.{key} = {value} {b.where('launch.' + key)} must be > 0 (seconds). Fix: a number of "
                "seconds; there is no 'wait forever', so that a job that cannot go on fails instead of hanging."
            )


def _check_wandb(cfg: Config, b: _Builder) -> None:
    """logging.wandb needs the optional wandb package: say so before any process starts."""
    w = cfg.logging.wandb
    if w.project is None or w.mode == "disabled":
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except ValueError:  # a module object without a spec (a stub in sys.modules)
        found = False
    if not found:
        b.problems.append(
            f"logging.wandb.project = {w.project!r} {b.where('logging.wandb.project')} logs to Weights & Biases, "
            "but the wandb package is not installed. Fix: pip install wandb (or pip install 'neo[wandb]'), "
            "or remove logging.wandb."
        )


def _resolve_batch(cfg: Config, b: _Builder) -> None:
    """Fill the third of micro_batch_size, grad_accum, global_batch_size from the other two."""
    if cfg.world_size % (cfg.parallel.tp * cfg.parallel.pp) or cfg.dp < 1:
        return
    bt, dp, w = cfg.batch, cfg.dp, b.where
    mb, ga, gb = bt.micro_batch_size, bt.grad_accum, bt.global_batch_size
    for key, value in (("micro_batch_size", mb), ("grad_accum", ga), ("global_batch_size", gb)):
        if value is not None and value <= 0:
            b.problems.append(f"batch.{key} = {value} {w('batch.' + key)} must be > 0")
            return
    arithmetic = f"global_batch_size = micro_batch_size x grad_accum x data-parallel size ({dp})"
    if sum(x is not None for x in (mb, ga, gb)) < 2:
        # Fewer than two given: grad_accum defaults to 1, and micro_batch_size to 4 unless the global batch
        # alone was given (then it is split evenly over the data-parallel ranks).
        if ga is None:
            ga = 1
        if mb is None and gb is None:
            mb = 4
    if gb is None:
        gb = mb * ga * dp
    elif mb is None:
        if gb % (ga * dp):
            b.problems.append(
                f"batch.global_batch_size = {gb} {w('batch.global_batch_size')} is not divisible by "
                f"grad_accum x dp = {ga} x {dp}. Fix: {arithmetic}."
            )
            return
        mb = gb // (ga * dp)
    elif ga is None:
        if gb % (mb * dp):
            b.problems.append(
                f"batch.global_batch_size = {gb} {w('batch.global_batch_size')} is not divisible by "
                f"micro_batch_size x dp = {mb} x {dp} = {mb * dp}. Fix: {arithmetic}; "
                f"e.g. global_batch_size = {max(1, gb // (mb * dp)) * mb * dp}."
            )
            return
        ga = gb // (mb * dp)
    elif mb * ga * dp != gb:
        b.problems.append(
            f"batch: {mb} x {ga} x {dp} = {mb * ga * dp}, not global_batch_size = {gb} "
            f"{w('batch.global_batch_size')} ({arithmetic}). Fix: drop one of the three to derive it, "
            "or make them agree."
        )
        return
    bt.micro_batch_size, bt.grad_accum, bt.global_batch_size = mb, ga, gb
