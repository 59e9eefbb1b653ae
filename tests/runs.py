"""Running neo as users do, in subprocesses: token files, a clean environment, training runs and their records.

A run is judged by what it wrote (metrics.jsonl records, checkpoints), not only by its exit code:
gloo's worker threads can abort a process at interpreter exit after all work is done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "ds_configs" / "models" / "tiny.yml")
# bf16 runs compare with the fp32 curve over its first 5 steps: the fp32 run's schedule, stopped by
# schedule.exit_interval. On CPUs without AVX512-BF16/AMX PyTorch emulates bf16 matrix multiplies
# (~250x slower than fp32, mostly the 50k-vocabulary head), so every bf16 step costs seconds.
BF16_FIRST_STEPS = ("schedule.exit_interval=5",)
# Variables a launcher (or an enclosing SLURM job) sets; a test starts from none of them.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "OMP_NUM_THREADS")  # fmt: skip
LAUNCH_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "PMI_", "OMPI_")


def make_tokens(folder: Path, *extra: str, source: Path | None = None) -> str:
    """Tokenize a bundled sample (the Austen corpus by default) with neo's own CLI; returns the .bin/.idx prefix."""
    prefix = Path(folder) / "sample"
    source = source or ROOT / "data" / "sample" / "austen.jsonl.gz"
    if not Path(str(prefix) + ".idx").exists():
        cmd = [sys.executable, str(ROOT / "launch" / "preprocess.py"), str(source), "--output", str(prefix),
               "--workers", "2", *extra]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=clean_env())
    return str(prefix)


def _gpt2_byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the ByteLevel alphabet), mapped back to the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def small_tokenizer(folder: Path, ranks: int = 1002) -> str:
    """A byte-level BPE of ``ranks`` tokens trained on the sample corpus with the ``tokenizers`` library, saved
    as a tiktoken rank file; neo adds the end-of-document token, so its vocabulary is ranks + 1 (1,003 by
    default: not a multiple of anything a padding rule would round to)."""
    import base64
    import gzip

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = Path(folder) / f"bpe{ranks}.tiktoken"
    if not path.exists():
        with gzip.open(ROOT / "data" / "sample" / "austen.jsonl.gz", "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f][:2]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
        byte_of = _gpt2_byte_chars()
        lines = [f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}"
                 for token, rank in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]  # fmt: skip
        Path(folder).mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
    return str(path)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith(LAUNCH_PREFIXES)}
    env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    env.update(extra)
    return env


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl of a run (a line cut by SIGKILL is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def rel_curve(a: list[float], b: list[float]) -> float:
    """The largest relative difference between two curves of the same length (b the reference)."""
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def steps(recs: list[dict]) -> list[int]:
    return [r["step"] for r in recs if "loss" in r]


def losses(recs: list[dict]) -> list[float]:
    return [r["loss"] for r in recs if "loss" in r]


def end_codes(recs: list[dict]) -> list[int]:
    """Exit codes of the runs that wrote their end record, in order (0 finished, 75 saved for requeue)."""
    return [r["exit_code"] for r in recs if r.get("event") == "end"]


def checkpoints(run_dir: Path) -> list[dict]:
    """The neo.json of every complete checkpoint in the run."""
    folders = sorted((Path(run_dir) / "checkpoints").glob("iter_*/neo.json"))
    return [json.loads(p.read_text()) for p in folders]


class Run:
    """A finished training run: its exit code, output, and metrics records."""

    def __init__(self, proc: subprocess.CompletedProcess, run_dir: Path):
        self.returncode, self.output, self.dir = proc.returncode, proc.stdout + proc.stderr, run_dir
        self.records = records(run_dir)

    @property
    def losses(self) -> list[float]:
        return losses(self.records)

    @property
    def valid_losses(self) -> list[float]:
        return [r["valid_loss"] for r in self.records if "valid_loss" in r]

    @property
    def finished(self) -> bool:
        """The run wrote its end record with exit code 0."""
        return any(r.get("event") == "end" and r.get("exit_code") == 0 for r in self.records)


def aborted(returncode: int, output: str) -> bool:
    """The process (or, under torchrun, one of its workers) died of SIGABRT: torchrun then exits 1 and
    names the signal. Only an abort after the run's end record is forgiven (see ``run_training``)."""
    if returncode in (-signal.SIGABRT, 128 + signal.SIGABRT):
        return True
    return returncode == 1 and "Signal 6 (SIGABRT)" in output


def train_command(nproc: int = 1) -> list[str]:
    """``python launch/train.py`` (one process) or torchrun with ``nproc`` local processes."""
    script = str(ROOT / "launch" / "train.py")
    if nproc == 1:
        return [sys.executable, script]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
    ]


def run_training(run_dir: Path, *overrides: str, nproc: int = 1, configs: tuple[str, ...] = (TINY,),
                 timeout: int = 300, check: bool = True, env: dict[str, str] | None = None) -> Run:  # fmt: skip
    """Train with the real launcher and collect the results. With ``check``, the run must exit 0 (or die of
    SIGABRT after writing its end record: gloo's threads at interpreter exit, see docs) and finish. ``env``:
    variables to set on top of the clean environment (e.g. a PYTHONPATH for a reward function)."""
    cmd = [*train_command(nproc), *configs, "--set", f"logging.dir={run_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env(**(env or {})),
                          cwd=ROOT)  # fmt: skip
    run = Run(proc, run_dir)
    if check:
        aborted_at_exit = run.finished and aborted(proc.returncode, run.output)
        assert proc.returncode == 0 or aborted_at_exit, (
            f"training failed ({proc.returncode}):\n{run.output[-4000:]}"
        )
        assert run.finished, f"training did not finish:\n{run.output[-4000:]}"
    return run
