"""One run, one config: typed sections, YAML merged left to right, validated before anything starts.

    cfg = load_config(["ds_configs/models/pythia-70m.yml", "my_run.yml"], ["optimizer.lr=3e-4"])

Every problem is reported at once, each line naming the key, where it was set and the fix. The
DeepSpeed config dict is derived in exactly one place, ``deepspeed_config``. Run
``python -m neo.config --explain FILES`` to see the resolved config and batch arithmetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from neo.errors import ConfigError  # noqa: F401 - re-exported: part of this module's API
from neo.model.args import ModelArgs


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: ranks that split every layer
    pp: int = 1  # pipeline stages; 1 means no pipeline
    # how layers are split into stages: "parameters", "uniform" or "type:<regex>" (e.g. "type:Block")
    partition_method: str = "parameters"
    # recompute activations in the backward pass: 0 off, else every N-th layer boundary
    activation_checkpoint_interval: int = 0


@dataclass
class DataConfig:
    tokenizer: str = "gpt2"  # tiktoken name, a .tiktoken rank file, or a folder with encoder.json + vocab.bpe
    train_paths: list[str] = field(default_factory=list)  # token file prefixes (path without .bin/.idx)
    train_weights: list[float] | None = None  # blending weights, one per train path
    valid_paths: list[str] = field(default_factory=list)  # separate validation token files (instead of split)
    test_paths: list[str] = field(default_factory=list)  # separate test token files
    split: str = "969,30,1"  # train,valid,test share of documents when no valid/test paths are given
    cache_dir: str | None = None  # where sample-index arrays are cached; None: beside the data


@dataclass
class OptimizerConfig:
    type: Literal["adamw"] = "adamw"  # AdamW (torch), weight decay decoupled
    lr: float = 6e-4  # peak learning rate, reached after warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam beta1, beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # applied to matrices only (not biases or norms)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    # torch's fused AdamW kernel (each element read and written once per step, instead of one pass
    # per operation); falls back to the multi-tensor implementation where the device has no fused kernel
    fused: bool = True


@dataclass
class ScheduleConfig:
    iterations: int = 1000  # optimizer steps of the run
    warmup: int = 0  # steps of linear warmup from 0 to optimizer.lr
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape of the decay after warmup
    decay_iters: int | None = None  # steps over which lr decays to min_lr; None: iterations
    min_lr: float = 0.0  # learning rate at the end of the decay
    # stop (after saving a checkpoint) once this launch has run N steps; the next launch resumes.
    # For fixed-length job slots; None trains to `iterations`.
    exit_interval: int | None = None


@dataclass
class BatchConfig:
    """global = micro_batch_size x grad_accum x data-parallel size; give any two."""

    micro_batch_size: int | None = None  # samples per forward pass per data-parallel rank
    grad_accum: int | None = None  # micro-batches per optimizer step (pipeline: micro-batches in flight)
    global_batch_size: int | None = None  # samples per optimizer step, all ranks together


@dataclass
class Fp16Config:
    """Dynamic loss scaling (DeepSpeed's fp16 section)."""

    loss_scale: float = 0.0  # 0: dynamic; > 0: this static scale
    initial_scale_power: int = 16  # dynamic scaling starts at 2**power
    loss_scale_window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0  # the dynamic scale never goes below this


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: mixed precision with fp32 master weights
    fp16: Fp16Config = field(default_factory=Fp16Config)


@dataclass
class ZeroConfig:
    stage: int = 0  # 0 off, 1 optimizer state, 2 + gradients, 3 + parameters partitioned over data parallel
    offload_optimizer: Literal["none", "cpu"] = "none"  # keep optimizer state and step on the CPU
    overlap_comm: bool = False  # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <logging.dir>/checkpoints
    save_interval: int = 0  # save every N steps (0: only at the end); also saved on SIGTERM/SIGUSR1
    keep_last_n: int | None = 2  # older checkpoints are pruned after a new one is published; None keeps all
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one
    load: str | None = None  # start from this checkpoint (a folder) instead
    load_weights_only: bool = False  # with `load`: weights only, fresh optimizer, iteration 0 (fine-tuning)


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # the run's outputs: resolved config, metrics.jsonl, checkpoints
    interval: int = 10  # one log line every N steps
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    peak_tflops: float | None = None  # per-device peak for MFU; None: looked up by device name


@dataclass
class EvalConfig:
    interval: int = 100  # validate every N steps (0: never; always at the end when iters > 0)
    iters: int = 10  # global batches per validation


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra keys passed to DeepSpeed as they are
    seed: int = 1234
    # Filled by load_config: the data-parallel size the batch arithmetic was resolved for.
    world_size: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.parallel.tp * self.parallel.pp)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.dir, "checkpoints")


# --------------------------------------------------------------------------- loading and merging


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(
            [f"{path}: no such config file. Fix: check the path (configs live in ds_configs/)."]
        )
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{path}: the top level must be a mapping of sections (model:, batch:, ...), "
                f"not a {type(data).__name__}"
            ]
        )
    return data


