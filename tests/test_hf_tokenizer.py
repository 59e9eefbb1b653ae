"""Hugging Face tokenizer.json files (``data.tokenizer: hf:DIR``), offline: the same ids as the ``tokenizers``
library, special tokens, the bytes of each token, names by content, and the tools that take a tokenizer
(preprocess, evaluate, generate; training in test_hf_models.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_helpers import sample_texts
from hf_helpers import library, make_tokenizer
from runs import ROOT, clean_env

from neo.data.indexed import IndexedTokens
from neo.data.tokenizer import TokenizerError, load_tokenizer

KINDS = ["byte", "llama3", "sentencepiece"]
TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    " \n\n  tabs\tand 1234 numbers, émigré naïve 東京 🙂 ¿qué? ﬁ",
    "special strings in text: <|endoftext|> </s> <s> <|begin_of_text|>",
    "",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {kind: make_tokenizer(root / kind, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_encodes_and_decodes_as_the_tokenizers_library(folders, kind):
    ours, ref = load_tokenizer(f"hf:{folders[kind]}"), library(folders[kind])
    for text in [*TEXTS, *(t[:5000] for t in sample_texts()[:3])]:
        ids = ours.encode(text)
        assert ids == ref.encode(text).ids
        assert ours.encode_array(text).tolist() == ids and ours.encode_array(text).dtype == np.uint32
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    "kind, eod, bos", [("byte", "<|endoftext|>", None), ("llama3", "<|end_of_text|>", "<|begin_of_text|>"),
                       ("sentencepiece", "</s>", "<s>")]
)  # fmt: skip
def test_special_tokens(folders, kind, eod, bos):
    tok, ref = load_tokenizer(f"hf:{folders[kind]}"), library(folders[kind])
    assert tok.eod_id == ref.token_to_id(eod) and tok.eod_id in tok.special_ids
    assert tok.bos_id == (None if bos is None else ref.token_to_id(bos))
    first = tok.encode("hello")[0]
    assert (first == tok.bos_id) if bos else (first not in tok.special_ids)  # Llama puts BOS first
    plain = tok.encode("hello", add_special_tokens=False)  # what lm-eval asks for a continuation
    assert plain == ref.encode("hello", add_special_tokens=False).ids and tok.bos_id not in plain
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_spell_the_text(folders, kind):
    """The bytes of each token, joined, are the text's UTF-8 bytes (split characters included):
    generation's stop strings and evaluation's bits per byte rely on it."""
    tok = load_tokenizer(f"hf:{folders[kind]}")
    for text in TEXTS[:2]:
        joined = b"".join(tok.token_bytes(i) for i in tok.encode(text) if i not in tok.special_ids)
        lead = (
            b" " if kind == "sentencepiece" else b""
        )  # SentencePiece marks the start of the text as a space
        assert joined == lead + text.encode("utf-8")


def test_name_follows_the_content_not_the_path(folders, tmp_path):
    a = load_tokenizer(f"hf:{folders['llama3']}")
    copy = shutil.copytree(folders["llama3"], tmp_path / "elsewhere")
    assert load_tokenizer(f"hf:{copy}").name == a.name == load_tokenizer(str(copy)).name
    assert load_tokenizer(f"hf:{copy / 'tokenizer.json'}").name == a.name
    (copy / "tokenizer_config.json").write_text('{"eos_token": "<|begin_of_text|>"}')
    assert load_tokenizer(f"hf:{copy}").name != a.name  # another end-of-document token: other token files


def test_without_a_config_the_end_of_document_token_is_found_by_name(tmp_path):
    folder = make_tokenizer(tmp_path / "bare", "sentencepiece", config=False)
    assert load_tokenizer(f"hf:{folder}").eod_id == library(folder).token_to_id("</s>")


def test_missing_or_broken_tokenizer_is_one_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer(f"hf:{tmp_path / 'nothing'}")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path}")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizers tokenizer.json"):
        load_tokenizer(f"hf:{tmp_path}")


def test_preprocess_with_an_hf_tokenizer_writes_the_library_ids(folders, tmp_path):
    """The real CLI with 2 worker processes: each document is the library's ids + the EOD token."""
    docs = [t[:3000] for t in sample_texts()[:6]]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(__import__("json").dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    folder = folders["llama3"]
    cmd = [sys.executable, str(ROOT / "launch" / "preprocess.py"), str(src), "--output", str(tmp_path / "tok"),
           "--tokenizer", f"hf:{folder}", "--workers", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=clean_env())
    data, tok, ref = IndexedTokens(tmp_path / "tok"), load_tokenizer(f"hf:{folder}"), library(folder)
    assert data.tokenizer == tok.name and data.eod_id == tok.eod_id and len(data) == len(docs)
    for i, d in enumerate(docs):
        assert data.doc(i).tolist() == ref.encode(d).ids + [tok.eod_id]


def test_bits_per_byte_lengths_from_token_bytes(folders):
    from neo.evaluate import token_byte_lengths

    tok = load_tokenizer(f"hf:{folders['byte']}")
    lengths = token_byte_lengths(tok)
    text = sample_texts()[0][:4000]
    assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))
    assert lengths[tok.eod_id] == 0
