"""PPO and GRPO learn: reward and KL against steps, from neo's real launcher, drawn as a PNG.

    python bench/rl.py                    # tiny policy, ~10 minutes on 2 CPU cores
    python bench/rl.py --steps 80

The policy is the tiny model pretrained on the bundled Austen corpus (``--pretrain`` steps); prompts are the
chat sample's questions (rendered with chatml); the reward is a programmatic one (bench/rl_reward.py: the
share of a response's words that are among the commonest English words, no model involved). Both
objectives run with the same settings, then the record plots the mean reward of each rollout and the KL to
the reference against the step, and says how far the reward rose and how high KL went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, environment, markdown_table, write_record

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--pretrain", type=int, default=60)
    p.add_argument("--out", default=None)
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def train(run_dir: Path, *sets: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "ds_configs" / "models" / "tiny.yml"),
           "--set", f"logging.dir={run_dir}", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def prepare(tmp: Path, pretrain: int) -> tuple[str, str, str]:
    """(Austen tokens, chat tokens, pretrained checkpoint)."""
    pre = [sys.executable, str(ROOT / "launch" / "preprocess.py")]
    austen, chat = tmp / "austen", tmp / "chat"
    subprocess.run([*pre, str(ROOT / "data" / "sample" / "austen.jsonl.gz"), "--output", str(austen)], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([*pre, str(ROOT / "data" / "sample" / "chat.jsonl"), "--output", str(chat), "--format", "chat",
                    "--seq-length", "128"], check=True, capture_output=True)  # fmt: skip
    train(tmp / "pretrain", f"data.train_paths=[{austen}]", f"schedule.iterations={pretrain}", "optimizer.lr=1e-2",
          "eval.interval=0", "batch.micro_batch_size=8")  # fmt: skip
    return str(austen), str(chat), str(tmp / "pretrain" / "checkpoints")


def run_objective(tmp: Path, kind: str, chat: str, init: str, steps: int) -> list[dict]:
    prompts = "32" if kind == "ppo" else "8"  # the same 32 sequences per rollout: 32 x 1 or 8 x 4
    return train(tmp / kind, f"data.train_paths=[{chat}]", f"objective.type={kind}", "objective.reward=rl_reward:common_words",
                 f"objective.rollout_prompts={prompts}", "objective.max_new_tokens=16", f"schedule.iterations={steps}",
                 "schedule.warmup=0", "schedule.decay=constant", "optimizer.lr=2e-3", "model.seq_length=128",
                 "data.split=90,10", "eval.interval=0", "logging.interval=4", "batch.global_batch_size=16",
                 "batch.micro_batch_size=8", f"finetune.init_from={init}")  # fmt: skip


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    for name, recs in curves.items():
        rollouts = [r for r in recs if "reward" in r and r.get("responses_in_step", True)]
        ax_r.plot(
            [r["step"] for r in rollouts], [r["reward"] for r in rollouts], marker="o", label=name.upper()
        )
        ax_kl.plot(
            [r["step"] for r in recs if "kl" in r], [r["kl"] for r in recs if "kl" in r], label=name.upper()
        )
    ax_r.set(xlabel="step", ylabel="mean reward of the latest rollout", title="reward")
    ax_kl.set(xlabel="step", ylabel="KL(policy || reference), k3", title="KL to the reference")
    for ax in (ax_r, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> None:
    args = parse_args(argv)
    record = environment()
    with tempfile.TemporaryDirectory(prefix="neo-bench-rl-") as tmp:
        _, chat, init = prepare(Path(tmp), args.pretrain)
        curves = {kind: run_objective(Path(tmp), kind, chat, init, args.steps) for kind in ("ppo", "grpo")}
    rows = []
    for kind, recs in curves.items():
        rewards = [r["reward"] for r in recs if "reward" in r]
        kls = [r["kl"] for r in recs if "kl" in r]
        rows.append(
            [
                kind.upper(),
                f"{rewards[0]:.3f}",
                f"{max(rewards[-4:]):.3f}",
                f"{rewards[-1]:.3f}",
                f"{max(kls):.3f}",
            ]
        )
    record.update(benchmark="rl", steps=args.steps, pretrain=args.pretrain, curves=curves)
    text = "\n".join([f"# PPO and GRPO learn a programmatic reward, {record['date']}", "", "{environment}", "",
                      f"Tiny policy (pretrained {args.pretrain} steps on the Austen sample), reward: bench/rl_reward.py "
                      "common_words; 32 sampled responses per rollout (PPO 32 prompts x 1, GRPO 8 x 4), 2 epochs of "
                      "mini-batches of 16, lr 2e-3, 16 new tokens.", "",
                      markdown_table(["objective", "reward, first rollout", "best of the last 4 steps", "last step",
                                      "max KL"], rows), "", f"![reward and KL](rl-{record['date']}.png)", ""])  # fmt: skip
    print(text.replace("{environment}", ""))
    if not args.no_record:
        out = Path(args.out) if args.out else ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        plot(curves, out / f"rl-{record['date']}.png")
        json_path, md_path = write_record("rl", record, text, args.out)
        print(f"wrote {md_path}, {json_path.name} and rl-{record['date']}.png")


if __name__ == "__main__":
    main()
