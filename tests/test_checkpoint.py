"""Checkpoints that never lose work: kill anywhere and resume exactly, refuse damaged checkpoints, reshape."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import ROOT, TINY, clean_env, records, run_training

from neo.checkpoint import load_full_weights, read_meta, verify

STEPS = 12
COMMON = (
    f"schedule.iterations={STEPS}",
    "schedule.warmup=2",
    "optimizer.lr=3e-3",
    "eval.interval=0",
    "logging.interval=4",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last_n=2",
    "batch.micro_batch_size=2",
    "batch.grad_accum=2",
)


def last_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a killed run's unsaved steps are recomputed later)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut by SIGKILL
            continue
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_full_weights(str(run_dir / "checkpoints"))[0]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def start(run_dir: Path, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    script = str(ROOT / "launch" / "train.py")
    cmd = (
        [sys.executable, script]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            script,
        ]
    )
    cmd += [TINY, "--set", f"logging.dir={run_dir}"] + [a for o in overrides for a in ("--set", o)]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """SIGKILL the whole process group once ``condition()`` holds; False if the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.002)
    proc.wait(timeout=30)
    return False


def steps_done(run_dir: Path) -> int:
    try:
        return max(last_losses(run_dir), default=0)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(sample_tokens, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_training(run_dir, f"data.train_paths=[{sample_tokens}]", *COMMON)
    return run_dir, last_losses(run_dir), final_weights(run_dir)


def all_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every record ever written, in order: a resumed run writes the steps after its
    checkpoint again, and each of those must be what the uninterrupted run computed."""
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def saving(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(n.startswith(".tmp-") for n in os.listdir(ckpts))


def test_sigkill_at_random_points_and_during_saves_then_every_resume_is_bit_exact(
    uninterrupted, sample_tokens, tmp_path
):
    """Five SIGKILLs at seeded random points, two of them while a save is in flight; after each, the run is
    started again with the same command. Every loss any launch wrote equals the uninterrupted run's, bitwise,
    and so do the final weights. A killed save never leaves anything that looks complete."""
    _, ref_losses, ref_weights = uninterrupted
    rng = random.Random(20261202)
    plan = sorted(rng.sample(range(2, STEPS), 5))  # the step each launch reaches before its kill
    during_save = set(rng.sample(range(5), 2))
    args = (f"data.train_paths=[{sample_tokens}]", *COMMON)
    for i, target in enumerate(plan):
        proc = start(tmp_path, *args)
        in_save = i in during_save
        killed = kill_when(
            proc, lambda t=target, s=in_save: steps_done(tmp_path) >= t and (not s or saving(tmp_path))
        )
        assert killed, f"launch {i} finished before its kill at step {target} (during a save: {in_save})"
        assert all(ref_losses[step] == loss for step, loss in all_losses(tmp_path)), f"after kill {i}"
        for published in (tmp_path / "checkpoints").glob("iter_*"):  # a .tmp- folder is never loaded
            verify(str(published), read_meta(str(published)))
    run = run_training(tmp_path, *args)
    assert "resumed from" in run.output and "files verified by checksums" in run.output
    assert all(ref_losses[step] == loss for step, loss in all_losses(tmp_path))
    assert sorted({s for s, _ in all_losses(tmp_path)}) == list(range(1, STEPS + 1))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleaned after the next publish
    assert_same_weights(final_weights(tmp_path), ref_weights)


@pytest.mark.multiproc
def test_sigterm_saves_and_exits_with_the_requeue_code_then_resumes(sample_tokens, tmp_path_factory):
    """Two processes with ZeRO-1 (the SLURM preemption path): SIGTERM -> save -> exit 75 -> resume, bitwise."""
    args = (f"data.train_paths=[{sample_tokens}]", *COMMON, "zero.stage=1", "batch.micro_batch_size=1")
    ref_dir = tmp_path_factory.mktemp("ref2")
    run_training(ref_dir, *args, nproc=2)
    run_dir = tmp_path_factory.mktemp("term")
    proc = start(run_dir, *args, nproc=2)
    deadline = time.monotonic() + 120
    while steps_done(run_dir) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    end = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert end and end[-1]["exit_code"] == 75
    stopped_at = end[-1]["step"]
    assert stopped_at < STEPS and (run_dir / "checkpoints" / f"iter_{stopped_at:08d}" / "neo.json").exists()
    run_training(run_dir, *args, nproc=2)
    assert last_losses(run_dir) == last_losses(ref_dir)
    assert_same_weights(final_weights(run_dir), final_weights(ref_dir))


def test_other_model_shape_is_refused(uninterrupted, sample_tokens, tmp_path):
    src, _, _ = uninterrupted
    run = run_training(
        tmp_path,
        f"data.train_paths=[{sample_tokens}]",
        *COMMON,
        "model.hidden_size=128",
        f"checkpoint.load={src / 'checkpoints'}",
        check=False,
    )
    assert run.returncode == 2 and "different model shape" in run.output and "hidden_size" in run.output


def test_load_weights_only_starts_fine_tuning_at_iteration_zero(uninterrupted, sample_tokens, tmp_path):
    src, _, ref_weights = uninterrupted
    run = run_training(
        tmp_path,
        f"data.train_paths=[{sample_tokens}]",
        *COMMON,
        "schedule.iterations=2",
        f"checkpoint.load={src / 'checkpoints'}",
        "checkpoint.load_weights_only=true",
        "checkpoint.save_interval=0",
        "optimizer.lr=1e-12",
        "schedule.warmup=0",
    )
    assert "starting at iteration 0" in run.output and [r["step"] for r in run.records if "loss" in r] == [
        1,
        2,
    ]
    tuned = final_weights(tmp_path)  # two steps at lr 1e-12 leave the loaded weights (almost) unchanged
    assert all(torch.allclose(tuned[k], ref_weights[k], atol=1e-6) for k in ref_weights)


def assert_same_curve(run: Path, ref: dict[int, float], steps: list[int], rel: float = 1e-4) -> None:
    """The losses of ``run`` at ``steps`` are those of the uninterrupted run, within ``rel`` (fp32)."""
    got = last_losses(run)
    assert sorted(got) == steps
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in steps)
    print(f"{run.name}: steps {steps[0]}-{steps[-1]} within {worst:.2e} relative of the uninterrupted run")
    assert worst <= rel, f"after the reshape the loss curve left the uninterrupted one: {worst:.2e} relative"


@pytest.mark.multiproc
def test_reshape_zero1_dp2_to_zero0_keeps_adam_moments(uninterrupted, sample_tokens, tmp_path):
    """Saved by 2 processes with ZeRO-1 (moments in flat DP partitions) at step 6, resumed by 1 process without
    ZeRO: steps 7-12 give the uninterrupted run's losses. Fresh moments are ~1e-3 off (negative control)."""
    _, ref_losses, _ = uninterrupted
    two = tmp_path / "zero1"
    run_training(
        two,
        f"data.train_paths=[{sample_tokens}]",
        *COMMON,
        "zero.stage=1",
        "batch.micro_batch_size=1",
        "schedule.exit_interval=6",
        nproc=2,
    )
    one = run_training(
        tmp_path / "zero0",
        f"data.train_paths=[{sample_tokens}]",
        *COMMON,
        f"checkpoint.load={two / 'checkpoints'}",
    )
    assert "optimizer state (Adam moments at step 6)" in one.output and "starts fresh" not in one.output
    assert_same_curve(one.dir, ref_losses, list(range(7, STEPS + 1)))


@pytest.mark.parametrize("keep_zero1", [True, False], ids=["another-layout", "same-layout"])
def test_without_saved_optimizer_state_the_load_says_the_moments_start_fresh(
    uninterrupted, sample_tokens, tmp_path, keep_zero1
):
    """A checkpoint from before neo saved optimizer state still loads, into another layout (ZeRO-1 kept on one
    rank) or the same one (ZeRO-1 on one rank runs as ZeRO-0, the layout that saved it), and says so."""
    src, _, _ = uninterrupted
    old = tmp_path / "old" / "iter_00000012"
    shutil.copytree(src / "checkpoints" / "iter_00000012", old)
    meta = json.loads((old / "neo.json").read_text())
    for rel in [r for r in meta["files"] if r.startswith("optim/")]:
        (old / rel).unlink()
        del meta["files"][rel]
    del meta["optimizer_state"]
    (old / "neo.json").write_text(json.dumps(meta))
    run = run_training(
        tmp_path / "run",
        f"data.train_paths=[{sample_tokens}]",
        *COMMON,
        "schedule.iterations=14",
        "zero.stage=1",
        f"zero.single_rank_stage0={str(not keep_zero1).lower()}",
        f"checkpoint.load={old}",
    )
    assert ("into this layout" in run.output) == keep_zero1
    assert (
        "the optimizer state (Adam moments) starts fresh: this checkpoint holds no optimizer state"
        in run.output
    )
    assert [r["step"] for r in run.records if "loss" in r] == [13, 14]


@pytest.mark.multiproc
def test_reshape_tp2_pp2_to_one_process_and_back(sample_tokens, tmp_path):
    """tp 2 x pp 2 on 4 processes saves at step 3; 1 process continues to step 6; tp 2 x pp 2 again to step 8.
    Each leg's losses are those of an uninterrupted single-process run (moments carried both ways; a constant
    learning rate, so that fresh moments would show: ~1e-3 off), and the validation loss right after each load
    is the one the saving run measured."""
    args = (
        f"data.train_paths=[{sample_tokens}]",
        "schedule.warmup=2",
        "optimizer.lr=3e-3",
        "eval.iters=2",
        "logging.interval=2",
        "batch.global_batch_size=8",
        "batch.micro_batch_size=2",
        "model.n_layers=3",
        "schedule.iterations=8",
        "schedule.decay=constant",
        "eval.interval=3",
        "checkpoint.save_interval=0",
    )  # GPT-2's 50,257 tokens: 50,304 rows in both layouts (model.vocab_multiple)
    ref = last_losses(run_training(tmp_path / "ref", *args, "eval.interval=0").dir)
    four = tmp_path / "four"
    src = run_training(four, *args, "schedule.exit_interval=3", "parallel.tp=2", "parallel.pp=2", nproc=4)
    one = run_training(
        tmp_path / "one", *args, "schedule.exit_interval=3", f"checkpoint.load={four / 'checkpoints'}"
    )
    reshaped = [r for r in one.records if r.get("note")]
    assert "optimizer state (Adam moments at step 3)" in one.output
    assert reshaped and reshaped[0]["step"] == 3
    assert abs(reshaped[0]["valid_loss"] - src.valid_losses[-1]) <= 1e-5 * src.valid_losses[-1]
    assert_same_curve(one.dir, ref, [4, 5, 6])

    back = run_training(
        tmp_path / "back",
        *args,
        "parallel.tp=2",
        "parallel.pp=2",
        f"checkpoint.load={tmp_path / 'one' / 'checkpoints'}",
        nproc=4,
    )
    again = [r for r in back.records if r.get("note")]
    assert "optimizer state (Adam moments at step 6)" in back.output
    assert again and abs(again[0]["valid_loss"] - one.valid_losses[-1]) <= 1e-5 * one.valid_losses[-1]
    assert_same_curve(back.dir, ref, [7, 8])
