"""Preprocessing: exact tokens for every input type, clear messages for bad input, no half outputs."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_helpers import ROOT, SAMPLE, sample_texts

from neo.data.indexed import DataError, IndexedTokens
from neo.data.preprocess import preprocess
from neo.data.tokenizer import load_tokenizer

CLI = [sys.executable, str(ROOT / "launch" / "preprocess.py")]


def expected_tokens(texts, name="gpt2"):
    tok = load_tokenizer(name)
    return [tok.encoding.encode_ordinary(t) + [tok.eod_id] for t in texts]


def read_docs(prefix):
    r = IndexedTokens(prefix)
    return [r.doc(i).tolist() for i in range(len(r))]


def run(inputs, out, **kw):
    log = io.StringIO()
    stats = preprocess([str(p) for p in inputs], str(out), log=log, **kw)
    return stats, log.getvalue()


def test_sample_corpus_equals_tiktoken_and_is_worker_independent(tmp_path):
    stats, log = run([SAMPLE], tmp_path / "w2", workers=2, interval=0)
    texts = sample_texts()
    assert read_docs(tmp_path / "w2") == expected_tokens(texts)
    assert (stats.docs, stats.tokens, sum(stats.skipped.values())) == (
        269,
        IndexedTokens(tmp_path / "w2").num_tokens,
        0,
    )
    line = log.strip().splitlines()[-1]
    assert (
        "[####################] 100%" in line and "docs/s" in line and "MB/s" in line and "tokens/s" in line
    )
    run([SAMPLE], tmp_path / "w1", workers=1)
    assert (tmp_path / "w1.bin").read_bytes()[32:] == (tmp_path / "w2.bin").read_bytes()[32:]
    r = IndexedTokens(tmp_path / "w1")
    assert r.dtype == np.uint16 and r.tokenizer == "gpt2" and r.eod_id == 50256


def test_large_vocab_uses_uint32(tmp_path):
    texts = sample_texts()[:3]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run([tmp_path / "a.jsonl"], tmp_path / "o", tokenizer="o200k_base", workers=1)
    assert IndexedTokens(tmp_path / "o").dtype == np.uint32
    assert read_docs(tmp_path / "o") == expected_tokens(texts, "o200k_base")


def test_plain_text_file_and_paragraph_modes(tmp_path):
    (tmp_path / "d").mkdir()
    a = tmp_path / "d" / "a.txt"
    a.write_bytes(b"First line\r\nsecond line\r\n\r\n  Indented para  \n\n\n\nlast\n")
    with gzip.open(tmp_path / "d" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("Gzipped <|endoftext|> text\n")
    run([tmp_path / "d"], tmp_path / "files", workers=1)  # a directory: its files, sorted
    whole = [a.read_text(encoding="utf-8"), "Gzipped <|endoftext|> text\n"]  # Python text mode: \r\n -> \n
    assert read_docs(tmp_path / "files") == expected_tokens(whole)
    run([a], tmp_path / "paras", text_mode="paragraph", workers=1)
    assert read_docs(tmp_path / "paras") == expected_tokens(
        ["First line\nsecond line", "  Indented para  ", "last"]
    )


def test_parquet_and_saved_hf_dataset(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    texts = sample_texts()[:5]
    pq.write_table(pa.table({"id": list(range(6)), "body": [*texts, None]}), tmp_path / "a.parquet")
    stats, log = run([tmp_path / "a.parquet"], tmp_path / "pq", text_key="body", workers=1)
    assert read_docs(tmp_path / "pq") == expected_tokens(texts)
    assert stats.skipped == {"missing key": 1} and "a.parquet row 6: missing key" in log
    with pytest.raises(
        DataError, match=r"no column 'text' \(columns: id, body\); choose one with --text-key"
    ):
        run([tmp_path / "a.parquet"], tmp_path / "pq2")

    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts[:3]}),
            "validation": datasets.Dataset.from_dict({"text": texts[3:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    run([tmp_path / "saved"], tmp_path / "hf", split="validation", workers=2)
    assert read_docs(tmp_path / "hf") == expected_tokens(texts[3:])
    with pytest.raises(DataError, match="no split 'test' .*splits: train, validation"):
        run([tmp_path / "saved"], tmp_path / "hf", split="test")
    datasets.Dataset.from_dict({"n": [1, 2], "text": texts[:2]}).to_csv(
        str(tmp_path / "t.csv")
    )  # via load_dataset
    run([tmp_path / "t.csv"], tmp_path / "csv", workers=1)
    assert read_docs(tmp_path / "csv") == expected_tokens(texts[:2])


GOOD = [json.dumps({"text": "Good line one."}).encode(), json.dumps({"text": "Good line two."}).encode()]
BAD = {  # kind: (bad line, what the message must say)
    "invalid UTF-8": (b'{"text": "caf\xff"}', "invalid UTF-8: byte 0xff at column 14"),
    "not JSON": (b'{"text": oops}', "not JSON: Expecting value"),
    "missing key": (b'{"body": "x", "id": 3}', "missing key: no 'text' key (keys: body, id)"),
    "not a string": (b'{"text": 5}', "not a string: 'text' is int"),
    "empty document": (b'{"text": " \\n "}', "empty document"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_jsonl_line_is_reported_skipped_or_fatal(tmp_path, kind):
    line, says = BAD[kind]
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\n".join([GOOD[0], b"", line, GOOD[1]]) + b"\n")  # the bad one is line 3
    stats, log = run([f], tmp_path / "o", workers=2)
    assert f"warning: {f}:3: {says}" in log
    assert stats.skipped == {kind: 1} and read_docs(tmp_path / "o") == expected_tokens(
        ["Good line one.", "Good line two."]
    )
    with pytest.raises(DataError, match=f"^{f}:3: {kind}: .*Fix: .*drop --strict"):
        run([f], tmp_path / "strict", strict=True, workers=2)
    assert not list(tmp_path.glob("strict*"))  # nothing published, temporaries removed


def test_invalid_utf8_in_text_file_names_the_line(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("fine\n")
    bad.write_bytes(b"line one\nline two\nbroken \xc3\x28 here\n")
    stats, log = run([bad, good], tmp_path / "o", workers=1)
    assert f"{bad}:3: invalid UTF-8: byte 0xc3 at column 8" in log
    assert read_docs(tmp_path / "o") == expected_tokens(["fine\n"])


def test_empty_file_and_missing_path(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "a.jsonl").write_bytes(GOOD[0] + b"\n")
    stats, log = run([tmp_path / "empty.jsonl", tmp_path / "a.jsonl"], tmp_path / "o", workers=1)
    assert f"{tmp_path / 'empty.jsonl'}: empty file" in log and stats.skipped == {"empty file": 1}
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        run([tmp_path / "empty.jsonl", tmp_path / "a.jsonl"], tmp_path / "o2", strict=True)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        run([tmp_path / "a.jsonl", tmp_path / "nope.jsonl"], tmp_path / "o3")
    with pytest.raises(DataError, match="no documents found"):
        run([tmp_path / "empty.jsonl"], tmp_path / "o4")
    assert not list(tmp_path.glob("o[234]*"))


def test_cli_help_and_one_line_errors(tmp_path):
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=True).stdout
    assert "--text-key" in out and "--strict" in out and "data/sample/austen.jsonl.gz" in out
    res = subprocess.run(
        [*CLI, str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        == f"neo-preprocess: error: {tmp_path / 'missing.jsonl'}: no such file or directory "
        "(for a Hugging Face hub dataset write hf:NAME)"
    )
    (tmp_path / "a.jsonl").write_bytes(GOOD[0] + b"\n" + BAD["not JSON"][0] + b"\n")
    res = subprocess.run(
        [*CLI, str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "x"), "--strict"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and f"error: {tmp_path / 'a.jsonl'}:2: not JSON" in res.stderr
    res = subprocess.run(
        [*CLI, str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert res.returncode == 0 and "skipped 1 bad inputs (1 not JSON)" in res.stdout


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_complete_looking_output(tmp_path, sig):
    """The input is a pipe that we keep open, so the run is surely mid-way when the signal lands."""
    out = tmp_path / "out" / "x"
    run([SAMPLE], out, workers=1)  # an older complete pair under the same name
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [*CLI, str(fifo), "-o", str(out), "--workers", "2"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open(fifo, "wb") as w:
            w.write(GOOD[0] + b"\n" * 1000)
            w.flush()
            deadline = time.time() + 60
            while not (tmp_path / "out" / "x.bin.tmp").exists() and time.time() < deadline:
                time.sleep(0.05)
            assert (tmp_path / "out" / "x.bin.tmp").exists()
            os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(DataError, match="no such file"):
        IndexedTokens(out)
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == (["x.bin.tmp", "x.idx.tmp"] if sig == signal.SIGKILL else [])  # SIGTERM cleans up
