"""Preprocessing chat and preference records: tokens and masks, counts, line numbers, long records, no half
outputs; checked against renderings written by hand (chat_helpers)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from chat_helpers import chatml_reference, encode_reference, mask_runs, msg
from data_helpers import ROOT

from neo.cli.preprocess import main as cli_main
from neo.data.indexed import DataError, IndexedTokens
from neo.data.preprocess import preprocess
from neo.data.records import ChatKeys, ExampleJob, PreferenceKeys

CLI = [sys.executable, str(ROOT / "launch" / "preprocess.py")]
LONG = "word " * 120  # ~120 GPT-2 tokens

GOOD_CHAT = [
    {"messages": [msg("system", "Be brief."), msg("user", "2+2?"), msg("assistant", "4.")]},
    {"prompt": "Capital of France?", "response": "Paris.", "system": "Geography."},
    {"messages": [msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye"), msg("assistant", "Ciao ✓ 日本")]},
    {"messages": [msg("user", "Tell me more."), msg("assistant", LONG)]},  # overlong: truncated, answer kept
    {"messages": [msg("user", LONG), msg("assistant", "Late answer.")]},  # answer after the cut: dropped
]  # fmt: skip
BAD_CHAT = {  # kind: (line, what the warning says)
    "missing role": ({"messages": [{"content": "hi"}, msg("assistant", "yo")]}, 'messages[0] has no "role"'),
    "unknown role": ({"messages": [msg("robot", "hi"), msg("assistant", "yo")]}, "has role 'robot'"),
    "non-string content": (
        {"messages": [msg("user", "hi"), {"role": "assistant", "content": 5}]},
        "content 5",
    ),
    "empty answer": ({"prompt": "hi", "response": " "}, "'response' is empty"),
    "bad messages": ({"messages": []}, "non-empty list"),
    "missing key": ({"question": "hi"}, "no 'messages' key and no 'prompt'/'response' keys (keys: question)"),
}
SEQ = 96


def chat_file(tmp_path):
    """Good records on lines 1..5 (line 3 blank, so they are 1, 2, 4, 5, 6), then one bad record per kind,
    then a line that is not JSON."""
    lines = [json.dumps(r, ensure_ascii=False) for r in GOOD_CHAT]
    lines.insert(2, "")
    bad_lines = {}
    for kind, (record, _) in BAD_CHAT.items():
        lines.append(json.dumps(record))
        bad_lines[kind] = len(lines)
    lines.append("{oops")
    bad_lines["not JSON"] = len(lines)
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f, bad_lines


def run(inputs, out, job, **kw):
    log = io.StringIO()
    stats = preprocess([str(p) for p in inputs], str(out), log=log, examples=job, **kw)
    return stats, log.getvalue()


def docs(prefix):
    r = IndexedTokens(prefix)
    return [(r.doc(i).tolist(), r.doc_mask(i).tolist()) for i in range(len(r))]


def test_chat_masks_counts_and_warnings(tmp_path):
    f, bad_lines = chat_file(tmp_path)
    stats, log = run([f], tmp_path / "c2", ExampleJob("chat", seq_length=SEQ), workers=2)
    assert stats.skipped == {**dict.fromkeys(BAD_CHAT, 1), "not JSON": 1}
    for kind, (_, says) in BAD_CHAT.items():
        assert f"warning: {f}:{bad_lines[kind]}: {kind}: " in log and says in log
    assert (stats.truncated, stats.dropped, stats.docs) == (1, 1, 4)
    conversations = [
        GOOD_CHAT[0]["messages"],
        [msg("system", "Geography."), msg("user", "Capital of France?"), msg("assistant", "Paris.")],
        GOOD_CHAT[2]["messages"],
    ]
    want = [encode_reference(chatml_reference(c)) for c in conversations]
    ids, mask = encode_reference(chatml_reference(GOOD_CHAT[3]["messages"]))
    want.append((ids[: SEQ + 1], mask[: SEQ + 1]))  # truncated to one sample; its answer keeps its loss
    assert docs(tmp_path / "c2") == want
    r = IndexedTokens(tmp_path / "c2")
    assert (r.format, r.has_mask, r.chat_template["name"], r.meta["seq_length"]) == (
        "chat",
        True,
        "chatml",
        SEQ,
    )
    assert mask_runs(*want[2]) == ["Hello!<|im_end|>\n", "Ciao ✓ 日本<|im_end|>\n"]
    run(
        [f], tmp_path / "c1", ExampleJob("chat", seq_length=SEQ), workers=1
    )  # the output is worker-independent
    for ext in ("bin", "mask"):
        assert (tmp_path / f"c1.{ext}").read_bytes()[32:] == (tmp_path / f"c2.{ext}").read_bytes()[32:]


def test_long_records_drop_and_strict(tmp_path):
    f, bad_lines = chat_file(tmp_path)
    stats, _ = run([f], tmp_path / "d", ExampleJob("chat", seq_length=SEQ, long_records="drop"), workers=1)
    assert (stats.truncated, stats.dropped, stats.docs) == (0, 2, 3)
    assert all(len(ids) <= SEQ + 1 for ids, _ in docs(tmp_path / "d"))
    first = min(bad_lines.values())
    with pytest.raises(DataError, match=rf"^{f}:{first}: missing role: .*Fix: .*or drop --strict to skip it"):
        run([f], tmp_path / "s", ExampleJob("chat", seq_length=SEQ), workers=2, strict=True)
    assert not list(tmp_path.glob("s.*"))  # nothing published, temporaries removed


def test_custom_keys_and_jinja_template_from_tokenizer_config(tmp_path):
    src = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"  # fmt: skip
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": src}))
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"q": "Hi", "a": "Yo"}) + "\n")
    job = ExampleJob("chat", str(tmp_path / "tok"), chat_keys=ChatKeys(prompt="q", response="a"))
    run([f], tmp_path / "o", job, workers=1)
    ((ids, mask),) = docs(tmp_path / "o")
    assert (ids, mask) == encode_reference(
        [("user: Hi<EOD>assistant: ", 0), ("Yo<EOD>", 1)], eod_text="<EOD>"
    )
    assert IndexedTokens(tmp_path / "o").chat_template["source"] == src


def test_template_inconsistent_on_one_record_stops_with_its_line(tmp_path):
    """Consistent on the probe, not on a record whose earlier answer holds a reasoning block."""
    src = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
           "{% set c = c.split('</think>')[-1] %}{% endif %}{{ m['role'] + ': ' + c + '\n' }}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")  # fmt: skip
    (tmp_path / "t.jinja").write_text(src)
    convo = [msg("user", "a"), msg("assistant", "<think>x</think>b"), msg("user", "c"), msg("assistant", "d")]
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"messages": convo}) + "\n")
    with pytest.raises(
        DataError, match=rf"^{f}:2: chat template jinja:\w+ \(.*t\.jinja\) is not prefix-consistent"
    ):
        run([f], tmp_path / "o", ExampleJob("chat", str(tmp_path / "t.jinja")), workers=2)
    assert not list(tmp_path.glob("o.*"))


PREF = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": [msg("system", "Math."), msg("user", "3+3?")], "responses": ["7", "6", "six", "8"],
     "ranking": [1, 2, 0, 3]},
    {"prompt": "Q?", "chosen": [msg("assistant", "A ✓")], "rejected": [msg("assistant", "B")]},
    {"prompt": LONG, "chosen": "x", "rejected": "y"},  # answers after the cut: the group is dropped
]  # fmt: skip
BAD_PREF = {
    "tie": {"prompt": "Q", "chosen": "same", "rejected": "same"},
    "empty answer": {"prompt": "Q", "responses": ["a", ""], "ranking": [0, 1]},
    "bad ranking": {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, 1]},
    "too few answers": {"prompt": "Q", "responses": ["a"], "ranking": [0]},
    "missing key": {"prompt": "Q", "chosen": "a"},
}


def test_preference_documents_pairs_and_groups(tmp_path):
    lines = [json.dumps(r, ensure_ascii=False) for r in [*PREF, *BAD_PREF.values()]]
    f = tmp_path / "pref.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats, log = run([f], tmp_path / "p", ExampleJob("preference", seq_length=SEQ), workers=2)
    assert stats.skipped == dict.fromkeys(BAD_PREF, 1) and (stats.groups, stats.pairs, stats.dropped) == (
        3,
        8,
        1,
    )
    for n, kind in enumerate(BAD_PREF, len(PREF) + 1):
        assert f"warning: {f}:{n}: {kind}: " in log
    r = IndexedTokens(tmp_path / "p")
    assert r.format == "preference" and r.num_groups == 3 and r.group_docs.tolist() == [0, 2, 6, 8]
    prompts = [[msg("user", "2+2?")], PREF[1]["prompt"], [msg("user", "Q?")]]
    answers = [["4", "5"], ["7", "6", "six", "8"], ["A ✓", "B"]]
    d = 0
    for prompt, group in zip(prompts, answers):
        for a in group:
            want = encode_reference(
                [(t, 0) for t, _ in chatml_reference(prompt)] + chatml_reference([msg("assistant", a)])
            )
            assert (r.doc(d).tolist(), r.doc_mask(d).tolist()) == want
            d += 1
    # the ranking [1, 2, 0, 3] (best first: "6" > "six" > "7" > "8") expands to all 6 ordered pairs
    ranked = [(3, 4), (3, 2), (3, 5), (4, 2), (4, 5), (2, 5)]
    assert r.pairs.tolist() == [[0, 1, 0], *[[a, b, 1] for a, b in ranked], [6, 7, 2]]
    with pytest.raises(DataError, match=rf"^{f}:5: tie: chosen and rejected are the same answer"):
        run([f], tmp_path / "s", ExampleJob("preference", seq_length=SEQ), workers=1, strict=True)
    stats, _ = run([f], tmp_path / "k", ExampleJob("preference", preference_keys=PreferenceKeys(ranking_style="ranks")),
                   workers=1)  # fmt: skip
    assert IndexedTokens(tmp_path / "k").pairs[1:7, :2].tolist() == [
        [4, 2],
        [4, 3],
        [4, 5],
        [2, 3],
        [2, 5],
        [3, 5],
    ]


def test_sample_sets_preprocess_cleanly(tmp_path):
    chat, pref = ROOT / "data/sample/chat.jsonl", ROOT / "data/sample/preference.jsonl"
    s, _ = run([chat], tmp_path / "c", ExampleJob("chat", seq_length=128), workers=1, strict=True)
    assert (s.docs, s.truncated, s.dropped) == (320, 0, 0)
    s, _ = run([pref], tmp_path / "p", ExampleJob("preference", seq_length=128), workers=1, strict=True)
    assert (s.groups, s.pairs, s.docs) == (150, 400, 400)
    assert chat.stat().st_size < 300_000 and pref.stat().st_size < 300_000


@pytest.fixture
def keep_sigterm():
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_cli_summary_options_and_legacy_format(tmp_path, capsys, keep_sigterm):
    f, _ = chat_file(tmp_path)
    code = cli_main(
        [str(f), "-o", str(tmp_path / "c"), "--format", "chat", "--seq-length", str(SEQ), "-j", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "4 conversations" in out and "1 truncated, 1 dropped" in out and "wrote" in out
    assert "skipped 7 bad inputs (" in out and "1 missing role" in out and f"{tmp_path / 'c'}.mask" in out
    code = cli_main([str(f), "-o", str(tmp_path / "s"), "--format", "chat", "--strict", "-j", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"neo-preprocess: error: {f}:") and len(err.strip().splitlines()) == 1
    (tmp_path / "a.data").write_text("plain text, any file name\n")
    for legacy in (["--format", "text"], ["--format", "jsonl"]):  # old meanings of --format still work
        src = tmp_path / ("a.data" if legacy[1] == "text" else "b.data")
        if legacy[1] == "jsonl":
            src.write_text(json.dumps({"text": "json lines, any file name"}) + "\n")
        assert cli_main([str(src), "-o", str(tmp_path / legacy[1]), *legacy, "-j", "1"]) == 0
        assert IndexedTokens(tmp_path / legacy[1]).format == "text"
    code = cli_main([str(tmp_path / "a.data"), "-o", str(tmp_path / "x"), "--format", "chat"])
    assert code == 2 and "unknown input type '.data'; pass --input-type" in capsys.readouterr().err


def test_killed_chat_run_leaves_nothing_that_opens(tmp_path):
    out = tmp_path / "out" / "x"
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*CLI, str(fifo), "-o", str(out), "--format", "chat", "--workers", "2"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        with open(fifo, "wb") as w:
            w.write((json.dumps(GOOD_CHAT[0]) + "\n").encode() * 2000)
            w.flush()
            deadline = time.time() + 60
            while not (tmp_path / "out" / "x.mask.tmp").exists() and time.time() < deadline:
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with pytest.raises(DataError, match="no such file"):
        IndexedTokens(out)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.bin.tmp", "x.idx.tmp", "x.mask.tmp"]


def test_half_copied_or_mixed_sets_are_refused(tmp_path):
    f, _ = chat_file(tmp_path)
    for name in ("a", "b"):
        run([f], tmp_path / name, ExampleJob("chat", seq_length=SEQ), workers=1)
    os.replace(tmp_path / "b.mask", tmp_path / "a.mask")  # same content, another run
    with pytest.raises(DataError, match=r"a\.mask and .*a\.idx come from different preprocessing runs"):
        IndexedTokens(tmp_path / "a")
    os.remove(tmp_path / "a.mask")
    with pytest.raises(DataError, match=r"a\.mask: no such file, but .*a\.idx says there is one"):
        IndexedTokens(tmp_path / "a")
    run([f], tmp_path / "b", ExampleJob("chat", seq_length=SEQ), workers=1)
    os.truncate(tmp_path / "b.mask", os.path.getsize(tmp_path / "b.mask") - 1)
    with pytest.raises(DataError, match=r"b\.mask: .* bytes but its \.idx describes"):
        IndexedTokens(tmp_path / "b")


def test_many_chunks_and_workers_give_the_same_files(tmp_path, monkeypatch):
    """Comparison rows are numbered per chunk in the workers and offset in order by the main process."""
    from neo.data import sources

    pref = ROOT / "data/sample/preference.jsonl"
    run([pref], tmp_path / "one", ExampleJob("preference"), workers=1)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)  # ~100 chunks of 1-2 records
    run([pref], tmp_path / "many", ExampleJob("preference"), workers=2)
    for ext in ("bin", "mask", "pairs"):
        assert (tmp_path / f"one.{ext}").read_bytes()[32:] == (tmp_path / f"many.{ext}").read_bytes()[32:]
    assert IndexedTokens(tmp_path / "many").num_groups == 150
