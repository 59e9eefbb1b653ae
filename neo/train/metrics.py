"""What a run reports: tokens/s, TFLOP/s and MFU, memory, and the metrics files.

MFU = achieved model FLOP/s per device / the device's peak. Peaks are dense (no sparsity) tensor
throughput by device name for the run's dtype; ``logging.peak_tflops`` overrides the table, and
MFU is left out where the peak is unknown (CPUs, unlisted GPUs).
"""

from __future__ import annotations

import json
import os
import re
import resource
import time

import torch

from neo.errors import REQUEUE_EXIT, NeoError

# TFLOP/s, dense, by a whole-word part of torch.cuda.get_device_name(); fp32 is the non-tensor-core rate.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
}


def peak_tflops(dtype: str, override: float | None = None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    return peak_for_device(torch.cuda.get_device_name(), dtype)


def peak_for_device(name: str, dtype: str) -> float | None:
    """The table's peak for a device name, matching whole words only: "NVIDIA L40S" is an L40S, not an L4
    or an L40; "NVIDIA GH200" is not an H200. The first listed match wins ("H100 PCIe" before "H100")."""
    for key, peaks in PEAK_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name):
            return peaks.get(dtype)
    return None


def memory_gb() -> float:
    """Peak GPU memory allocated by this rank, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Throughput:
    """Tokens/s and model TFLOP/s per device over the steps since the last report."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, devices: int, peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.devices, self.peak = devices, peak
        self.start = time.perf_counter()
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, float]:
        """Rates since the last report; then starts a new interval."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.devices / 1e12
        out = {
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": tflops,
            "step_time_s": elapsed / max(1, self.steps),
        }
        if self.peak:
            out["mfu"] = tflops / self.peak
        self.start, self.steps = now, 0
        return out


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl``, and sends the same records to TensorBoard
    and Weights & Biases when asked (``wandb``: the arguments of ``wandb.init``, see ``wandb_init_args``)."""

    def __init__(self, run_dir: str, tensorboard: bool = False, wandb: dict | None = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = open(self.path, "a", buffering=1)
        self.wandb = start_wandb(wandb) if wandb else None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "neo: logging.tensorboard is on but the tensorboard package is missing; "
                    "pip install tensorboard (continuing without it)",
                    flush=True,
                )
            else:
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if "step" not in record:
            return
        scalars = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            if record.get("event") == "end":  # the run's outcome, not a curve
                self.wandb.summary.update(
                    {"exit_code": record["exit_code"], "checkpoint": record["checkpoint"]}
                )
            else:
                self.wandb.log(scalars, step=record["step"])

    def close(self, exit_code: int = 0) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            if exit_code == REQUEUE_EXIT and hasattr(self.wandb, "mark_preempting"):
                self.wandb.mark_preempting()  # saved and stopped early: the next launch continues this W&B run
            self.wandb.finish(exit_code=exit_code)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wandb_init_args(cfg, config: dict) -> dict | None:
    """``wandb.init`` arguments for ``logging.wandb`` (None: W&B off). The W&B run's files go under the run
    directory (offline: ``<logging.dir>/wandb/offline-run-*``, for ``wandb sync``), and its id is kept in
    ``<logging.dir>/wandb/neo-run-id``, so a resumed launch continues the same W&B run."""
    w = cfg.logging.wandb
    if w.project is None or w.mode == "disabled":
        return None
    run_dir = cfg.logging.dir
    id_file = os.path.join(run_dir, "wandb", "neo-run-id")
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = f"neo-{os.urandom(6).hex()}"
        os.makedirs(os.path.dirname(id_file), exist_ok=True)
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
    name = w.name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    return {"project": w.project, "name": name, "mode": w.mode, "dir": run_dir, "config": config,
            "id": run_id, "resume": "allow"}  # fmt: skip


def start_wandb(init_args: dict):
    """A W&B run. Console capture stays off: neo prints its own log lines, and W&B's stdout wrapper would
    sit between neo and the terminal (or SLURM's log) of every run."""
    try:
        import wandb
    except ImportError:
        raise NeoError(
            "logging.wandb.project is set but the wandb package is not installed. Fix: pip install wandb "
            "(or pip install 'neo[wandb]'), or remove logging.wandb."
        ) from None
    try:
        return wandb.init(**init_args, settings=wandb.Settings(console="off", silent=True))
    except Exception as e:  # noqa: BLE001 - wandb's errors (no login, no network) have no common base
        raise NeoError(
            f"Weights & Biases could not start the run ({type(e).__name__}: {e}). Fix: `wandb login` (or set "
            "WANDB_API_KEY), or set logging.wandb.mode=offline (no network; `wandb sync` later)."
        ) from None
