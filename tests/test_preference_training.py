"""Reward models and DPO through the real launcher, from the shared pretrained tiny checkpoint, on the bundled
preference sample: their losses against the papers' formulas computed here from the model's own outputs, the
transformers export of a reward model, LoRA's reference, and the single-process curve in every layout."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from runs import ROOT, clean_env, make_tokens, rel_curve, run_training

SAMPLE = ROOT / "data" / "sample" / "preference.jsonl"
SUBSET = 8  # records (one prompt group each) of the validation file: one global batch of 8 groups
COMMON = ("model.seq_length=64", "batch.global_batch_size=8", "schedule.warmup=1", "logging.interval=1")
REWARD = (*COMMON, "objective.type=reward", "schedule.iterations=8", "optimizer.lr=3e-3", "eval.interval=4",
          "eval.iters=1", "batch.micro_batch_size=4")  # fmt: skip
DPO_STEPS = 5
DPO = ("model.seq_length=64", "logging.interval=1", "objective.type=dpo", f"schedule.iterations={DPO_STEPS}",
       "optimizer.lr=5e-3", "schedule.warmup=0", "schedule.decay=constant", "eval.interval=0", "eval.iters=2",
       "batch.global_batch_size=4", "batch.micro_batch_size=2")  # fmt: skip
LORA = ("lora.rank=4", "lora.alpha=8", "optimizer.lr=1e-2")


@pytest.fixture(scope="module")
def pref_tokens(tmp_path_factory) -> tuple[str, str]:
    """(the whole sample, its first SUBSET records) preprocessed with --format preference."""
    full = make_tokens(tmp_path_factory.mktemp("pref"), "--format", "preference", "--seq-length", "64",
                       source=SAMPLE)  # fmt: skip
    folder = tmp_path_factory.mktemp("pref_subset")
    subset = folder / "subset.jsonl"
    subset.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:SUBSET]))
    return full, make_tokens(folder, "--format", "preference", "--seq-length", "64", source=subset)


@pytest.fixture(scope="module")
def reward_run(pref_tokens, tiny_checkpoint, tmp_path_factory):
    """A reward model trained on the sample for 8 steps, validated on the subset (every group once)."""
    return run_training(
        tmp_path_factory.mktemp("reward"), *dpo_data(pref_tokens, tiny_checkpoint, "full"), *REWARD
    )


@pytest.fixture(scope="module")
def dpo_run(pref_tokens, tiny_checkpoint, tmp_path_factory):
    """DPO (sigmoid, beta 0.1) of the pretrained tiny model: the curve the other DPO runs are compared with."""
    return run_training(tmp_path_factory.mktemp("dpo"), *dpo_data(pref_tokens, tiny_checkpoint), *DPO)


def dpo_data(pref_tokens, tiny_checkpoint, train: str = "subset") -> tuple[str, ...]:
    """Validate on the subset (DPO: 2 batches of 4, every group once); train on the subset (DPO: 5 steps on 8
    groups, so the loss on them falls clearly) or on the whole sample."""
    full, subset = pref_tokens
    return (f"data.train_paths=[{subset if train == 'subset' else full}]", f"data.valid_paths=[{subset}]",
            f"finetune.init_from={tiny_checkpoint}")  # fmt: skip


def subset_scores(checkpoint, prefix: str) -> tuple[list[tuple[float, float]], list[list[int]]]:
    """(chosen, rejected) scores of every comparison of a preference file under the saved reward model (its
    score at each answer's last token), and the answers' token ids."""
    from neo.checkpoint import load_model
    from neo.data.indexed import IndexedTokens

    model, _, _ = load_model(str(checkpoint))
    data = IndexedTokens(prefix)
    docs = [list(map(int, data.doc(d)))[:64] for d in range(data.num_docs)]
    with torch.no_grad():
        scores = [float(model(torch.tensor([ids]))[0, -1]) for ids in docs]
    return [(scores[c], scores[r]) for c, r, _ in data.pairs.tolist()], docs


def test_reward_model_reports_accuracy_and_margin_and_its_loss_is_bradley_terry(reward_run, pref_tokens):
    """The validation after the last step is the mean of -log sigmoid(r_chosen - r_rejected) over every
    comparison of the subset, from the saved model's own scores; accuracy and margin likewise."""
    recs = reward_run.records
    train = [r for r in recs if "loss" in r]
    assert all({"accuracy", "margin", "chosen", "rejected", "pairs"} <= r.keys() for r in train)
    assert sum(reward_run.losses[-3:]) / 3 < reward_run.losses[0] - 0.01  # it learns
    last = [r for r in recs if "valid_loss" in r][-1]
    pairs, _ = subset_scores(reward_run.dir / "checkpoints", pref_tokens[1])
    loss = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in pairs) / len(pairs)
    assert last["valid_pairs"] == len(pairs)
    assert abs(last["valid_loss"] - loss) <= 1e-5 * loss
    assert last["valid_accuracy"] == pytest.approx(sum(c > r for c, r in pairs) / len(pairs), abs=1e-9)
    assert last["valid_margin"] == pytest.approx(sum(c - r for c, r in pairs) / len(pairs), abs=1e-5)
    assert last["valid_margin"] != 0.0


