"""Renderings written out by hand, to check chat templates, preprocessing and datasets against."""

from __future__ import annotations

from neo.data.tokenizer import load_tokenizer

TOK = load_tokenizer("gpt2")


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def chatml_reference(messages, generation_prompt=False):
    """chatml written out by hand: (text pieces, whether each carries loss)."""
    pieces = []
    for m in messages:
        if m["role"] == "assistant":
            pieces += [("<|im_start|>assistant\n", 0), (m["content"] + "<|im_end|>\n", 1)]
        else:
            pieces.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", 0))
    return pieces + [("<|im_start|>assistant\n", 0)] * generation_prompt


def encode_reference(pieces, eod_text=None):
    """The documented rule, independently: non-answer text between answers is encoded as one piece, each
    answer on its own, with GPT-2's encode_ordinary; eod_text (if given) is the EOD token."""
    ids, mask, run = [], [], ""
    for text, loss in [*pieces, ("", 2)]:
        if loss == 0:
            run += text
            continue
        for chunk, flag in ((run, 0), (text, loss == 1)):
            parts = chunk.split(eod_text) if eod_text else [chunk]
            for k, part in enumerate(parts):
                got = ([TOK.eod_id] if k else []) + TOK.encoding.encode_ordinary(part)
                ids += got
                mask += [int(flag)] * len(got)
        run = ""
    mask[0] = 0
    return ids, mask


def mask_runs(ids, mask):
    """The decoded text of each maximal run of loss tokens."""
    runs, cur = [], []
    for t, m in zip([*ids, 0], [*mask, 0]):
        if m:
            cur.append(t)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    return runs
