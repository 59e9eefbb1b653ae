"""LoRA: exact under tensor parallelism, the same curve in every layout, adapters-only checkpoints, and the
same function in neo (unmerged), a merged transformers export and PEFT on the exported base."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import spawn
from runs import BF16_FIRST_STEPS, ROOT, make_tokens, rel_curve, run_training

STEPS = 10
TRAIN = (f"schedule.iterations={STEPS}", "schedule.warmup=2", "optimizer.lr=1e-2", "eval.interval=5",
         "eval.iters=2", "logging.interval=5", "objective.type=sft", "model.seq_length=128", "data.split=90,10",
         "batch.global_batch_size=8", "lora.rank=4", "lora.alpha=8")  # fmt: skip


@pytest.fixture(scope="module")
def chat_tokens(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("chat")
    return make_tokens(
        folder, "--format", "chat", "--seq-length", "128", source=ROOT / "data" / "sample" / "chat.jsonl"
    )


@pytest.fixture(scope="module")
def reference(chat_tokens, tiny_checkpoint, tmp_path_factory):
    """LoRA SFT of the pretrained tiny model on one process: the curve every layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("lora_ref")
    return run_training(run_dir, f"data.train_paths=[{chat_tokens}]", *TRAIN, f"finetune.init_from={tiny_checkpoint}",
                        "batch.micro_batch_size=4")  # fmt: skip


def test_lora_trains_only_the_adapters_and_saves_them_alone(reference, tiny_checkpoint):
    assert reference.valid_losses[-1] < reference.valid_losses[0]
    assert (
        "trainable parameters of" in reference.output
        and "LoRA adapters and their optimizer state" in reference.output
    )
    meta = json.loads(next((reference.dir / "checkpoints").glob("iter_*/neo.json")).read_text())
    names = [n for n in meta["tp_split"]]
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert meta["lora"]["base"]["path"] == str(sorted(tiny_checkpoint.glob("iter_*"))[-1])
    weights = sum(r["bytes"] for k, r in meta["files"].items() if k.startswith("weights/"))
    assert weights < 200_000  # 8 adapters of rank 4 on a 64-wide model, not the 26 MB base


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc, layout", [
    (2, ("parallel.tp=2", "batch.micro_batch_size=4")),
    (2, ("parallel.pp=2", "batch.micro_batch_size=2")),
    (2, ("zero.stage=3", "batch.micro_batch_size=2")),
], ids=["tp2", "pp2", "dp2-zero3"])  # fmt: skip
def test_every_layout_gives_the_single_process_curve(
    reference, chat_tokens, tiny_checkpoint, tmp_path, nproc, layout
):
    run = run_training(tmp_path, f"data.train_paths=[{chat_tokens}]", *TRAIN, f"finetune.init_from={tiny_checkpoint}",
                       *layout, nproc=nproc)  # fmt: skip
    assert rel_curve(run.losses, reference.losses) <= 1e-4
    assert rel_curve(run.valid_losses, reference.valid_losses) <= 1e-4


def test_bf16_and_continued_pretraining(chat_tokens, sample_tokens, tiny_checkpoint, tmp_path):
    """LoRA in bf16 (SFT), and with objective pretrain (continued pretraining on plain text)."""
    bf16 = run_training(tmp_path / "bf16", f"data.train_paths=[{chat_tokens}]", *TRAIN, "precision.dtype=bf16",
                        "zero.stage=1", f"finetune.init_from={tiny_checkpoint}", "batch.micro_batch_size=8",
                        *BF16_FIRST_STEPS)  # fmt: skip
    assert len(bf16.losses) == 5 and bf16.losses[-1] < bf16.losses[0]
    pretrain = run_training(tmp_path / "pretrain", f"data.train_paths=[{sample_tokens}]", "schedule.iterations=4",
                            "eval.interval=0", "lora.rank=4", "optimizer.lr=1e-2", f"finetune.init_from={tiny_checkpoint}")  # fmt: skip
    assert pretrain.losses[-1] < pretrain.losses[0] and "trainable parameters of" in pretrain.output


