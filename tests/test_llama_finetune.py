"""A model a user already has, end to end: a Llama-shaped transformers folder (grouped-query attention, its
own tokenizer.json) is fine-tuned with LoRA on chat data straight from the folder (finetune.init_from), then
exported back to transformers (merged) and to PEFT (base + adapter); all three give neo's logits."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import make_tokenizer, save_hf_model
from runs import ROOT, make_tokens, run_training


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A small LlamaForCausalLM (4 query heads sharing 2 key/value heads) with a Llama-3-style tokenizer."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama")
    make_tokenizer(folder, "llama3", vocab=600)
    config = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)  # fmt: skip
    save_hf_model(folder, config)
    return folder


def test_import_lora_sft_and_export_to_transformers_and_peft(llama_folder, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from neo.checkpoint import load_model
    from neo.cli import export

    tokens = make_tokens(tmp_path / "chat", "--format", "chat", "--seq-length", "96", "--tokenizer",
                         f"hf:{llama_folder}", source=ROOT / "data" / "sample" / "chat.jsonl")  # fmt: skip
    config = tmp_path / "sft-lora.yml"  # no model shape: it comes from the folder
    config.write_text("objective: {type: sft}\nlora: {rank: 4, alpha: 8}\nmodel: {seq_length: 96}\n")
    run = run_training(tmp_path / "run", f"data.train_paths=[{tokens}]", f"data.tokenizer=hf:{llama_folder}",
                       f"finetune.init_from={llama_folder}", "schedule.iterations=6", "optimizer.lr=1e-2",
                       "eval.interval=3", "eval.iters=1", "data.split=90,10", "batch.micro_batch_size=4",
                       configs=(str(config),))  # fmt: skip
    assert "converted the Hugging Face model" in run.output and "trainable parameters of" in run.output
    assert run.valid_losses[-1] < run.valid_losses[0]
    ckpt = str(run.dir / "checkpoints")
    assert export.main([ckpt, str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert export.main([ckpt, str(tmp_path / "peft"), "--peft"]) == 0
    neo_model, args, _ = load_model(ckpt)
    assert args.kv_heads == 2 and args.norm == "rmsnorm"
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "peft" / "base"),
                                     tmp_path / "peft" / "adapter").eval()  # fmt: skip
    original = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    ids = torch.randint(2, 600, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = neo_model(ids)[..., :600]
        assert (ours - merged(input_ids=ids).logits).abs().max() <= 1e-5
        assert (ours - peft(input_ids=ids).logits).abs().max() <= 1e-5
        assert (ours - original(input_ids=ids).logits).abs().max() > 1e-3  # fine-tuning changed the model