def test_reward_model_exports_to_sequence_classification_with_the_same_scores(
    reward_run, pref_tokens, tmp_path
):
    from transformers import GPTNeoXForSequenceClassification

    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "export.py"), str(reward_run.dir / "checkpoints"),
                           str(out)], capture_output=True, text=True, env=clean_env(), timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"]
    hf = GPTNeoXForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.num_labels == 1
    pairs, docs = subset_scores(reward_run.dir / "checkpoints", pref_tokens[1])
    ours = [s for pair in pairs for s in pair]
    from neo.data.indexed import IndexedTokens

    order = [d for c, r, _ in IndexedTokens(pref_tokens[1]).pairs.tolist() for d in (c, r)]
    with torch.no_grad():
        theirs = [float(hf(torch.tensor([docs[d]])).logits[0, 0]) for d in order]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-5


def test_dpo_trains_with_rewards_margins_and_accuracy(dpo_run):
    """At the first step the policy is its reference: h = 0, so the loss is log 2 and the rewards 0 exactly.
    After training, the comparisons of the validation subset (seen in training) are ordered: loss below log 2,
    a positive margin, accuracy above chance."""
    first, *rest = [r for r in dpo_run.records if "loss" in r]
    assert (
        abs(first["loss"] - math.log(2)) < 1e-6
        and first["chosen"] == first["rejected"] == first["margin"] == 0
    )
    keys = {"accuracy", "margin", "chosen", "rejected", "logp_chosen", "logp_rejected", "pairs"}
    assert all(keys <= r.keys() for r in rest) and all(r["chosen"] != 0 for r in rest)
    valid = [r for r in dpo_run.records if "valid_loss" in r][-1]
    assert (
        valid["valid_loss"] < math.log(2) - 0.01
        and valid["valid_margin"] > 0
        and valid["valid_accuracy"] > 0.5
    )