def _merge(base: dict, new: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``new`` into ``base`` (later wins; lists are replaced), recording who set each key."""
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, sources, dotted + ".")
        else:
            base[key] = value
            sources[dotted] = source
            if isinstance(value, dict):
                for sub in _flatten(value, dotted + "."):
                    sources[sub] = source


def _flatten(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
    return out


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as YAML (3, true, [1, 2], gpt2)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=3e-4"])
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


# --------------------------------------------------------------------------- typed construction


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    """(ok, value converted to ``tp``). YAML reads 6e-4 as a string, so floats accept numeric strings."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _coerce(v, item)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                return False, value
            return (f.is_integer(), int(f))
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return False, value


class _Builder:
    def __init__(self, sources: dict[str, str]):
        self.sources = sources
        self.problems: list[str] = []
        self.type_errors = 0  # values that could not be read; combination checks wait for these

    def where(self, key: str) -> str:
        src = self.sources.get(key)
        return f"(set in {src})" if src else "(default)"

    def build(self, cls, data: Any, prefix: str):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "world_size"]
        if not isinstance(data, dict):
            self.problems.append(
                f"{prefix.rstrip('.')} {self.where(prefix.rstrip('.'))} must be a mapping of "
                f"keys ({', '.join(names)}), got {data!r}"
            )
            return cls()
        kwargs = {}
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = (
                    f" Did you mean '{prefix}{close[0]}'?" if close else f" Known keys: {', '.join(names)}."
                )
                self.problems.append(f"unknown key '{dotted}' {self.where(dotted)}.{hint}")
                continue
            tp = hints[key]
            if dataclasses.is_dataclass(tp):
                kwargs[key] = self.build(tp, value, dotted + ".")
                continue
            ok, converted = _coerce(value, tp)
            if not ok:
                self.problems.append(f"{dotted} = {value!r} {self.where(dotted)} must be {_describe(tp)}")
                self.type_errors += 1
                continue
            kwargs[key] = converted
        return cls(**kwargs)


def _shorthand(data: dict) -> dict:
    """Accept ``precision: bf16`` for ``precision: {dtype: bf16}``."""
    if isinstance(data.get("precision"), str):
        data = dict(data, precision={"dtype": data["precision"]})
    return data


# --------------------------------------------------------------------------- validation


