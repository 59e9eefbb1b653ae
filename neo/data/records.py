"""Instruction and preference records (one JSON object per line) -> checked conversations -> token examples.

Chat records, in two shapes (every key name can be changed, see ``ChatKeys``):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..."}        (system optional; prompt and response may
                                                                  also be lists of messages)

Preference records, in two shapes (``PreferenceKeys``); the prompt and each answer are text or a messages list:

    {"prompt": P, "chosen": A, "rejected": B}                     one comparison: A is preferred to B
    {"prompt": P, "responses": [A0, A1, ...], "ranking": [...]}   K answers ranked; expands to the K(K-1)/2
                                                                  comparisons of every better/worse pair
                                                                  (InstructGPT)

``ranking`` lists the indices of the responses best first ([2, 0, 1]: A2 > A0 > A1); with
``--ranking-style ranks`` it gives each response's rank instead (0 = best: [1, 2, 0] says the same).

A text prompt is one user message; a text answer one assistant message. Bad records raise ``RecordError``
with a kind that preprocessing counts: "missing key", "bad messages", "missing role", "unknown role",
"non-string content", "empty answer", "template error", and for preferences "tie" (two answers with the
same text), "too few answers" (K < 2) and "bad ranking" (not a permutation of 0..K-1, or not K long).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from neo.errors import DataError

ROLES = ("system", "user", "assistant")


class RecordError(DataError):
    """A record that cannot become a training example; ``kind`` names the problem for the counts."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail

    def __reduce__(self):
        return RecordError, (self.kind, self.detail)


