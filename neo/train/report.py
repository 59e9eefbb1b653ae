"""What a run tells people: one console line per logging interval, validation lines, the start and the end,
and one JSON record per step in metrics.jsonl (the same records to TensorBoard and W&B when asked).

Only the global rank 0 prints and writes; every other rank's RunLog stays silent.
"""

from __future__ import annotations

import os
import time

from neo.config import to_dict
from neo.train.metrics import MetricsWriter, Throughput, format_duration, memory_gb, wandb_init_args


class RunLog:
    """The run's reporter: ``step(record)`` after each optimizer step, ``validation(...)``, ``end(...)``."""

    def __init__(self, cfg, *, rank: int, meter: Throughput, start_iteration: int):
        self.cfg, self.rank, self.meter = cfg, rank, meter
        self.writer = None
        if rank == 0:
            wandb = wandb_init_args(cfg, to_dict(cfg))
            self.writer = MetricsWriter(cfg.logging.dir, cfg.logging.tensorboard, wandb)
        self.start_iteration, self.start = start_iteration, time.perf_counter()

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def write(self, record: dict) -> None:
        if self.writer:
            self.writer.write(record)

    def step(self, record: dict, metrics: dict[str, float]) -> None:
        """Record one optimizer step (``metrics``: the objective's, shown in the line too); every
        logging.interval steps (and the last) also print a line."""
        self.meter.step()
        record.update(metrics)
        it, last = record["step"], self.cfg.schedule.iterations
        if it % self.cfg.logging.interval == 0 or it == last:
            record.update(self.meter.report(), memory_gb=memory_gb())
            done = it - self.start_iteration
            eta = (time.perf_counter() - self.start) / done * (last - it)
            self.say(self._line(record, metrics, eta))
        self.write(record)

    def validation(self, step: int, metrics: dict[str, float], note: str = "") -> None:
        record = {"step": step, **{f"valid_{k}": v for k, v in metrics.items()}}
        if note:
            record["note"] = note
        extra = "".join(f" | {k} {v:.4g}" for k, v in metrics.items() if k not in ("loss", "ppl"))
        ppl = f" | perplexity {metrics['ppl']:.2f}" if "ppl" in metrics else ""
        self.say(
            f"step {step:>6} | validation loss {metrics['loss']:.4f}{ppl}"
            + extra
            + (f" ({note})" if note else "")
        )
        self.write(record)

    def end(self, step: int, code: int, checkpoint: str) -> None:
        self.write({"event": "end", "step": step, "exit_code": code, "checkpoint": checkpoint})
        if self.writer:
            self.writer.close(code)
        if code != 0:
            return
        cfg = self.cfg
        self.say(f"neo: done: {step} steps in {format_duration(time.perf_counter() - self.start)}. "
                 f"Checkpoint {checkpoint}; metrics {os.path.join(cfg.logging.dir, 'metrics.jsonl')}.")  # fmt: skip
        root = cfg.checkpoint_dir
        held_out = (
            " ".join(cfg.data.valid_paths)
            if cfg.data.valid_paths
            else " ".join(cfg.data.train_paths) + " --split valid"
        )
        self.say(f'neo: next: python launch/generate.py {root} --prompt "Once" --max-new-tokens 50   (sample text)\n'
                 f"neo: next: python launch/evaluate.py {root} {held_out}   (loss, perplexity, bits per byte)")  # fmt: skip

    def _line(self, r: dict, metrics: dict[str, float], eta: float) -> str:
        it = self.cfg.schedule.iterations
        parts = [f"step {r['step']:>{len(str(it))}}/{it}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad {r['grad_norm']:.3f}")
        if "loss_scale" in r:
            parts.append(f"scale {r['loss_scale']:.0f}")
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
        parts.append(
            f"{r['tflops_per_device']:.2f} TFLOP/s" + (f" ({r['mfu']:.1%} MFU)" if "mfu" in r else "")
        )
        parts += [f"mem {r['memory_gb']:.2f} GB", f"eta {format_duration(eta)}"]
        return " | ".join(parts)
