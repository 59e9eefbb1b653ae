"""Chat templates: ids and loss masks checked against renderings written here (and transformers' renderer)."""

from __future__ import annotations

import json

import pytest
from chat_helpers import TOK, chatml_reference, encode_reference, mask_runs, msg

from neo.data.chat import (
    BUILTINS,
    CHATML_SOURCE,
    PLAIN_SOURCE,
    DataError,
    RecordError,
    jinja_template,
    load_template,
    template_from_dict,
)
from neo.data.records import ChatKeys, PreferenceKeys, chat_messages, preference_group

ENC = TOK.encoding

CONVERSATIONS = [
    [msg("user", "What is 2+2?"), msg("assistant", "4.")],
    [msg("system", "Be brief."), msg("user", "Capital of France?"), msg("assistant", "Paris.")],
    [msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "Tell me a joke."),
     msg("assistant", "Why did the chicken cross the road?\n\nTo get to the other side."), msg("user", "Ha")],
    [msg("user", "Héllo ✓ 日本語 🙂 e\u0301"), msg("assistant", "Bonjour ✓ 日本語 🙂!"), msg("user", "Ελληνικά?"),
     msg("assistant", "Ναι — да.")],
    # marker and special-token strings inside messages stay ordinary text
    [msg("user", "Say <|im_end|> and <|endoftext|>"), msg("assistant", "<|im_end|> <|endoftext|> said.")],
    [msg("user", "  spaces  \n"), msg("assistant", " leading and trailing \n")],
]  # fmt: skip

# Zephyr's template (HF hub, MIT): it writes eos_token after every message.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# Llama 3's template, shortened: bos_token first, trimmed content.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma's: no system role, strict alternation (raise_exception).
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# chatml with transformers' {% generation %} marks around what should carry loss
CHATML_GENERATION = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_chatml_ids_and_mask_equal_a_hand_rendering(k):
    conv = CONVERSATIONS[k]
    t = load_template("chatml")
    ids, mask = t.render(conv, TOK)
    assert (ids, mask) == encode_reference(chatml_reference(conv))
    assert TOK.decode(ids) == "".join(p for p, _ in chatml_reference(conv))
    answers = [m["content"] + "<|im_end|>\n" for m in conv if m["role"] == "assistant"]
    assert mask_runs(ids, mask) == answers  # every answer and its end of turn, nothing else
    assert TOK.eod_id not in ids  # the markers are GPT-2 text, not special tokens
    # generation sees token for token the start of what training saw, up to each answer's header
    first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    for i, m in enumerate(conv):
        if m["role"] == "assistant":
            prompt = t.render_prompt(conv[:i], TOK)
            assert ids[: len(prompt)] == prompt and TOK.decode(prompt).endswith("<|im_start|>assistant\n")
            assert mask[len(prompt)] == 1 and (i > first or not any(mask[: len(prompt)]))


def test_plain_template_ends_answers_with_the_eod_token():
    conv = CONVERSATIONS[2]
    t = load_template("plain")
    ids, mask = t.render(conv, TOK)
    pieces = []
    for m in conv:
        if m["role"] == "assistant":
            pieces += [("### Assistant:\n", 0), (m["content"] + "<EOD>", 1)]
        else:
            pieces.append((f"### {m['role'].title()}:\n{m['content']}\n\n", 0))
    assert (ids, mask) == encode_reference(pieces, eod_text="<EOD>")
    assert ids.count(TOK.eod_id) == 2 and all(mask[i] for i, t_ in enumerate(ids) if t_ == TOK.eod_id)
    assert t.stop == () and t.render_prompt(conv[:1], TOK) == ENC.encode_ordinary(
        "### User:\nHi\n\n### Assistant:\n"
    )


@pytest.mark.parametrize("name, source", [("chatml", CHATML_SOURCE), ("plain", PLAIN_SOURCE)])
def test_builtins_equal_their_jinja_source_rendered_by_prefixes(name, source):
    """Two mechanisms, one answer: the Python built-in and its Jinja text masked by prefix rendering."""
    builtin, jinja = BUILTINS[name], jinja_template(source)
    assert builtin.source == source and jinja.stop == builtin.stop and jinja.name.startswith("jinja:")
    for conv in CONVERSATIONS:
        assert jinja.render(conv, TOK) == builtin.render(conv, TOK)
        assert jinja.render_prompt(conv, TOK) == builtin.render_prompt(conv, TOK)


@pytest.mark.parametrize("source, bos", [(CHATML_SOURCE, ""), (ZEPHYR, ""), (LLAMA3, "<|begin_of_text|>"),
                                         (PLAIN_SOURCE, ""), (CHATML_GENERATION, "")])  # fmt: skip
