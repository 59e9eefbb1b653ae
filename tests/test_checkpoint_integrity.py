"""Damaged checkpoints are refused on every load path, with the file named; and what a checkpoint holds.

A checkpoint's manifest records every file's size and sha256 (written while the file is written). Bit
flips, truncation and a file swapped in from another checkpoint are each refused by ``neo verify``, by
training (resume and reshape), generation, evaluation and export; ``checkpoint.fallback`` resumes from an
older checkpoint that verifies, only when asked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from runs import run_training

from neo.checkpoint import load_full_weights
from neo.checkpoint.files import file_digest
from neo.errors import CheckpointError

STEPS = 4
ARGS = (f"schedule.iterations={STEPS}", "eval.interval=0", "logging.interval=2", "checkpoint.save_interval=2",
        "checkpoint.keep_last_n=3", "batch.micro_batch_size=2")  # fmt: skip
WEIGHTS, OPTIM = "weights/tp00-pp00.safetensors", "optim/tp00-pp00.safetensors"


@pytest.fixture(scope="module")
def run(sample_tokens, tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("ckpt")
    run_training(run_dir, f"data.train_paths=[{sample_tokens}]", *ARGS)
    return run_dir


def copy_of(run: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(run, dst)
    return dst


def flip_words(path: Path, n: int = 64) -> None:
    """Invert ``n`` 4-byte words spread over the tensor data (after the header): the size stays the same."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    step = max(4, (len(data) - start) // n // 4 * 4)
    for i in range(n):
        at = start + i * step
        data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    path.write_bytes(bytes(data))


def damage(kind: str, ckpt: Path, other: Path) -> str:
    """Damage one file of checkpoint ``ckpt`` as ``kind`` says; returns the file's name."""
    if kind == "weights bit flips":
        flip_words(ckpt / WEIGHTS)
        return WEIGHTS
    if kind == "optimizer bit flips":
        flip_words(ckpt / OPTIM)
        return OPTIM
    if kind == "truncated":
        data = (ckpt / WEIGHTS).read_bytes()
        (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
        return WEIGHTS
    assert kind == "swapped from another checkpoint"  # same model, same size, other values
    shutil.copyfile(other / WEIGHTS, ckpt / WEIGHTS)
    return WEIGHTS


KINDS = ["weights bit flips", "optimizer bit flips", "truncated", "swapped from another checkpoint"]


@pytest.mark.parametrize("kind", KINDS)
def test_neo_verify_refuses_each_kind_of_damage_naming_the_file(run, tmp_path, kind, capsys):
    from neo.cli import verify

    root = copy_of(run, tmp_path) / "checkpoints"
    assert verify.main([str(root), "--all"]) == 0
    name = damage(kind, root / "iter_00000004", root / "iter_00000002")
    assert verify.main([str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0] and "iter_00000004" in err[0], err
    assert ("bytes" in err[0]) if kind == "truncated" else ("sha256" in err[0])


def test_every_reader_refuses_a_damaged_checkpoint(run, tmp_path, capsys):
    """generate, evaluate and export (in-process front ends) and the library loader."""
    from neo.cli import evaluate, export, generate

    root = copy_of(run, tmp_path) / "checkpoints"
    damage("weights bit flips", root / "iter_00000004", root / "iter_00000002")
    calls = {
        "generate": lambda: generate.main([str(root), "--prompt", "It is", "--max-new-tokens", "2"]),
        "evaluate": lambda: evaluate.main([str(root), str(Path(__file__))]),
        "export": lambda: export.main([str(root), str(tmp_path / "hf")]),
    }
    for name, call in calls.items():
        assert call() == 2, name
        err = capsys.readouterr().err
        assert WEIGHTS in err and "sha256" in err and "Traceback" not in err, (name, err)
    with pytest.raises(CheckpointError, match="sha256"):
        load_full_weights(str(root))
    # the explicit fast path reads it, and says so
    assert generate.main([str(root), "--prompt", "It is", "--max-new-tokens", "2", "--no-verify"]) == 0
    assert "--no-verify: checkpoint file contents were not checked" in capsys.readouterr().err


def test_training_refuses_a_damaged_checkpoint_and_falls_back_only_when_asked(run, sample_tokens, tmp_path):
    """Resume (the same layout) and reshape (another one) refuse it; checkpoint.fallback=true resumes from
    the newest checkpoint that verifies, and says which."""
    run_dir = copy_of(run, tmp_path)
    root = run_dir / "checkpoints"
    damage("optimizer bit flips", root / "iter_00000004", root / "iter_00000002")
    more = (f"data.train_paths=[{sample_tokens}]", *ARGS, "schedule.iterations=6")
    resumed = run_training(run_dir, *more, check=False)
    assert (
        resumed.returncode == 2 and OPTIM in resumed.output and "checkpoint.fallback=true" in resumed.output
    )
    assert "Traceback" not in resumed.output
    reshaped = run_training(tmp_path / "other", *more, f"checkpoint.load={root}", "zero.stage=1",
                            "zero.single_rank_stage0=false", check=False)  # fmt: skip
    assert reshaped.returncode == 2 and OPTIM in reshaped.output
    fallback = run_training(run_dir, *more, "checkpoint.fallback=true")
    assert (
        "checkpoint.fallback is on: resuming from" in fallback.output and "iter_00000002" in fallback.output
    )
    assert [r["step"] for r in fallback.records if "loss" in r][-4:] == [3, 4, 5, 6]


def test_checkpoint_holds_weights_and_optimizer_state_once(run):
    """fp32: weights (4 bytes per parameter) + Adam's two moments (8); the rest (RNG, manifest) is < 1%."""
    ckpt = run / "checkpoints" / "iter_00000004"
    meta = json.loads((ckpt / "neo.json").read_text())
    n = sum(t.numel() for t in load_full_weights(str(ckpt))[0].values())
    total = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    assert sorted(meta["files"]) == [OPTIM, "rng/rank_00000.safetensors", WEIGHTS]
    assert 12 * n <= total <= 12 * n * 1.01, (total, 12 * n)
    assert not list(ckpt.rglob("*.pt")), "no pickle is written"
    for rel, record in meta["files"].items():
        assert (
            record["sha256"] == file_digest(str(ckpt / rel))
            and record["bytes"] == (ckpt / rel).stat().st_size
        )
    assert torch.equal(load_full_weights(str(ckpt))[0]["layers.0.word_embeddings.weight"],
                       load_full_weights(str(ckpt), checksums=False)[0]["layers.0.word_embeddings.weight"])  # fmt: skip
