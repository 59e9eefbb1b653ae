"""The training loop: one loop for every objective, in the plain and the pipeline form.

``Trainer(cfg, env)`` builds a run from its parts (``neo/train/build.py``): the model shape, the model, the
optimizer, the DeepSpeed engine, the objective (``neo/objectives``) and its datasets; any of the model,
datasets, tokenizer and objective can be handed in instead. ``run()`` steps until the schedule ends, a
signal asks it to stop, or ``schedule.exit_interval`` is reached, and returns the process exit code: 0
when the run finished, ``REQUEUE_EXIT`` (75) when a SIGTERM/SIGUSR1 made it save and stop early.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import torch
import torch.distributed as dist

from neo.checkpoint import load as ckpt_load
from neo.checkpoint import save as ckpt_save
from neo.checkpoint.layout import complete_tags, find_latest, resolve
from neo.checkpoint.manifest import read_meta
from neo.checkpoint.tensors import check_compatible
from neo.config import Config, batch_arithmetic, lean_config, to_dict, to_yaml
from neo.errors import REQUEUE_EXIT, CheckpointError, LaunchError
from neo.model.gpt import flops_per_token, parameter_count, set_loss
from neo.objectives import MicroBatch, Objective, build_objective
from neo.parallel import random as tp_random
from neo.parallel.topology import Topology
from neo.train import build
from neo.train.metrics import Throughput, peak_tflops
from neo.train.optim import ClippingAdamW
from neo.train.report import RunLog


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


class Trainer:
    """Owns the engine, the objective, the data streams and the bookkeeping of one run."""

    def __init__(self, cfg: Config, env, *, model: torch.nn.Module | None = None, datasets: dict | None = None,
                 tokenizer=None, objective: Objective | None = None):  # fmt: skip
        from neo import distributed

        cfg, lean_note = lean_config(cfg)  # e.g. ZeRO-1 on one data-parallel rank runs as ZeRO-0
        self.cfg, self.env = cfg, env
        self.topo = Topology(env.world_size, cfg.parallel.tp, cfg.parallel.pp, env.rank)
        self.device = distributed.device_for(env)
        warning = build.check_precision(cfg, self.device)
        for note in (warning, lean_note):
            if note:
                log(note)
        torch.manual_seed(cfg.seed)  # the same on every rank: replicated dropout agrees across a TP group
        tp_random.seed(cfg.seed + 2718 + self.topo.coord.tensor)  # split heads: independent per TP rank
        if tokenizer is None:
            from neo.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.tokenizer, self.objective = tokenizer, objective or build_objective(cfg)
        # the data first: a mismatch with the tokenizer or a missing file ends the run before the model is built
        self.datasets = datasets if datasets is not None else self.objective.build_datasets(
            cfg, tokenizer, self._num_samples())  # fmt: skip
        self.load = self._plan_load()
        saved = self.load.meta["model"] if self.load else None
        self.args = dataclasses.replace(
            build.model_args(cfg, tokenizer, saved), **self.objective.model_overrides
        )
        model = model if model is not None else build.build_model(self.args, cfg, self.topo)
        compiled = build.compile_blocks(model, cfg, self.device)  # model.compile
        if compiled:
            log(compiled)
        set_loss(model, self.objective.loss)
        if self.load:
            self._load_weights(model)
        if self.objective.needs_reference:
            self.objective.reference = self._reference(model)
        self._neo_optimizer = build.build_optimizer(model, cfg, self.topo, self.device)
        self.engine, self.optimizer, self.scheduler = build.build_engine(
            model, self._neo_optimizer, cfg, self.topo, self.device
        )
        self.pipeline = cfg.parallel.pp > 1
        self.iteration, self.consumed = 0, 0
        self.objective.attach(self)
        if self.load:
            self._finish_load()

    def _num_samples(self) -> dict[str, int]:
        """Samples each split must provide: every validation reads the same first eval.iters global batches,
        so validation curves are comparable."""
        g = self.cfg.batch.global_batch_size
        evals = self.cfg.eval.iters * g
        return {"train": self.cfg.schedule.iterations * g, "valid": evals, "test": evals}

    # ------------------------------------------------------------------ checkpoints
    def layout(self) -> dict:
        return {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp, "zero": self.cfg.zero.stage}

    def _plan_load(self) -> ckpt_load.LoadPlan | None:
        """What to start from: the newest checkpoint of this run, else ``checkpoint.load``, else nothing."""
        c = self.cfg.checkpoint
        path = find_latest(self.cfg.checkpoint_dir) if c.resume else None
        if path is not None:
            return self._plan_resume(path)
        if c.load:
            return ckpt_load.plan_load(resolve(c.load), self.layout(), c.load_weights_only, c.verify)
        if self.cfg.finetune.init_from:
            return ckpt_load.plan_load(self._init_from(), self.layout(), True, c.verify)
        return None

    def _init_from(self) -> str:
        """finetune.init_from as a neo checkpoint folder: a Hugging Face folder is converted once (rank 0, into
        <logging.dir>/init_from) while the other ranks wait."""
        source = self.cfg.finetune.init_from
        if not os.path.isfile(os.path.join(source, "config.json")):
            return resolve(source)
        target = os.path.join(self.cfg.logging.dir, "init_from")
        if self.env.rank == 0 and not os.path.isfile(os.path.join(target, "neo.json")):
            from neo.export.hf_import import import_hf

            import_hf(source, target, tokenizer=self.cfg.data.tokenizer)
            log(f"neo: converted the Hugging Face model {source} into {target}")
        if dist.is_initialized():
            dist.barrier()
        return target

    def _plan_resume(self, latest: str) -> ckpt_load.LoadPlan:
        """The newest checkpoint of this run; an older one only if it fails verification and
        ``checkpoint.fallback`` allows it (newest first)."""
        c = self.cfg.checkpoint
        try:
            return ckpt_load.plan_load(latest, self.layout(), False, c.verify)
        except CheckpointError as e:
            if not c.fallback:
                raise CheckpointError(f"{e} Or set checkpoint.fallback=true to resume from the newest "
                                      "checkpoint that verifies.") from None  # fmt: skip
            problem = e
        for tag in reversed(complete_tags(self.cfg.checkpoint_dir)):
            path = os.path.join(self.cfg.checkpoint_dir, tag)
            if os.path.samefile(path, latest):
                continue
            try:
                plan = ckpt_load.plan_load(path, self.layout(), False, c.verify)
            except CheckpointError as e:
                log(f"neo: warning: {e}")
                continue
            log(f"neo: warning: {problem} checkpoint.fallback is on: resuming from {path} instead.")
            return plan
        raise CheckpointError(f"{problem} No older checkpoint in {self.cfg.checkpoint_dir} verifies either.")

    def _load_weights(self, model: torch.nn.Module) -> None:
        """Weights go in before DeepSpeed builds its fp32 masters and partitions from the module. A LoRA
        checkpoint's base comes first, then its adapters; the base of a LoRA run is recorded for its saves."""
        from neo.checkpoint.lora import base_record, lora_base

        plan = self.load
        check_compatible(
            plan.meta, dataclasses.asdict(self.args), plan.path, heads_may_differ=plan.mode == "weights"
        )
        lora = plan.meta.get("lora") or {}
        if lora.get("base"):
            ckpt_load.copy_weights_into(
                model, lora_base(plan.meta, plan.path, self.cfg.checkpoint.verify), self.topo
            )
            ckpt_load.copy_weights_into(model, plan.path, self.topo, only_present=True)
            self.lora_base = lora["base"]
        else:
            ckpt_load.copy_weights_into(model, plan.path, self.topo)
            self.lora_base = base_record(plan.path)

    def _reference(self, model: torch.nn.Module):
        """DPO's and RL's frozen reference: the policy this run began from, recorded in its checkpoints
        (``reference``: the checkpoint it started from, or None for the seeded initialization), so that a
        resumed run compares with the same reference as an uninterrupted one, not with the resumed weights.
        With LoRA it is the policy with its adapters off (its base never changes)."""
        from neo.checkpoint.lora import base_record

        plan = self.load
        resumed = plan is not None and plan.mode != "weights" and "reference" in plan.meta
        if resumed:
            self.reference_start = plan.meta["reference"]
        else:
            self.reference_start = base_record(plan.path) if plan is not None else {"path": None}
        start = model
        if resumed and not self.cfg.lora.rank:  # rebuilt: the same seed gives the same initialization
            start = build.build_model(self.args, self.cfg, self.topo)
            if self.reference_start["path"]:
                ckpt_load.copy_weights_into(start, self.reference_start["path"], self.topo)
        return build.frozen_reference(start, self.cfg, self.device)

    def _finish_load(self) -> None:
        plan, meta = self.load, self.load.meta
        if plan.mode != "weights":
            self.iteration, self.consumed = int(meta["iteration"]), int(meta["consumed_samples"])
            ckpt_load.restore_training_state(self.engine, self.scheduler, plan, self.topo)
            self.objective.load_state_dict(meta.get("objective_state") or {})
            if plan.mode == "resume":
                self.objective.load_tensor_state(ckpt_load.objective_tensors(plan))
        log(f"neo: {plan.describe()}")

    def _lora_meta(self) -> dict:
        """A LoRA run saves its adapters alone when its base is a checkpoint (else, from scratch, everything)."""
        if not self.cfg.lora.rank:
            return {}
        base = getattr(self, "lora_base", None)
        return {"lora": {"spec": build.lora_spec(self.cfg).to_dict(), "base": base}}

    def save(self) -> str:
        from neo import ds_compat

        meta = {"consumed_samples": self.consumed, "config": to_dict(self.cfg), "model": dataclasses.asdict(self.args),
                "layout": self.layout(), "tokenizer": self.tokenizer.name, "tokenizer_spec": self.cfg.data.tokenizer,
                "objective": self.objective.name, "objective_state": self.objective.state_dict(),
                "lr_schedule": self.scheduler.state_dict(), "engine": ds_compat.engine_state(self.engine),
                **self.objective.checkpoint_meta(), **self._lora_meta()}  # fmt: skip
        if self.objective.needs_reference:
            meta["reference"] = self.reference_start
        adapters_only = bool(meta.get("lora", {}).get("base"))
        path = ckpt_save.save(self.engine, self.cfg.checkpoint_dir, self.iteration, meta,
                              self.cfg.checkpoint.keep_last_n, topo=self.topo, zero_stage=self.cfg.zero.stage,
                              trainable_only=adapters_only, extra=self.objective.tensor_state())  # fmt: skip
        size = sum(r["bytes"] for r in read_meta(path)["files"].values()) if self.env.rank == 0 else 0
        what = (
            " (LoRA adapters and their optimizer state; the base stays in its checkpoint)"
            if adapters_only
            else ""
        )
        log(f"neo: saved checkpoint {path}: {size / 2**20:,.1f} MiB{what}")
        return path

    # ------------------------------------------------------------------ decisions
    def should_validate(self) -> bool:
        """Every eval.interval steps, and always after the last step (when eval.iters > 0)."""
        e, last = self.cfg.eval, self.iteration == self.cfg.schedule.iterations
        return bool(e.interval) and (self.iteration % e.interval == 0 or last) or (last and e.iters > 0)

    def should_save(self) -> bool:
        """A periodic save every checkpoint.save_interval steps (the end of a launch always saves)."""
        n = self.cfg.checkpoint.save_interval
        return bool(n) and self.iteration % n == 0 and self.iteration < self.cfg.schedule.iterations

    def stop_reason(self, start_iteration: int, stop: StopFlag) -> tuple[str, int] | None:
        """(why, exit code) when this launch should save and end before the schedule does, else None.

        Every rank must call it after every step: the signal check is a collective."""
        if self.iteration >= self.cfg.schedule.iterations:
            return None
        n = self.cfg.schedule.exit_interval
        if n and self.iteration - start_iteration >= n:
            return (f"neo: schedule.exit_interval reached after {self.iteration - start_iteration} steps in this "
                    "launch; saving. Launch again to continue.", 0)  # fmt: skip
        if stop.agreed(self.device):
            return (f"neo: signal {stop.signum or 'on another rank'} received: saving and exiting with "
                    f"{REQUEUE_EXIT} so the job can be requeued", REQUEUE_EXIT)  # fmt: skip
        return None

    # ------------------------------------------------------------------ steps
    def stream(self, split: str, consumed: int):
        """This rank's micro-batches of ``split`` from sample ``consumed`` on."""
        b = self.cfg.batch
        return self.objective.batches(self.datasets[split], consumed=consumed, global_batch_size=b.global_batch_size,
                                      micro_batch_size=b.micro_batch_size, dp_rank=self.topo.coord.data,
                                      dp_size=self.topo.dp)  # fmt: skip

    def _step_batches(self, stream) -> list[MicroBatch]:
        micros = [next(stream) for _ in range(self.cfg.batch.grad_accum)]
        micros = self.objective.start_step(micros, self._dp_sum)
        return [m.to(self.device) for m in micros]

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.device).clone()
        if self.topo.dp > 1:
            dist.all_reduce(value, group=self.topo.dp_group)
        return value

    def train_step(self, stream) -> float:
        """One optimizer step over grad_accum micro-batches; returns the loss of the global batch."""
        micros = self._step_batches(stream)
        if self.pipeline:  # DeepSpeed runs the micro-batches through the stages and averages over DP
            return float(self.engine.train_batch(data_iter=iter([(m.inputs, m.labels) for m in micros])))
        total = torch.zeros((), device=self.device)
        for m in micros:
            loss = self.engine(m.inputs, labels=m.labels)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        return self._dp_mean(total / self.cfg.batch.grad_accum)

    def _dp_mean(self, value: torch.Tensor) -> float:
        return (self._dp_sum(value) / self.topo.dp).item()

    def reduced_sums(self) -> dict[str, float]:
        """The objective's metric sums since the last call, summed over data-parallel ranks and pipeline
        stages (only the last stage computes the loss; tensor-parallel ranks hold the same values)."""
        names, sums = self.objective.metric_sums, self.objective.pop_sums()
        if not names:
            return {}
        vector = torch.tensor(
            [float(sums.get(k, 0.0)) for k in names], dtype=torch.float64, device=self.device
        )
        vector = self._dp_sum(vector)
        if self.topo.pp > 1:
            dist.all_reduce(vector, group=self.topo.pp_group)
        return dict(zip(names, vector.tolist()))

    def objective_metrics(self) -> dict[str, float]:
        """This step's metrics as the objective summarizes them (accuracy, margins, reward...)."""
        return self.objective.summarize(self.reduced_sums())

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict[str, float] | None:
        """The objective's validation metrics over the first eval.iters global batches of ``split``."""
        if self.datasets.get(split) is None or self.cfg.eval.iters == 0:
            return None
        stream, total, n = self.stream(split, 0), torch.zeros((), device=self.device), 0
        self.objective.pop_sums()
        if not self.pipeline:
            self.engine.eval()
        for _ in range(self.cfg.eval.iters):
            micros = self._step_batches(stream)
            if self.pipeline:  # the mean over the step's micro-batches
                loss = self.engine.eval_batch(data_iter=iter([(m.inputs, m.labels) for m in micros]))
                total, n = total + loss.float().to(self.device).reshape(()), n + 1
                continue
            for m in micros:
                total, n = total + self.engine(m.inputs, labels=m.labels).float(), n + 1
        if not self.pipeline:
            self.engine.train()
        return self.objective.summarize_validation(self._dp_mean(total / n), self.reduced_sums())

    def _grad_norm(self) -> float | None:
        if isinstance(self._neo_optimizer, ClippingAdamW):
            return self._neo_optimizer.grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def step_record(self, loss: float) -> dict:
        from neo import ds_compat

        record = {"step": self.iteration, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": self._grad_norm(), "samples": self.consumed}  # fmt: skip
        if self.cfg.precision.dtype == "fp16":
            record["loss_scale"] = ds_compat.loss_scale(self.engine)
        return record

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        cfg, stop = self.cfg, StopFlag()
        meter = Throughput(cfg.batch.global_batch_size * cfg.model.seq_length, flops_per_token(self.args),
                           self.env.world_size, peak_tflops(cfg.precision.dtype, cfg.logging.peak_tflops))  # fmt: skip
        report = RunLog(cfg, rank=self.env.rank, meter=meter, start_iteration=self.iteration)
        self._announce(report)
        if self.iteration >= cfg.schedule.iterations:
            report.say(f"neo: nothing to do: the checkpoint is at iteration {self.iteration} of "
                       f"{cfg.schedule.iterations}. Raise schedule.iterations to train further.")  # fmt: skip
            return 0
        if self.load and self.load.mode == "reshape":
            self._validate(report, note="after loading into the new layout")
        stream, start, code = self.stream("train", self.consumed), self.iteration, 0
        while self.iteration < cfg.schedule.iterations:
            loss = self.train_step(stream)
            self.iteration += 1
            self.consumed += cfg.batch.global_batch_size
            report.step(self.step_record(loss), self.objective_metrics())
            if self.should_validate():
                self._validate(report)
            if self.should_save():
                self.save()
            reason = self.stop_reason(start, stop)
            if reason is not None:
                report.say(reason[0])
                code = reason[1]
                break
        report.end(self.iteration, code, self.save())
        return code

    def _announce(self, report: RunLog) -> None:
        counts = parameter_count(self.args)
        report.say(f"neo: model {counts['total'] / 1e6:.2f}M parameters ({counts['blocks'] / 1e6:.2f}M in blocks, "
                   f"vocab {self.args.vocab_size}); {flops_per_token(self.args) / 1e6:.1f} MFLOP/token; "
                   f"objective {self.objective.name}; {self.topo.describe()}")  # fmt: skip
        report.say(f"neo: {batch_arithmetic(self.cfg)}")
        if self.cfg.parallel.sequence_parallel:
            par = self.cfg.parallel
            report.say(f"neo: sequence parallelism: norms, dropout and the residual stream hold "
                       f"{self.args.seq_length // par.tp} of {self.args.seq_length} positions per tensor-parallel rank")  # fmt: skip
        if self.cfg.lora.rank:
            from neo import ds_compat

            params = list(self.engine.module.parameters())
            trainable = sum(ds_compat.param_numel(p) for p in params if p.requires_grad)
            total = sum(ds_compat.param_numel(p) for p in params)
            report.say(f"neo: LoRA rank {self.cfg.lora.rank} on {', '.join(self.cfg.lora.targets)}: {trainable:,} "
                       f"trainable parameters of {total:,} on this rank ({trainable / total:.2%}); the rest frozen")  # fmt: skip
        if self.pipeline:
            report.say(f"neo: pipeline partitioning ({self.cfg.parallel.partition_method}):\n"
                       f"{describe_partitioning(self.engine.module, self.topo)}")  # fmt: skip

    def _validate(self, report: RunLog, note: str = "") -> None:
        metrics = self.objective.validate(self)
        if metrics is None:
            metrics = self.evaluate("valid")
        if metrics is not None:
            report.validation(self.iteration, metrics, note)


def describe_partitioning(module, topo: Topology) -> str:
    """Which layers each pipeline stage holds and its parameter count (on tensor rank 0)."""
    from neo import ds_compat

    names, parts = ds_compat.pipeline_layer_names(module), ds_compat.pipeline_parts(module)
    local = sum(p.numel() for p in module.parameters())
    counts: list = [None] * topo.world_size
    dist.all_gather_object(counts, local)
    lines = []
    for stage in range(topo.pp):
        lo, hi = parts[stage], parts[stage + 1]
        kinds = ", ".join(f"{i}:{names[i]}" for i in range(lo, hi))
        n = counts[topo.rank_of(stage, 0, 0)]
        lines.append(f"  stage {stage}: layers [{lo}, {hi}) {kinds}; {n:,} parameters per TP rank")
    return "\n".join(lines)


def train(cfg: Config) -> int:
    """Run training for a validated config in this process (one rank of the job)."""
    from neo import distributed

    env = distributed.init(cfg.launch.rendezvous_timeout, cfg.launch.collective_timeout)
    if env.world_size != cfg.world_size:
        raise LaunchError(f"the config was resolved for world size {cfg.world_size} but the job has "
                          f"{env.world_size} processes")  # fmt: skip
    trainer = Trainer(cfg, env)
    if env.rank == 0:
        os.makedirs(cfg.logging.dir, exist_ok=True)
        with open(os.path.join(cfg.logging.dir, "config.yml"), "w") as f:
            f.write(to_yaml(cfg))
    return trainer.run()
