"""What every benchmark record carries, and how it is written.

A timing means nothing without the machine, the versions and the exact command that produced it
(DESIGN principle 9), so each bench calls ``environment()`` once and ``write_record()`` at the end:
``bench/results/<name>-<YYYY-MM-DD>.json`` (everything, machine-readable) and ``.md`` (the table a
person reads). Nothing here imports torch at module level, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# The ~20M-parameter shape both benches use. With GPT-2's 50k vocabulary a model this small is mostly
# its output layer (50304 x 256 is 2/3 of the FLOPs of a 6-layer, 256-wide model); vocab 12288 keeps the
# head at ~30% of the matmul FLOPs, as in the 100M-1B models neo is for. 6 heads of 64 split over tp = 2.
DEFAULT_MODEL = [
    "model.n_layers=6",
    "model.hidden_size=384",
    "model.n_heads=6",
    "model.seq_length=256",
    "model.vocab_size=12288",
]


@dataclass(frozen=True)
class RandomTokens:
    """The tokenizer a benchmark on random token ids stands for: only its size and a name."""

    vocab_size: int

    @property
    def name(self) -> str:
        return f"random-{self.vocab_size}"


def build_trainer(cfg, env):
    """A real ``neo.train.loop.Trainer`` for a config, fed by the caller with random tokens.

    The benchmarks measure what training runs, so the model, optimizer, LR schedule and DeepSpeed engine
    come from Trainer itself (whatever it builds today). It gets no datasets and a stand-in tokenizer (a 12k
    vocabulary has none). ``cfg.model.vocab_size`` must be set. ``trainer.train_step(stream)`` is the step,
    with ``stream`` an iterator of micro-batches: ``micro_batches(tokens)`` makes one from token tensors.
    """
    from neo.train.loop import Trainer

    return Trainer(cfg, env, datasets={}, tokenizer=RandomTokens(cfg.model.vocab_size))


def micro_batches(batches):
    """Pretraining micro-batches from an iterator of [micro_batch, seq + 1] token tensors."""
    from neo.objectives import MicroBatch

    for tokens in batches:
        yield MicroBatch(inputs=tokens[:, :-1], labels=tokens[:, 1:])


def start_one_rank(device_kind: str):
    """Make this process rank 0 of a one-process job and start DeepSpeed's process group via neo (the
    benches that build a Trainer run as one rank, without a launcher)."""
    from neo import distributed
    from neo.distributed import free_port

    os.environ.update(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    os.environ.setdefault("DS_ACCELERATOR", device_kind)
    return distributed.init()


# The neo config keys every bench sets besides the model: no checkpoint is looked for or loaded.
BENCH_SETTINGS = ["checkpoint.resume=false", "batch.grad_accum=1"]


@contextmanager
def fused_adamw(enabled: bool = True):
    """While active, every ``torch.optim.AdamW`` built (neo's Trainer's included) defaults to ``fused=True``.

    An experiment switch, not a recommendation baked into the benches: it measures what neo would gain
    from the fused kernel, which updates each element in one pass instead of ~10 full passes.
    """
    if not enabled:
        yield
        return
    import torch

    original = torch.optim.AdamW.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("fused", True)
        original(self, *args, **kwargs)

    torch.optim.AdamW.__init__ = init
    try:
        yield
    finally:
        torch.optim.AdamW.__init__ = original


def command_line() -> str:
    """The command as typed, relative to the repository root, so it can be pasted to rerun."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return shlex.join(["python", script, *sys.argv[1:]])


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict:
    """The commit, and which tracked files under neo/ differ from it: a record from a dirty tree
    measured code that no commit holds, and the reader should know."""
    return {
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "neo_modified": [f for f in _git("diff", "--name-only", "HEAD", "--", "neo").splitlines() if f],
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load: on a shared machine, other jobs slow every variant (interleaving keeps
    the ratios fair, but absolute tokens/s drop); the record says how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX). Without it PyTorch
    emulates bf16 matmuls, measured ~250x slower than fp32 on an AVX2-only EPYC: a bf16 timing there
    measures the emulation, not neo."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def transparent_hugepages() -> str | None:
    """The kernel's THP mode ([madvise] or [always] lets THP_MEM_ALLOC_ENABLE take effect)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return None


def environment() -> dict:
    """Versions and hardware. Imports torch, deepspeed and transformers (the benches need them anyway)."""
    import deepspeed
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    hardware = {
        "cpu": cpu_model(),
        "cores": cores,
        "ram_gb": ram_gb(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
        "transparent_hugepages": transparent_hugepages(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hardware.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
        )
    return {
        "date": dt.date.today().isoformat(),
        "time": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": tf_version,
            "cuda": torch.version.cuda,
            "neo": git_state(),
        },
        "hardware": hardware,
    }


def environment_markdown(env: dict) -> str:
    v, h = env["versions"], env["hardware"]
    neo = v["neo"]
    dirty = f" (uncommitted changes in {', '.join(neo['neo_modified'])})" if neo["neo_modified"] else ""
    lines = [
        f"- date: {env['time']}",
        f"- command: `{env['command']}`",
        f"- neo commit: `{neo['commit']}`{dirty}",
        f"- versions: python {v['python']}, torch {v['torch']}, deepspeed {v['deepspeed']}, "
        f"transformers {v['transformers']}" + (f", CUDA {v['cuda']}" if v.get("cuda") else ""),
        f"- hardware: {h['cpu']}, {h['cores']} cores, {h['ram_gb']} GB RAM, torch threads {h['torch_threads']}"
        + (f"; GPU {h['gpu']} ({h['gpu_memory_gb']} GB) x {h['gpu_count']}" if h.get("gpu") else "; no GPU"),
        f"- CPU: capability {h.get('cpu_capability')}, native bf16 matmul {h.get('cpu_native_bf16')}; "
        f"kernel THP `{h.get('transparent_hugepages')}`, THP_MEM_ALLOC_ENABLE={h.get('THP_MEM_ALLOC_ENABLE')} "
        "(set by neo on import, see neo/__init__.py)",
        f"- load average (1/5/15 min) at start: {h['load_average_at_start']}"
        + (f", at end: {h['load_average_at_end']}" if h.get("load_average_at_end") else ""),
    ]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _jsonable(value):
    """Config values in a record (dataclasses such as RopeScaling) as plain JSON; anything else as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def write_record(
    name: str, record: dict, markdown: str, out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``<name>-<date>.json`` and ``.md``; a same-day rerun replaces that day's record."""
    record["hardware"]["load_average_at_end"] = load_average()
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}-{record['date']}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    md_path.write_text(markdown.replace("{environment}", environment_markdown(record)).rstrip() + "\n")
    return json_path, md_path
