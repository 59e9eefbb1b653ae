"""Hugging Face tokenizer folders and model folders built in the test, offline (nothing is downloaded).

Three tokenizer kinds, trained on the sample corpus with the ``tokenizers`` library, in the shapes of the
released ones: ``byte`` (byte-level BPE with <|endoftext|> = 0 and no added tokens, GPT-NeoX-20B/Pythia),
``llama3`` (byte-level BPE whose post-processor puts <|begin_of_text|> first, <|end_of_text|> the eos) and
``sentencepiece`` (Mistral/Llama 2: ▁ for spaces, <0xNN> byte fallback, <s> first, </s> the eos).
"""

from __future__ import annotations

import json
from pathlib import Path

from data_helpers import sample_texts

SPECIALS = {
    "byte": (["<|endoftext|>"], None, "<|endoftext|>"),  # (special tokens, bos, eos)
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>", "<|end_of_text|>"),
    "sentencepiece": (["<unk>", "<s>", "</s>"], "<s>", "</s>"),
}


def make_tokenizer(folder: Path, kind: str, vocab: int = 600, config: bool = True) -> Path:
    """A tokenizer folder (tokenizer.json, + tokenizer_config.json unless ``config`` is False)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials, bos, eos = SPECIALS[kind]
    if kind == "sentencepiece":  # trained on ▁-split words (fast), then used on whole texts as Mistral's is
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator([t[:20_000] for t in sample_texts()], trainer)
    if kind == "sentencepiece":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads(tok.to_str())
    if kind == "sentencepiece":  # the byte-fallback pieces are ordinary vocabulary entries, as in Mistral's
        vocab_map = spec["model"]["vocab"]
        for b in range(256):
            vocab_map.setdefault(f"<0x{b:02X}>", len(vocab_map))
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    if config:
        names = {"eos_token": eos, **({"bos_token": bos} if bos else {})}
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names})
        )
    return folder


def library(folder: Path):
    """The ``tokenizers`` library's own reading of the folder: the reference."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def save_hf_model(folder: Path, config, dtype=None, seed: int = 0, scale: float = 0.1):
    """A transformers model of ``config`` with random weights (norm gains and biases too), saved to ``folder``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.eval().save_pretrained(str(folder))
    return model