def check_messages(messages, *, need_answer: bool = True, where: str = "messages") -> list[dict]:
    """Messages as ``[{"role", "content"}]`` (other keys dropped), or RecordError naming the first problem.

    Bad: not a non-empty list of objects; a message without "role" ("missing role"); a role other than
    system/user/assistant ("unknown role"); content that is missing or not a string ("non-string content");
    an assistant message with empty content ("empty answer"); with ``need_answer``, no assistant message.
    """
    if not isinstance(messages, list) or not messages:
        raise RecordError(
            "bad messages", f"{where} must be a non-empty list of messages, got {_short(messages)}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RecordError(
                "bad messages", f"{where}[{i}] is {_short(m)}, not an object with role and content"
            )
        if "role" not in m:
            raise RecordError("missing role", f'{where}[{i}] has no "role" (keys: {", ".join(map(str, m))})')
        if m["role"] not in ROLES:
            raise RecordError(
                "unknown role", f"{where}[{i}] has role {_short(m['role'])}; roles are {', '.join(ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            what = "no content" if "content" not in m else f"content {_short(m['content'])}"
            raise RecordError("non-string content", f"{where}[{i}] ({m['role']}) has {what}, not a string")
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordError("empty answer", f"{where}[{i}] is an assistant message with no text")
        out.append({"role": m["role"], "content": m["content"]})
    if need_answer and not any(m["role"] == "assistant" for m in out):
        raise RecordError("missing role", f"{where} has no assistant message: nothing to learn")
    return out


def _short(x) -> str:
    text = json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class ChatKeys:
    """The JSON keys of chat records."""

    messages: str = "messages"
    prompt: str = "prompt"
    response: str = "response"
    system: str = "system"


@dataclass(frozen=True)
class PreferenceKeys:
    """The JSON keys of preference records, and what ``ranking`` means ("order" or "ranks")."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    responses: str = "responses"
    ranking: str = "ranking"
    system: str = "system"
    ranking_style: str = "order"


def _keys_of(record: dict) -> str:
    return ", ".join(list(map(str, record))[:8]) or "none"


def _prompt(record: dict, key: str, system_key: str) -> list[dict]:
    """The prompt's messages: text is one user message; the record's system text, if any, goes first."""
    if key not in record:
        raise RecordError("missing key", f"no {key!r} key (keys: {_keys_of(record)})")
    value = record[key]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        messages = check_messages(value, need_answer=False, where=key)
    else:
        raise RecordError(
            "non-string content", f"{key!r} is {type(value).__name__}, not text or a messages list"
        )
    system = record.get(system_key)
    if system is not None:
        if not isinstance(system, str):
            raise RecordError("non-string content", f"{system_key!r} is {type(system).__name__}, not text")
        if system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _answer(value, where: str) -> list[dict]:
    """An answer's messages: text is one assistant message; a list must hold an assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise RecordError("empty answer", f"{where!r} is empty")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return check_messages(value, where=where)
    raise RecordError(
        "non-string content", f"{where!r} is {type(value).__name__}, not text or a messages list"
    )


def chat_messages(record: dict, keys: ChatKeys) -> list[dict]:
    """A chat record as checked messages, or RecordError."""
    if keys.messages in record:
        return check_messages(record[keys.messages], where=keys.messages)
    if keys.prompt in record or keys.response in record:
        if keys.response not in record:
            raise RecordError("missing key", f"no {keys.response!r} key (keys: {_keys_of(record)})")
        messages = _prompt(record, keys.prompt, keys.system) + _answer(record[keys.response], keys.response)
        return check_messages(messages)
    raise RecordError("missing key", f"no {keys.messages!r} key and no {keys.prompt!r}/{keys.response!r} keys "
                                     f"(keys: {_keys_of(record)})")  # fmt: skip


def _ranking_order(record: dict, keys: PreferenceKeys, k: int) -> list[int]:
    """Response indices best first, from the record's ranking."""
    if keys.ranking not in record:
        raise RecordError("missing key", f"no {keys.ranking!r} key (keys: {_keys_of(record)})")
    ranking = record[keys.ranking]
    if not isinstance(ranking, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in ranking
    ):
        raise RecordError(
            "bad ranking", f"{keys.ranking!r} must be a list of integers, got {ranking!r}"[:200]
        )
    if len(ranking) != k:
        raise RecordError("bad ranking", f"{keys.ranking!r} has {len(ranking)} entries for {k} responses")
    if sorted(ranking) != list(range(k)):
        raise RecordError("bad ranking", f"{keys.ranking!r} {ranking} is not a permutation of 0..{k - 1}")
    return ranking if keys.ranking_style == "order" else [int(i) for i in np.argsort(ranking)]


def preference_group(record: dict, keys: PreferenceKeys) -> tuple[list[dict], list[list[dict]], list[tuple]]:
    """(prompt messages, answers as message lists, comparisons (better, worse) as answer indices)."""
    prompt = _prompt(record, keys.prompt, keys.system)
    if keys.responses in record:
        responses = record[keys.responses]
        if not isinstance(responses, list):
            raise RecordError("bad messages", f"{keys.responses!r} must be a list of answers")
        if len(responses) < 2:
            raise RecordError("too few answers", f"{keys.responses!r} holds {len(responses)} answer(s); a "
                                                 "ranking needs at least 2")  # fmt: skip
        answers = [_answer(r, f"{keys.responses}[{i}]") for i, r in enumerate(responses)]
        order = _ranking_order(record, keys, len(answers))
        pairs = [(order[a], order[b]) for a in range(len(order)) for b in range(a + 1, len(order))]
        names = [f"{keys.responses}[{i}]" for i in range(len(answers))]
    else:
        for key in (keys.chosen, keys.rejected):
            if key not in record:
                raise RecordError("missing key", f"no {key!r} key (keys: {_keys_of(record)})")
        answers = [_answer(record[keys.chosen], keys.chosen), _answer(record[keys.rejected], keys.rejected)]
        pairs, names = [(0, 1)], [keys.chosen, keys.rejected]
    seen: dict = {}
    for i, a in enumerate(answers):
        text = tuple((m["role"], m["content"].strip()) for m in a)
        if text in seen:
            raise RecordError("tie", f"{names[seen[text]]} and {names[i]} are the same answer; a comparison needs "
                                     "two different ones")  # fmt: skip
        seen[text] = i
    return prompt, answers, pairs


# --------------------------------------------------------------------------------- records -> tokens


@dataclass(frozen=True)
class ExampleJob:
    """How preprocessing turns records into examples (sent to each worker process)."""

    data_format: str  # "chat" | "preference"
    template: str = "chatml"  # a load_template spec
    seq_length: int = 2048
    long_records: str = "truncate"  # "truncate" | "drop"
    chat_keys: ChatKeys = field(default_factory=ChatKeys)
    preference_keys: PreferenceKeys = field(default_factory=PreferenceKeys)


@dataclass
class Encoded:
    """One chunk's examples: documents back to back with their masks; for preferences, comparisons as rows
    (chosen, rejected, group) numbered within the chunk."""

    tokens: list = field(default_factory=list)
    mask: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    pairs: list = field(default_factory=list)
    groups: int = 0
    truncated: int = 0
    dropped: int = 0
    problems: list = field(default_factory=list)  # [(line, kind, detail)]


def _fit(ids: list, mask: list, job: ExampleJob) -> tuple[list, list] | None:
    """A document cut to seq_length + 1 tokens (one training sample), or None when it must be dropped: too
    long under --long-records drop, or no answer token left after the cut."""
    limit = job.seq_length + 1
    if len(ids) > limit:
        if job.long_records == "drop":
            return None
        ids, mask = ids[:limit], mask[:limit]
    return (ids, mask) if any(mask) else None


def encode_records(records: list[tuple[int, dict]], job: ExampleJob, tokenizer, template,
                   out: Encoded) -> None:  # fmt: skip
    """Append the examples of ``records`` ((line number, JSON object)) to ``out``, rendered with ``template``
    (a chat.ChatTemplate); bad ones become problems."""
    limit = job.seq_length + 1
    for n, record in records:
        try:
            if job.data_format == "chat":
                docs = [template.render(chat_messages(record, job.chat_keys), tokenizer)]
                pairs: list[tuple] = []
            else:
                prompt, answers, pairs = preference_group(record, job.preference_keys)
                docs = [template.render(prompt + a, tokenizer, loss_from=len(prompt)) for a in answers]
        except RecordError as e:
            out.problems.append((n, e.kind, e.detail))
            continue
        fitted = [_fit(ids, mask, job) for ids, mask in docs]
        if any(f is None for f in fitted):
            out.dropped += 1
            continue
        out.truncated += any(len(ids) > limit for ids, _ in docs)
        base = len(out.lengths)
        for ids, mask in fitted:
            out.tokens += ids
            out.mask += mask
            out.lengths.append(len(ids))
        out.pairs += [(base + a, base + b, out.groups) for a, b in pairs]
        out.groups += bool(pairs)
