"""The training loop: build everything from one validated config, train, validate, checkpoint.

``train(cfg)`` returns the process exit code: 0 when the run finished, ``REQUEUE_EXIT`` when a
SIGTERM/SIGUSR1 (SLURM's warning before preemption or time limit) made it save and stop early.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import torch
import torch.distributed as dist

from neo import config as neo_config
from neo.checkpoint import load as ckpt_load
from neo.checkpoint import optimizer_state
from neo.checkpoint import save as ckpt_save
from neo.checkpoint.layout import find_latest, resolve
from neo.checkpoint.tensors import check_compatible
from neo.config import Config
from neo.errors import CheckpointError
from neo.model.gpt import GPT, flops_per_token, parameter_count, pipeline_module
from neo.parallel import random as tp_random
from neo.parallel.topology import Topology
from neo.train.metrics import MetricsWriter, Throughput, format_duration, memory_gb, peak_tflops
from neo.train.optim import (
    ClippingAdamW,
    fp32_zero_grad_norms,
    fused_adamw_supported,
    neo_clips,
    param_groups,
)
from neo.train.schedule import LRSchedule, schedule_from_config

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "saved, stopped early, run me again"; slurm/train.sbatch requeues on it


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


class StopFlag:
    """Set by SIGTERM/SIGUSR1; checked once per step and agreed on by every rank."""

    def __init__(self):
        from neo import distributed

        self.signum = distributed.pending_signal()  # a SIGUSR1 that came while the ranks were starting
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.signum = signum

    def agreed(self, device) -> bool:
        flag = torch.tensor([float(self.signum)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _mean_over_dp(value: torch.Tensor, topo: Topology) -> float:
    if topo.dp > 1:
        value = value.clone()
        dist.all_reduce(value, group=topo.dp_group)
        value /= topo.dp
    return value.item()


def _resolve_vocab(cfg: Config, tokenizer) -> int:
    from neo.data.tokenizer import padded_vocab_size

    wanted = padded_vocab_size(tokenizer.vocab_size, cfg.parallel.tp)
    if cfg.model.vocab_size is None:
        return wanted
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise neo_config.ConfigError(
            [
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                f"tokens ({tokenizer.name}). Fix: remove model.vocab_size to use the padded size {wanted}."
            ]
        )
    return cfg.model.vocab_size


class Trainer:
    """Owns the engine, the data iterators and the bookkeeping of one run (plain or pipeline form)."""

    def __init__(self, cfg: Config, env):
        import deepspeed

        from neo.data.dataset import build_datasets
        from neo.data.tokenizer import load_tokenizer

        self.cfg, self.env = cfg, env
        self.topo = Topology(env.world_size, cfg.parallel.tp, cfg.parallel.pp, env.rank)
        self.device = (
            torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
        if cfg.precision.dtype == "fp16" and self.device.type == "cpu":
            raise neo_config.ConfigError(
                [
                    "precision.dtype = fp16 needs a GPU: DeepSpeed's CPU accelerator refuses fp16 ('Type fp16 is not "
                    "supported on your device'). Fix: use precision.dtype: fp32 on CPU (or bf16 where the CPU has "
                    "native bf16: AVX512-BF16 or AMX)."
                ]
            )
        if (
            cfg.precision.dtype == "bf16"
            and self.device.type == "cpu"
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        ):
            log(
                f"neo: warning: precision.dtype = bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()},"
                " no AVX512-BF16/AMX): PyTorch emulates bf16 matrix multiplies, measured ~250x slower than fp32 on "
                "such a CPU. Use precision.dtype: fp32 here."
            )
        torch.manual_seed(cfg.seed)  # the same on every rank: replicated dropout agrees across a TP group
        tp_random.seed(cfg.seed + 2718 + self.topo.coord.tensor)  # split heads: independent per TP rank
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.load = self._plan_load()
        vocab = _resolve_vocab(cfg, self.tokenizer)
        if self.load and cfg.model.vocab_size is None:  # keep the saved padding (it grows with tp)
            vocab = int(self.load.meta["model"]["vocab_size"])
            if vocab % cfg.parallel.tp:
                raise CheckpointError(
                    f"checkpoint {self.load.path} has vocab_size {vocab}, not divisible by "
                    f"parallel.tp = {cfg.parallel.tp}. Fix: choose a tp that divides it."
                )
        self.args = dataclasses.replace(cfg.model, vocab_size=vocab)
        self.pipeline = cfg.parallel.pp > 1
        if self.pipeline:
            model = pipeline_module(
                self.args,
                self.topo,
                seed=cfg.seed,
                partition_method=cfg.parallel.partition_method,
                checkpoint_interval=cfg.parallel.activation_checkpoint_interval,
            )
            tied = {id(p) for p in model.tied_modules.parameters()} if self.topo.coord.pipe > 0 else set()
        else:
            model = GPT(
                self.args,
                tp_group=self.topo.tensor_group,
                seed=cfg.seed,
                checkpoint_interval=cfg.parallel.activation_checkpoint_interval,
            )
            tied = set()
        if self.load:
            check_compatible(self.load.meta, dataclasses.asdict(self.args), self.load.path)
            if self.load.mode != "resume":  # before DeepSpeed copies the weights into its fp32 masters
                ckpt_load.copy_weights_into(model, self.load.path, self.topo)
        groups = param_groups(model, cfg.optimizer.weight_decay)
        adam = dict(
            lr=cfg.optimizer.lr,
            betas=tuple(cfg.optimizer.betas),
            eps=cfg.optimizer.eps,
            fused=cfg.optimizer.fused and fused_adamw_supported(self.device),
        )
        if neo_clips(cfg.zero.stage, cfg.precision.dtype):
            optimizer = ClippingAdamW(
                groups, topo=self.topo, max_norm=cfg.optimizer.grad_clip, skip=tied, **adam
            )
        else:
            optimizer = torch.optim.AdamW(groups, **adam)
        lr_fn = schedule_from_config(cfg.schedule, cfg.optimizer)
        if self.device.type == "cpu" and cfg.zero.stage > 0:
            fp32_zero_grad_norms()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: LRSchedule(opt, lr_fn),
            config=neo_config.deepspeed_config(cfg),
            mpu=self.topo if (self.topo.tp > 1 and not self.pipeline) else None,
            dist_init_required=False,
        )
        self._neo_optimizer = optimizer
        self.partitioning = self._describe_partitioning(model) if self.pipeline else None
        self.iteration, self.consumed = 0, 0
        if self.load:
            self._finish_load()

        g, it = cfg.batch.global_batch_size, cfg.schedule.iterations
        self.datasets = build_datasets(
            train_paths=cfg.data.train_paths,
            train_weights=cfg.data.train_weights,
            valid_paths=cfg.data.valid_paths,
            test_paths=cfg.data.test_paths,
            split=cfg.data.split,
            seq_length=cfg.model.seq_length,
            seed=cfg.seed,
            # every validation reads the same first eval.iters global batches, so curves are comparable
            num_samples={"train": it * g, "valid": cfg.eval.iters * g, "test": cfg.eval.iters * g},
            cache_dir=cfg.data.cache_dir,
        )

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        return {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp, "zero": self.cfg.zero.stage}

    def _plan_load(self) -> ckpt_load.LoadPlan | None:
        """What to start from: the newest checkpoint of this run, else ``checkpoint.load``, else nothing."""
        c = self.cfg.checkpoint
        path = find_latest(self.cfg.checkpoint_dir) if c.resume else None
        weights_only = False
        if path is None and c.load:
            path, weights_only = resolve(c.load), c.load_weights_only
        if path is None:
            return None
        return ckpt_load.plan_load(path, self._layout(), weights_only)

    def _finish_load(self) -> None:
        plan, meta = self.load, self.load.meta
        if plan.mode == "resume":
            ckpt_load.load(self.engine, plan.path)
        if plan.mode != "weights":
            self.iteration, self.consumed = int(meta["iteration"]), int(meta["consumed_samples"])
            if (
                plan.mode == "reshape"
            ):  # DeepSpeed's scheduler and optimizer state were not loaded: neo's files
                self.scheduler.load_state_dict({"last_step": self.iteration})
                plan.optimizer_fresh = optimizer_state.restore(self.engine, plan.path, meta, self.topo)
        log(f"neo: {plan.describe()}")

    def save(self) -> str:
        meta = {
            "consumed_samples": self.consumed,
            "config": neo_config.to_dict(self.cfg),
            "model": dataclasses.asdict(self.args),
            "layout": self._layout(),
            "tokenizer": self.tokenizer.name,
            "tokenizer_spec": self.cfg.data.tokenizer,
        }
        path = ckpt_save.save(
            self.engine,
            self.cfg.checkpoint_dir,
            self.iteration,
            meta,
            self.cfg.checkpoint.keep_last_n,
            topo=self.topo,
            zero_stage=self.cfg.zero.stage,
        )
        log(f"neo: saved checkpoint {path}")
        return path

    # ------------------------------------------------------------------ steps
    def _batches(self, split: str, consumed: int):
        from neo.data.dataset import micro_batches

        return micro_batches(
            self.datasets[split],
            consumed_samples=consumed,
            global_batch_size=self.cfg.batch.global_batch_size,
            micro_batch_size=self.cfg.batch.micro_batch_size,
            dp_rank=self.topo.coord.data,
            dp_size=self.topo.dp,
        )

    def _describe_partitioning(self, module) -> str:
        """Which layers each pipeline stage holds and its parameter count (on tensor rank 0)."""
        names = [spec.typename.__name__ for spec in module._layer_specs]
        local = sum(p.numel() for p in module.parameters())
        counts: list = [None] * self.topo.world_size
        dist.all_gather_object(counts, local)
        lines = []
        for stage in range(self.topo.pp):
            lo, hi = module.parts[stage], module.parts[stage + 1]
            kinds = ", ".join(f"{i}:{names[i]}" for i in range(lo, hi))
            n = counts[self.topo.rank_of(stage, 0, 0)]
            lines.append(f"  stage {stage}: layers [{lo}, {hi}) {kinds}; {n:,} parameters per TP rank")
        return "\n".join(lines)

    def _grad_norm(self) -> float | None:
        if isinstance(self._neo_optimizer, ClippingAdamW):
            return self._neo_optimizer.grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train_step(self, batches) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss over the global batch."""
        if self.pipeline:  # DeepSpeed runs the micro-batches through the stages and averages over DP
            return float(self.engine.train_batch(data_iter=_inputs_and_labels(batches, self.device)))
        total = torch.zeros((), device=self.device)
        for _ in range(self.cfg.batch.grad_accum):
            batch = next(batches).to(self.device, non_blocking=True)
            loss = self.engine(batch[:, :-1], batch[:, 1:])
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return _mean_over_dp(total / self.cfg.batch.grad_accum, self.topo)

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float | None:
        if self.datasets.get(split) is None or self.cfg.eval.iters == 0:
            return None
        batches = self._batches(split, 0)
        total = torch.zeros((), device=self.device)
        if self.pipeline:
            data = _inputs_and_labels(batches, self.device)
            for _ in range(self.cfg.eval.iters):
                total += self.engine.eval_batch(data_iter=data).float().to(self.device).reshape(())
            return _mean_over_dp(total / self.cfg.eval.iters, self.topo)
        self.engine.eval()
        n = self.cfg.eval.iters * self.cfg.batch.grad_accum
        for _ in range(n):
            batch = next(batches).to(self.device)
            total += self.engine(batch[:, :-1], batch[:, 1:]).float()
        self.engine.train()
        return _mean_over_dp(total / n, self.topo)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg, stop = self.cfg, StopFlag()
        counts = parameter_count(self.args)
        g, seq = cfg.batch.global_batch_size, cfg.model.seq_length
        meter = Throughput(
            g * seq,
            flops_per_token(self.args),
            self.env.world_size,
            peak_tflops(cfg.precision.dtype, cfg.logging.peak_tflops),
        )
        writer = MetricsWriter(cfg.logging.dir, cfg.logging.tensorboard) if self.env.rank == 0 else None
        log(
            f"neo: model {counts['total'] / 1e6:.2f}M parameters ({counts['blocks'] / 1e6:.2f}M in blocks, "
            f"vocab {self.args.vocab_size}); {flops_per_token(self.args) / 1e6:.1f} MFLOP/token; "
            f"{self.topo.describe()}"
        )
        log(f"neo: {neo_config.batch_arithmetic(cfg)}")
        if self.partitioning:
            log(f"neo: pipeline partitioning ({cfg.parallel.partition_method}):\n{self.partitioning}")
        if self.iteration >= cfg.schedule.iterations:
            log(
                f"neo: nothing to do: the checkpoint is at iteration {self.iteration} of {cfg.schedule.iterations}. "
                "Raise schedule.iterations to train further."
            )
            return 0
        if self.load and self.load.mode == "reshape":
            self._validate(writer, note="after loading into the new layout")
        batches = self._batches("train", self.consumed)
        start_iteration, run_start = self.iteration, time.perf_counter()
        code = 0
        while self.iteration < cfg.schedule.iterations:
            loss = self.train_step(batches)
            self.iteration += 1
            self.consumed += g
            meter.step()
            record = {
                "step": self.iteration,
                "loss": loss,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": self._grad_norm(),
                "samples": self.consumed,
            }
            if cfg.precision.dtype == "fp16":
                record["loss_scale"] = float(self.engine.optimizer.cur_scale)
            if self.iteration % cfg.logging.interval == 0 or self.iteration == cfg.schedule.iterations:
                record.update(meter.report(), memory_gb=memory_gb())
                done = self.iteration - start_iteration
                eta = (time.perf_counter() - run_start) / done * (cfg.schedule.iterations - self.iteration)
                log(self._line(record, eta))
            if writer:
                writer.write(record)
            last = self.iteration == cfg.schedule.iterations
            if (
                cfg.eval.interval
                and (self.iteration % cfg.eval.interval == 0 or last)
                or (last and cfg.eval.iters)
            ):
                self._validate(writer)
            if (
                cfg.checkpoint.save_interval
                and self.iteration % cfg.checkpoint.save_interval == 0
                and not last
            ):
                self.save()
            if (
                not last
                and cfg.schedule.exit_interval
                and self.iteration - start_iteration >= cfg.schedule.exit_interval
            ):
                log(
                    f"neo: schedule.exit_interval reached after {self.iteration - start_iteration} steps in this launch; "
                    "saving. Launch again to continue."
                )
                break
            if not last and stop.agreed(self.device):
                log(
                    f"neo: signal {stop.signum or 'on another rank'} received: saving and exiting with "
                    f"{REQUEUE_EXIT} so the job can be requeued"
                )
                code = REQUEUE_EXIT
                break
        path = self.save()
        if writer:
            writer.write({"event": "end", "step": self.iteration, "exit_code": code, "checkpoint": path})
            writer.close()
        if code == 0:
            log(
                f"neo: done: {self.iteration} steps in {format_duration(time.perf_counter() - run_start)}. "
                f"Checkpoint {path}; metrics {os.path.join(cfg.logging.dir, 'metrics.jsonl')}."
            )
            root = cfg.checkpoint_dir
            held_out = (
                " ".join(cfg.data.valid_paths)
                if cfg.data.valid_paths
                else " ".join(cfg.data.train_paths) + " --split valid"
            )
            log(
                f'neo: next: python launch/generate.py {root} --prompt "Once" --max-new-tokens 50   (sample text)\n'
                f"neo: next: python launch/evaluate.py {root} {held_out}   (loss, perplexity, bits per byte)"
            )
        return code

    def _validate(self, writer, note: str = "") -> None:
        valid = self.evaluate("valid")
        if valid is None:
            return
        record = {"step": self.iteration, "valid_loss": valid, "valid_ppl": math.exp(min(valid, 50.0))}
        if note:
            record["note"] = note
        log(
            f"step {self.iteration:>6} | validation loss {valid:.4f} | perplexity {record['valid_ppl']:.2f}"
            + (f" ({note})" if note else "")
        )
        if writer:
            writer.write(record)

    def _line(self, r: dict, eta: float) -> str:
        it = self.cfg.schedule.iterations
        parts = [f"step {r['step']:>{len(str(it))}}/{it}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad {r['grad_norm']:.3f}")
        if "loss_scale" in r:
            parts.append(f"scale {r['loss_scale']:.0f}")
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        parts.append(
            f"{r['tflops_per_device']:.2f} TFLOP/s" + (f" ({r['mfu']:.1%} MFU)" if "mfu" in r else "")
        )
        parts += [f"mem {r['memory_gb']:.2f} GB", f"eta {format_duration(eta)}"]
        return " | ".join(parts)


def _inputs_and_labels(batches, device):
    """Micro-batches as the pipeline engine wants them: (tokens, next tokens)."""
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        yield batch[:, :-1], batch[:, 1:]


def train(cfg: Config) -> int:
    """Run training for a validated config in this process (one rank of the job)."""
    from neo import distributed

    env = distributed.init(cfg.launch.rendezvous_timeout, cfg.launch.collective_timeout)
    if env.world_size != cfg.world_size:
        raise distributed.LaunchError(
            f"the config was resolved for world size {cfg.world_size} but the job has "
            f"{env.world_size} processes"
        )
    trainer = Trainer(cfg, env)
    if env.rank == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        with open(os.path.join(cfg.logging.dir, "config.yml"), "w") as f:
            f.write(neo_config.to_yaml(cfg))
    return trainer.run()