def _check(cfg: Config, b: _Builder) -> None:
    p = b.problems
    m, par, w = cfg.model, cfg.parallel, b.where

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
            positive("model.seq_length", m.seq_length),
            positive("model.ffn_hidden_size", m.ffn_hidden_size),
            positive("model.vocab_size", m.vocab_size),
            positive("model.max_position_embeddings", m.max_position_embeddings),
            positive("parallel.tp", par.tp),
            positive("parallel.pp", par.pp),
        ]
    )
    positive("parallel.activation_checkpoint_interval", par.activation_checkpoint_interval, allow_zero=True)
    positive("model.loss_chunk_size", m.loss_chunk_size, allow_zero=True)
    if not sizes_ok:
        return
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

    # tensor and pipeline parallelism
    if par.tp > 1:
        for key, value in (
            ("model.n_heads", m.n_heads),
            ("model.hidden_size", m.hidden_size),
            ("model.ffn_hidden_size", m.ffn_size),
            ("model.vocab_size", m.vocab_size),
        ):
            if value is not None and value % par.tp:
                p.append(
                    f"{key} = {value} {w(key)} is not divisible by parallel.tp = {par.tp} {w('parallel.tp')}. "
                    f"Fix: choose a tp that divides {key.split('.')[1]}, or change {key}."
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

    # ZeRO and precision
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
    fp = cfg.precision.fp16
    if fp.loss_scale < 0 or fp.min_loss_scale <= 0 or fp.loss_scale_window <= 0 or fp.hysteresis < 1:
        p.append(
            "precision.fp16: loss_scale must be >= 0, min_loss_scale > 0, loss_scale_window > 0, "
            "hysteresis >= 1"
        )

    _check_passthrough(cfg, b)
    _check_training(cfg, b)
    _resolve_batch(cfg, b)


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


def _check_training(cfg: Config, b: _Builder) -> None:
    p, w = b.problems, b.where
    s, o = cfg.schedule, cfg.optimizer
    if s.iterations <= 0:
        p.append(f"schedule.iterations = {s.iterations} {w('schedule.iterations')} must be > 0")
    if not 0 <= s.warmup <= max(s.iterations, 0):
        p.append(
            f"schedule.warmup = {s.warmup} {w('schedule.warmup')} must be between 0 and "
            f"schedule.iterations = {s.iterations}"
        )
    if s.decay_iters is not None and s.decay_iters <= s.warmup:
        p.append(
            f"schedule.decay_iters = {s.decay_iters} {w('schedule.decay_iters')} must be above "
            f"schedule.warmup = {s.warmup}"
        )
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
    parts = d.split.replace("/", ",").split(",")
    try:
        shares = [float(x) for x in parts]
        if len(shares) > 3 or any(x < 0 for x in shares) or sum(shares) <= 0:
            raise ValueError
    except ValueError:
        p.append(
            f"data.split = {d.split!r} {w('data.split')} must be up to three non-negative numbers "
            "train,valid,test such as '969,30,1'"
        )
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


def load_config(
    files: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    world_size: int | None = None,
) -> Config:
    """Merge YAML ``files`` left to right, apply ``key=value`` overrides, build and validate.

    ``world_size`` (default: $WORLD_SIZE, else $SLURM_NTASKS, else 1) resolves the batch arithmetic.
    Raises ``ConfigError`` listing every problem found.
    """
    merged: dict = {}
    sources: dict[str, str] = {}
    for path in files:
        _merge(merged, _shorthand(_read_yaml(path)), path, sources)
    for text in overrides:
        _merge(merged, _shorthand(parse_override(text)), "--set", sources)
    b = _Builder(sources)
    cfg = b.build(Config, merged, "")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    cfg.world_size = world_size
    if not b.type_errors:
        _check(cfg, b)
    if b.problems:
        raise ConfigError(b.problems)
    cfg.sources = sources  # type: ignore[attr-defined]
    return cfg


# --------------------------------------------------------------------------- derived values


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
        ds["pipeline"] = {"activation_checkpoint_interval": cfg.parallel.activation_checkpoint_interval}
    return _deep_update(ds, cfg.deepspeed)


def batch_arithmetic(cfg: Config) -> str:
    b = cfg.batch
    return (
        f"global_batch_size {b.global_batch_size} = micro_batch_size {b.micro_batch_size} x grad_accum "
        f"{b.grad_accum} x data-parallel {cfg.dp} (world {cfg.world_size} / tp {cfg.parallel.tp} / "
        f"pp {cfg.parallel.pp}); {b.global_batch_size * cfg.model.seq_length:,} tokens per step, "
        f"{b.global_batch_size * cfg.model.seq_length * cfg.schedule.iterations:,} in the run"
    )


# --------------------------------------------------------------------------- reference documentation


def _field_comments(cls) -> dict[str, str]:
    """Each field's comment in the class source: trailing (``x: int = 1  # ...``) or on the lines above."""
    import inspect
    import re

    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+): [^=]+?(?:= .*?)?(?:\s+#\s*(.*))?$", stripped)
        if m and not stripped.startswith(("def ", "class ", "@", "return")):
            text = " ".join([*pending, m.group(2) or ""]).strip()
            if text:
                comments[m.group(1)] = text
        pending = []
    return comments


def reference_markdown() -> str:
    """The config reference (README's table), generated from the dataclasses and their comments."""
    defaults = to_dict(Config())
    out = []
    for f in dataclasses.fields(Config):
        if f.name == "world_size":
            continue
        tp = typing.get_type_hints(Config)[f.name]
        if not dataclasses.is_dataclass(tp):
            doc = (
                "extra DeepSpeed config keys, merged last (neo refuses keys it derives itself)"
                if f.name == "deepspeed"
                else "seed of the weights, the data order and dropout"
            )
            out.append(f"| `{f.name}` | {_describe(tp)} | `{defaults[f.name]}` | {doc} |")
            continue
        stack = [(f"{f.name}.", tp, defaults[f.name])]
        while stack:
            prefix, cls, values = stack.pop(0)
            notes = _field_comments(cls)
            hints = typing.get_type_hints(cls)
            for sub in dataclasses.fields(cls):
                if dataclasses.is_dataclass(hints[sub.name]):
                    stack.append((f"{prefix}{sub.name}.", hints[sub.name], values[sub.name]))
                    continue
                default = values[sub.name]
                out.append(
                    f"| `{prefix}{sub.name}` | {_describe(hints[sub.name]).replace('|', '/')} | `{default}` | "
                    f"{notes.get(sub.name, '')} |"
                )
    return "| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(out) + "\n"


# --------------------------------------------------------------------------- command line


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG.yml",
        help="YAML config files, merged left to right (later files win)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neo.config", description="Resolve, validate and explain neo config files."
    )
    parser.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG.yml",
        help="YAML config files, merged left to right (later files win)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optimizer.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--reference", action="store_true", help="print the config reference (markdown)")
    parser.add_argument("--explain", action="store_true", help="print the resolved config and derived values")
    parser.add_argument("--world-size", type=int, default=None, help="processes the run will use (default 1)")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    if not args.configs:
        parser.error("give at least one config file (or --reference)")
    try:
        cfg = load_config(args.configs, args.overrides, args.world_size)
    except ConfigError as e:
        print(f"neo: {e}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    if args.explain:
        import json

        print("# sources (key: file that set it; everything else is a default)")
        sources = cfg.sources  # type: ignore[attr-defined]
        for key, src in sorted(sources.items()):
            if not any(other.startswith(key + ".") for other in sources):
                print(f"#   {key}: {src}")
        print(f"# batch: {batch_arithmetic(cfg)}")
        print("# deepspeed config:", json.dumps(deepspeed_config(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