@pytest.mark.parametrize(
    "variant, smoothing", [("sigmoid", 0.25), ("ipo", 0.0)], ids=["label-smoothing", "ipo"]
)
def test_dpo_variants_start_from_their_formula(
    dpo_run, pref_tokens, tiny_checkpoint, tmp_path, variant, smoothing
):
    """At h = 0: conservative DPO's loss is log 2 and its gradient (1 - 2 eps) times plain DPO's (the same first
    batch); IPO's loss is (1 / (2 beta))^2 = 25 at beta 0.1, and it falls."""
    run = run_training(tmp_path, *dpo_data(pref_tokens, tiny_checkpoint), *DPO,
                       "schedule.iterations=2", "eval.iters=0", f"objective.dpo_variant={variant}",
                       f"objective.label_smoothing={smoothing}")  # fmt: skip
    first = run.records[0]
    if variant == "ipo":
        assert abs(first["loss"] - 25.0) < 1e-4 and run.losses[1] < run.losses[0]
        return
    plain = dpo_run.records[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["grad_norm"] == pytest.approx((1 - 2 * smoothing) * plain["grad_norm"], rel=1e-4)


@pytest.fixture(scope="module")
def lora_dpo_run(pref_tokens, tiny_checkpoint, tmp_path_factory):
    """LoRA DPO on one process: the reference is the base (the adapters off), no second copy of the weights."""
    return run_training(
        tmp_path_factory.mktemp("dpo_lora"), *dpo_data(pref_tokens, tiny_checkpoint), *DPO, *LORA
    )


def test_dpo_with_lora_compares_with_the_base(lora_dpo_run):
    """The adapters start at zero, so the first step's policy is the base: log 2 and zero rewards; then the
    adapters move the policy away from the base (a reference that followed the policy would keep h = 0)."""
    first, *rest = [r for r in lora_dpo_run.records if "loss" in r]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["margin"] == 0
    assert all(r["chosen"] != 0 and r["rejected"] != 0 for r in rest)
    assert sum(r["loss"] for r in rest) / len(rest) < math.log(2)


@pytest.mark.multiproc
@pytest.mark.parametrize("kind, layout", [
    ("reward", ("parallel.tp=2",)),
    ("dpo", ("parallel.tp=2",)),
    ("dpo", ("zero.stage=3", "batch.micro_batch_size=1")),  # dp 2 x 2 accumulation
    ("dpo-lora", ("zero.stage=3", "batch.micro_batch_size=1")),  # the base forward outside the engine
], ids=["reward-tp2", "dpo-tp2", "dpo-dp2-zero3", "dpo-lora-dp2-zero3"])  # fmt: skip
def test_every_layout_gives_the_single_process_curve(
    request, pref_tokens, tiny_checkpoint, tmp_path, kind, layout
):
    """Two processes give the one-process curve (fp32, 1e-4 relative), validation included."""
    reference = request.getfixturevalue(
        {"reward": "reward_run", "dpo": "dpo_run", "dpo-lora": "lora_dpo_run"}[kind]
    )
    sets = {"reward": REWARD, "dpo": DPO, "dpo-lora": (*DPO, *LORA)}[kind]
    data = dpo_data(pref_tokens, tiny_checkpoint, "full" if kind == "reward" else "subset")
    run = run_training(tmp_path, *data, *sets, *layout, nproc=2)
    assert rel_curve(run.losses, reference.losses) <= 1e-4
    if reference.valid_losses:
        assert rel_curve(run.valid_losses, reference.valid_losses) <= 1e-4


def test_resumed_dpo_keeps_the_reference_it_began_with(dpo_run, pref_tokens, tiny_checkpoint, tmp_path):
    """Stopped after 2 steps and resumed: the same curve as the uninterrupted run. The reference is the
    checkpoint the run started from (recorded in every checkpoint), not the weights the resume loads."""
    sets = (*dpo_data(pref_tokens, tiny_checkpoint), *DPO)
    first = run_training(tmp_path, *sets, "schedule.exit_interval=2")
    meta = json.loads(next((tmp_path / "checkpoints").glob("iter_*/neo.json")).read_text())
    assert meta["reference"]["path"] == str(sorted(tiny_checkpoint.glob("iter_*"))[-1])
    assert len(first.losses) == 2
    resumed = run_training(tmp_path, *sets)
    assert rel_curve(resumed.losses, dpo_run.losses) <= 1e-6


def test_dpo_with_a_pipeline_is_refused_with_one_message(pref_tokens, tmp_path):
    """Checked before any process group starts: exit 2, the reason and the fix, no traceback."""
    env = clean_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "ds_configs" / "models" / "tiny.yml"),
           "--set", f"logging.dir={tmp_path}", "--set", f"data.train_paths=[{pref_tokens[0]}]", "--set",
           "objective.type=dpo", "--set", "parallel.pp=2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "objective.type = dpo" in out and "parallel.pp = 2" in out and "Fix:" in out
    assert "Traceback" not in out and out.count("error:") == 1