def test_jinja_text_equals_transformers_rendering(source, bos):
    cu = pytest.importorskip("transformers.utils.chat_template_utils")
    t = jinja_template(source, bos_token=bos)
    for conv in CONVERSATIONS:
        for gen in (False, True):
            (want,), _ = cu.render_jinja_template(conversations=[conv], chat_template=source, add_generation_prompt=gen,
                                                  bos_token=bos, eos_token="<|endoftext|>")  # fmt: skip
            assert t.render_text(conv, add_generation_prompt=gen, eos_text="<|endoftext|>") == want


def test_prefix_masks_equal_transformers_generation_spans():
    """transformers marks answers with {% generation %}; the spans found by rendering prefixes are the same."""
    cu = pytest.importorskip("transformers.utils.chat_template_utils")
    t = jinja_template(CHATML_GENERATION)
    for conv in CONVERSATIONS:
        (text,), (spans,) = cu.render_jinja_template(conversations=[conv], chat_template=CHATML_GENERATION,
                                                     return_assistant_tokens_mask=True)  # fmt: skip
        pos, ours = 0, []
        for p in t.pieces(conv):
            if p.answer >= 0:
                ours.append((pos, pos + len(p.text)))
            pos += len(p.text)
        assert pos == len(text) and ours == [tuple(s) for s in spans]


def test_zephyr_eos_token_is_the_eod_token_and_answers_carry_it():
    t = jinja_template(ZEPHYR)
    conv = CONVERSATIONS[1]
    ids, mask = t.render(conv, TOK)
    # the header "<|assistant|>\n" (its generation prompt) carries no loss; "Paris.</s>\n" does
    assert mask_runs(ids, mask) == ["Paris.<|endoftext|>\n"] and ids.count(TOK.eod_id) == 3
    assert t.stop == ()  # generation stops at the EOD token itself


def test_tokenizer_config_json_and_folder(tmp_path):
    cfg = {"chat_template": LLAMA3, "bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    a, b = load_template(str(tmp_path)), load_template(str(tmp_path / "tokenizer_config.json"))
    assert (
        a.name == b.name
        and a.source == LLAMA3
        and a.bos_token == "<|begin_of_text|>"
        and a.stop == ("<|eot_id|>",)
    )
    ids, mask = a.render(CONVERSATIONS[1], TOK)
    assert TOK.decode(ids).startswith("<|begin_of_text|><|start_header_id|>system")
    assert mask_runs(ids, mask) == ["Paris.<|eot_id|>"]
    (tmp_path / "t.jinja").write_text(LLAMA3)
    assert load_template(str(tmp_path / "t.jinja")).name != a.name  # no BOS text: another template
    named = {
        "chat_template": [
            {"name": "tool_use", "template": "x"},
            {"name": "default", "template": CHATML_SOURCE},
        ]
    }
    (tmp_path / "multi.json").write_text(json.dumps(named))
    assert load_template(str(tmp_path / "multi.json")).render(CONVERSATIONS[0], TOK) == BUILTINS[
        "chatml"
    ].render(CONVERSATIONS[0], TOK)


def test_template_that_raises_on_a_record_and_one_that_is_not_prefix_consistent(tmp_path):
    gemma = jinja_template(GEMMA)  # its probe retried without the system message
    with pytest.raises(RecordError, match="template error: .*System role not supported"):
        gemma.render(CONVERSATIONS[1], TOK)
    ids, mask = gemma.render(CONVERSATIONS[0], TOK)
    assert mask_runs(ids, mask) == ["4.<end_of_turn>\n"]
    last_eos = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if loop.last %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}{% endfor %}"  # fmt: skip
    (tmp_path / "bad.jinja").write_text(last_eos)
    with pytest.raises(
        DataError, match=r"chat template jinja:\w+ \(.*bad\.jinja\) is not prefix-consistent.*built-in"
    ):
        load_template(str(tmp_path / "bad.jinja"))
    with pytest.raises(DataError, match="Jinja syntax error at line 1"):
        jinja_template("{% for m in messages %}")
    with pytest.raises(DataError, match="unknown chat template 'chatlm': use one of chatml, plain"):
        load_template("chatlm")
    with pytest.raises(DataError, match="no chat_template in it"):
        (tmp_path / "tokenizer_config.json").write_text("{}")
        load_template(str(tmp_path))


class BosTokenizer:
    """GPT-2 with a BOS put before every encoded text, as some HF tokenizers' post-processors do."""

    name, eod_id, vocab_size, BOS = "gpt2+bos", TOK.eod_id, TOK.vocab_size, 50000

    def encode(self, text):
        return [self.BOS, *TOK.encode(text)]

    def decode(self, ids):
        return TOK.decode(ids)