def test_unmerged_equals_merged_export_equals_peft(reference, tmp_path):
    """neo's model with its adapters (not merged), the --merge-lora export in transformers, and PEFT's
    LoraModel on the --peft export's base: the same logits (fp32, 1e-5)."""
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM

    from neo.checkpoint import read_meta, resolve
    from neo.checkpoint.load import copy_weights_into
    from neo.checkpoint.lora import lora_base
    from neo.cli import export
    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT
    from neo.model.lora import LoRASpec, apply_lora
    from neo.parallel.topology import Topology

    ckpt = resolve(str(reference.dir / "checkpoints"))
    meta = read_meta(ckpt)
    model = GPT(ModelArgs(**meta["model"]), seed=0)
    apply_lora(model, LoRASpec(**meta["lora"]["spec"]), seed=0)
    topo = Topology(1, 1, 1, 0)
    copy_weights_into(model, lora_base(meta, ckpt), topo)
    copy_weights_into(model, ckpt, topo, only_present=True)
    assert export.main([ckpt, str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert export.main([ckpt, str(tmp_path / "peft"), "--peft"]) == 0
    merged = GPTNeoXForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
                                     tmp_path / "peft" / "adapter").eval()  # fmt: skip
    base = GPTNeoXForCausalLM.from_pretrained(tmp_path / "peft" / "base").eval()
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(ids)[..., :50257]
        theirs = merged(input_ids=ids).logits[..., :50257]
        peft_logits = peft(input_ids=ids).logits[..., :50257]
        base_logits = base(input_ids=ids).logits[..., :50257]
    assert (ours - theirs).abs().max() <= 1e-5 and (ours - peft_logits).abs().max() <= 1e-5
    assert (ours - base_logits).abs().max() > 1e-3  # the adapters changed the model: the test can fail


def _tp(rank: int, world: int) -> dict:
    """tp = 2 with adapters on every target (B drawn non-zero) against tp = 1: logits and adapter gradients."""
    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT
    from neo.model.lora import LoRASpec, apply_lora

    args = ModelArgs(
        n_layers=2, hidden_size=32, n_heads=4, vocab_size=256, activation="swiglu", parallel_residual=True
    )
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, group in (("tp1", None), ("tp2", dist.group.WORLD)):
        model = GPT(args, tp_group=group, seed=5)
        apply_lora(model, LoRASpec(rank=3, alpha=6.0), seed=5)
        g = torch.Generator().manual_seed(9)
        for m in model.modules():
            if "lora_B" in m._parameters:  # a non-zero B, the same full draw sliced like the weight
                full = torch.randn(m._full_shape()[0], 3, generator=g)
                rows = (
                    full.chunk(world if group else 1, dim=0)[rank if group else 0]
                    if m.lora_B.tp_split_dim == 0
                    else full
                )
                m.lora_B.data.copy_(rows)
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        out[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    grads1, grads2 = out["tp1"][1], out["tp2"][1]
    errors = {"loss": abs(out["tp1"][0] - out["tp2"][0])}
    for n, g2 in grads2.items():
        g1 = grads1[n]
        split = [d for d in range(g1.ndim) if g1.shape[d] != g2.shape[d]]  # replicated, or this rank's slice
        part = g1.chunk(world, dim=split[0])[rank] if split else g1
        errors[n] = ((part - g2).abs().max() / g1.abs().max().clamp_min(1e-12)).item()
    return errors


@pytest.mark.multiproc
def test_adapters_under_tensor_parallelism_are_exact_slices():
    for errors in spawn(_tp, 2):
        assert errors["loss"] <= 1e-6 and max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize(
    "head", [{"head": "score"}, {"value_head": True}], ids=["reward-score-head", "ppo-value-head"]
)
def test_heads_an_objective_adds_train_in_full_and_merge_with_the_adapters(head):
    """A reward model's score head and PPO's value head are new to the checkpoint LoRA starts from: they train
    beside the adapters (frozen, they would stay random) and come back from the adapters-only checkpoint."""
    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT
    from neo.model.lora import LoRASpec, apply_lora, is_adapter, merge

    model = GPT(ModelArgs(n_layers=2, hidden_size=64, n_heads=4, vocab_size=128, **head))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    spec = LoRASpec(4, 8.0, 0.0, ["qkv", "attn_out", "mlp_in", "mlp_out"], {})
    apply_lora(model, spec, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if not is_adapter(n)}
    assert heads and all(("score_head" in n) or ("value_head" in n) for n in heads), heads
    saved = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    merged = merge(base, saved, spec.to_dict())
    assert all(torch.equal(merged[n], saved[n]) for n in heads)
    assert not any(is_adapter(k) for k in merged)
