"""PPO and GRPO through the real launcher, from the shared pretrained tiny checkpoint, with a programmatic
reward defined here (tests/toy_rewards.py; any ``module:function(prompts, responses) -> list[float]`` on the
Python path works): the reward rises with KL bounded, every per-step metric is there, tensor parallelism gives
the one-process run, ZeRO-3 runs and learns, a resumed run repeats the uninterrupted one exactly, and a
pipeline is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from runs import ROOT, clean_env, make_tokens, run_training

TESTS = os.path.dirname(os.path.abspath(__file__))
ENV = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}  # toy_rewards importable
STEPS = 12  # 6 rollouts of 16 sampled responses, 2 optimizer steps each (2 epochs of one mini-batch)
RISE = 2.0  # the last rollout's mean reward is at least RISE x the first's
MAX_KL = 1.0  # KL(policy || reference) per response token (k3), at every step
RL = ("model.seq_length=128", "objective.reward=toy_rewards:commas", "objective.max_new_tokens=8",
      f"schedule.iterations={STEPS}", "schedule.warmup=0", "schedule.decay=constant", "optimizer.lr=2e-3",
      "eval.interval=0", "eval.iters=0", "logging.interval=1", "batch.global_batch_size=16",
      "batch.micro_batch_size=8")  # fmt: skip
KIND = {"ppo": ("objective.type=ppo", "objective.rollout_prompts=16"),  # 16 prompts x 1 response
        "grpo": ("objective.type=grpo", "objective.rollout_prompts=4", "objective.group_size=4")}  # fmt: skip
TIMINGS = {"step_time_s", "tokens_per_s", "tflops_per_device", "memory_gb", "gen_s"}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    """The chat sample (chatml): each example's conversation up to its first answer is a prompt."""
    return make_tokens(tmp_path_factory.mktemp("chat"), "--format", "chat", "--seq-length", "128",
                       source=ROOT / "data" / "sample" / "chat.jsonl")  # fmt: skip


def train(run_dir, prompts, tiny_checkpoint, kind: str, *extra: str, nproc: int = 1):
    return run_training(run_dir, f"data.train_paths=[{prompts}]", f"finetune.init_from={tiny_checkpoint}", *RL,
                        *KIND[kind], *extra, nproc=nproc, env=ENV)  # fmt: skip


@pytest.fixture(scope="module")
def runs(prompts, tiny_checkpoint, tmp_path_factory) -> dict:
    """One uninterrupted single-process run of each objective, started on first use."""
    done = {}

    def get(kind: str):
        if kind not in done:
            done[kind] = train(tmp_path_factory.mktemp(kind), prompts, tiny_checkpoint, kind)
        return done[kind]

    return get


def steps_of(run) -> list[dict]:
    return [r for r in run.records if "loss" in r]


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_the_reward_rises_with_kl_bounded_and_every_metric_reported(runs, kind):
    run = runs(kind)
    recs = steps_of(run)
    assert len(recs) == STEPS
    keys = {"reward", "reward_std", "kl", "clip_frac", "entropy", "response_len", "gen_s", "step_time_s"}
    keys |= {"value_loss"} if kind == "ppo" else set()
    assert all(keys <= r.keys() for r in recs), recs[0].keys()
    rewards = [r["reward"] for r in recs]
    assert rewards[-1] >= RISE * rewards[0] and rewards[-1] > rewards[0] + 0.2, rewards
    assert max(r["kl"] for r in recs) <= MAX_KL and abs(recs[0]["kl"]) < 1e-6  # step 1: policy = reference
    assert all(0 <= r["clip_frac"] <= 1 and r["entropy"] > 0 and 0 < r["response_len"] <= 8 for r in recs)
    assert all(0 < r["gen_s"] and 0 < r["step_time_s"] for r in recs)


@pytest.mark.multiproc
def test_tensor_parallel_ppo_gives_the_one_process_run(runs, prompts, tiny_checkpoint, tmp_path):
    """Every TP rank samples the same tokens from the gathered logits with the one-process seed: the same
    rollouts, rewards and losses over the first 2 rollouts (4 steps; fp32, 1e-4 relative). PPO: the policy,
    its critic and the frozen reference are all split over the two ranks."""
    run = train(
        tmp_path, prompts, tiny_checkpoint, "ppo", "parallel.tp=2", "schedule.exit_interval=4", nproc=2
    )
    ours, single = steps_of(run), steps_of(runs("ppo"))[:4]
    assert len(ours) == 4
    for a, b in zip(ours, single):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
        assert a["response_len"] == b["response_len"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(abs(b["loss"]), 1e-2)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-5)


@pytest.mark.multiproc
def test_zero3_data_parallel_grpo_learns(prompts, tiny_checkpoint, tmp_path):
    """dp 2 with ZeRO-3: each rank samples its half of the prompts (its own seed, so not the one-process
    rollouts) with the policy's partitioned weights gathered; the reward rises as in one process."""
    recs = steps_of(train(tmp_path, prompts, tiny_checkpoint, "grpo", "zero.stage=3", nproc=2))
    rewards = [r["reward"] for r in recs]
    assert len(recs) == STEPS and rewards[-1] >= RISE * rewards[0], rewards
    assert max(r["kl"] for r in recs) <= MAX_KL


def test_a_resumed_run_repeats_the_uninterrupted_one(runs, prompts, tiny_checkpoint, tmp_path):
    """PPO stopped after step 5, inside the third rollout (its second step), and resumed for 3 steps: the same
    rollouts, rewards, losses and metrics at every step (timings aside) as the uninterrupted run. The
    checkpoint keeps the rollout in training, the latest rollout's numbers and the reference the run began
    from (the policy's start, not the weights the resume loads)."""
    train(tmp_path, prompts, tiny_checkpoint, "ppo", "schedule.exit_interval=5")
    resumed = train(tmp_path, prompts, tiny_checkpoint, "ppo", "schedule.exit_interval=3")
    ours, full = steps_of(resumed), steps_of(runs("ppo"))
    assert [r["step"] for r in ours] == list(range(1, 9))
    for a, b in zip(ours, full):
        for key in b.keys() - TIMINGS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_a_pipeline_is_refused_with_one_message(prompts, tmp_path, kind):
    """Checked before any process group starts (a 2-process job's rank 0): exit 2, the reason, no traceback."""
    env = clean_env(
        **ENV, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29562"
    )
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "ds_configs" / "models" / "tiny.yml"),
           "--set", f"logging.dir={tmp_path}", "--set", f"data.train_paths=[{prompts}]", "--set",
           f"objective.type={kind}", "--set", "objective.reward=toy_rewards:commas", "--set", "parallel.pp=2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"objective.type = {kind} needs parallel.pp = 1" in out and "Fix:" in out
    assert "Traceback" not in out and out.count("error:") == 1