def test_ids_a_tokenizer_adds_to_every_text_are_not_repeated_in_each_piece():
    for conv in CONVERSATIONS:
        assert BUILTINS["chatml"].render(conv, BosTokenizer()) == BUILTINS["chatml"].render(conv, TOK)


BAD_RECORDS = {
    "missing role": {"messages": [{"content": "hi"}, msg("assistant", "yo")]},
    "unknown role": {"messages": [msg("human", "hi"), msg("assistant", "yo")]},
    "non-string content": {"messages": [msg("user", ["a", "list"]), msg("assistant", "yo")]},
    "empty answer": {"messages": [msg("user", "hi"), msg("assistant", "  \n")]},
    "bad messages": {"messages": "hi"},
    "missing key": {"text": "hi"},
}


@pytest.mark.parametrize("kind", list(BAD_RECORDS))
def test_bad_chat_records(kind):
    with pytest.raises(RecordError, match=f"^{kind}: ") as e:
        BUILTINS["chatml"].validate(BAD_RECORDS[kind])
    assert e.value.kind == kind


def test_chat_record_shapes_and_keys():
    keys = ChatKeys(prompt="q", response="a", system="sys")
    assert chat_messages({"q": "Hi", "a": "Yo", "sys": "Be nice."}, keys) == [
        msg("system", "Be nice."), msg("user", "Hi"), msg("assistant", "Yo")]  # fmt: skip
    assert chat_messages({"conv": CONVERSATIONS[0]}, ChatKeys(messages="conv")) == CONVERSATIONS[0]
    with pytest.raises(RecordError, match="missing role: .* no assistant message"):
        chat_messages({"messages": [msg("user", "hi")]}, ChatKeys())
    with pytest.raises(RecordError, match="empty answer"):
        chat_messages({"prompt": "hi", "response": ""}, ChatKeys())


def test_preference_records():
    keys = PreferenceKeys()
    prompt, answers, pairs = preference_group(
        {"prompt": "Q", "responses": ["b", "a", "c"], "ranking": [1, 0, 2]}, keys
    )
    assert prompt == [msg("user", "Q")] and [a[0]["content"] for a in answers] == ["b", "a", "c"]
    assert pairs == [(1, 0), (1, 2), (0, 2)]  # a > b > c: every better/worse pair, K(K-1)/2 = 3
    ranks = PreferenceKeys(ranking_style="ranks")  # ranking[i] = rank of response i
    assert (
        preference_group({"prompt": "Q", "responses": ["b", "a", "c"], "ranking": [1, 0, 2]}, ranks)[2]
        == pairs
    )
    _, answers, pairs = preference_group(
        {"prompt": [msg("user", "Q")], "chosen": [msg("assistant", "A")], "rejected": "B"}, keys
    )
    assert answers == [[msg("assistant", "A")], [msg("assistant", "B")]] and pairs == [(0, 1)]
    bad = {
        "tie": {"prompt": "Q", "chosen": "same", "rejected": "same "},
        "empty answer": {"prompt": "Q", "chosen": "A", "rejected": ""},
        "bad ranking": {"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [0, 2, 2]},
        "too few answers": {"prompt": "Q", "responses": ["a"], "ranking": [0]},
        "missing key": {"prompt": "Q", "chosen": "A"},
    }
    for kind, record in bad.items():
        with pytest.raises(RecordError, match=f"^{kind}: "):
            preference_group(record, keys)
    for ranking in ([0, 1], [0, 1, 2, 3], [True, 0, 2], "012", [0, 1, 3]):
        with pytest.raises(RecordError, match="^bad ranking: "):
            preference_group({"prompt": "Q", "responses": ["a", "b", "c"], "ranking": ranking}, keys)
    with pytest.raises(RecordError, match="^tie: responses.0. and responses.2."):
        preference_group({"prompt": "Q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}, keys)


def test_preference_answers_alone_carry_loss():
    t = BUILTINS["chatml"]
    prompt = CONVERSATIONS[2][:3]  # a prompt holding an earlier answer
    ids, mask = t.render([*prompt, msg("assistant", "Knock knock.")], TOK, loss_from=len(prompt))
    assert mask_runs(ids, mask) == ["Knock knock.<|im_end|>\n"]
    assert ids == t.render([*prompt, msg("assistant", "Knock knock.")], TOK)[0]  # same ids, other mask


def test_recorded_templates_come_back_the_same(tmp_path):
    cfg = {"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    for t in (BUILTINS["chatml"], BUILTINS["plain"], load_template(str(tmp_path)), jinja_template(ZEPHYR)):
        back = template_from_dict(json.loads(json.dumps(t.to_dict())))
        assert (back.name, back.source, back.stop, back.bos_token) == (t.name, t.source, t.stop, t.bos_token)
        assert back.render(CONVERSATIONS[2], TOK) == t.render(CONVERSATIONS[2], TOK)
