"""Chat templates: a conversation becomes token ids plus a loss mask (1 on the tokens the model learns to write).

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``.

Built-in templates (``--chat-template NAME``; ``ChatTemplate.source`` holds each one's Jinja equivalent):

    chatml   every message:      <|im_start|>{role}\\n{content}<|im_end|>\\n
             generation prompt:  <|im_start|>assistant\\n        generation stops at the text <|im_end|>
    plain    system:    ### System:\\n{content}\\n\\n           user: ### User:\\n{content}\\n\\n
             assistant: ### Assistant:\\n{content}<EOD>    (<EOD>: the tokenizer's end-of-document token)
             generation prompt:  ### Assistant:\\n              generation stops at the EOD token

Other templates: a Jinja file, a ``tokenizer_config.json`` with a ``chat_template`` (or a folder holding one,
or a ``chat_template.jinja``), rendered with jinja2 the way transformers renders them: a sandbox with
trim_blocks and lstrip_blocks; ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``;
``raise_exception``, ``strftime_now``, loop controls and ``{% generation %}`` blocks.

**What carries loss**: each assistant message's content and the end-of-turn after it (chatml: the text
``<|im_end|>\\n``; plain: the EOD token; a Jinja template: whatever it writes after the content, up to the next
message), so the model learns to end its turn. Headers (``<|im_start|>assistant\\n``), system and user turns
do not, nor the first token of a conversation (nothing before it predicts it).

**End of turn** (the same in training and generation): chatml ends a turn with the *text* ``<|im_end|>`` and a
newline. For tiktoken tokenizers (GPT-2, cl100k...) ``<|im_start|>``/``<|im_end|>`` are not special tokens, so
they are ordinary text (GPT-2: several tokens each) that the model learns like any other; generation stops
when the reply's text contains a string of ``ChatTemplate.stop``. A Jinja template's ``eos_token`` is the
tokenizer's EOD token itself (one token, at which generation stops); its ``bos_token`` is the text that the
tokenizer_config.json names ("" otherwise). Message text is always ordinary text.

**How masks are found**: built-ins know where each message begins and ends. A Jinja template is rendered for
growing prefixes of the conversation: the text that messages[:i+1] adds to messages[:i] is message i's; for an
assistant message, the generation prompt rendered after messages[:i] is its header (no loss) and the rest its
answer (loss); a template with no generation prompt (Llama 2) gives its whole assistant turn loss, header
included. This needs a *prefix-consistent* template: rendering fewer messages gives the start of rendering more
(chatml, Llama 2 and 3, Mistral, Zephyr, Qwen 2 are). A template that rewrites earlier turns (e.g. drops the
reasoning of past answers) is refused with a message naming it: use a built-in or edit the template.

**Tokenization**: the rendered text is cut where each answer begins and ends; each piece is encoded on its
own (``Tokenizer.encode``, minus any BOS/EOS the tokenizer adds to every call), so no token straddles a loss
boundary and the masked tokens decode to exactly the answer text. ``render_prompt`` cuts at the same places,
so a prompt at generation is token for token the start of what the model was trained on. (Encoding the whole
text at once can differ at a cut: GPT-2 encodes the "." and "<" of "Paris.<|im_end|>" as one token.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

from neo.data.records import ROLES, ChatKeys, RecordError, chat_messages, check_messages
from neo.errors import DataError

EOS = "\x00<neo:eos>\x00"  # stands for the EOD token in rendered text; no real message contains it
ANSWER_PROBE = "neo-probe-answer"

CHATML_SOURCE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PLAIN_SOURCE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '### System:\\n' + message['content'] "
    "+ '\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class Piece:
    """A stretch of rendered text: ``answer`` is the index of the assistant message it answers, or -1."""

    text: str
    answer: int = -1


_AFFIXES: dict[int, tuple[object, tuple[int, int]]] = {}


def _affixes(tokenizer) -> tuple[int, int]:
    """How many ids ``encode`` puts before and after every text (a BOS, an EOS; (0, 0) for tiktoken)."""
    hit = _AFFIXES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    empty, one = tokenizer.encode(""), tokenizer.encode("a")
    head = 0
    while head < len(empty) and head < len(one) and empty[head] == one[head]:
        head += 1
    _AFFIXES[id(tokenizer)] = (tokenizer, (head, len(empty) - head))
    return head, len(empty) - head


def encode_text(text: str, tokenizer, affixes: tuple[int, int] = (0, 0)) -> list[int]:
    """Ordinary text -> ids, with each EOS placeholder as the tokenizer's EOD id."""
    head, tail = affixes
    ids: list[int] = []
    for k, part in enumerate(text.split(EOS)):
        if k:
            ids.append(tokenizer.eod_id)
        if part:
            got = tokenizer.encode(part)
            ids += got[head : len(got) - tail]
    return ids


def encode_pieces(pieces: Sequence[Piece], tokenizer, loss_from: int = 0) -> tuple[list[int], list[int]]:
    """Ids and loss mask: consecutive non-answer pieces are encoded together, each answer on its own; the
    tokens of answers to messages >= loss_from carry loss; never the first token."""
    affixes = _affixes(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    run: list[str] = []
    for p in [*pieces, Piece("", -2)]:  # a sentinel flushes the last run
        if p.answer == -1:
            run.append(p.text)
            continue
        if run:
            got = encode_text("".join(run), tokenizer, affixes)
            ids += got
            mask += [0] * len(got)
            run = []
        if p.answer >= 0:
            got = encode_text(p.text, tokenizer, affixes)
            ids += got
            mask += [int(p.answer >= loss_from)] * len(got)
    if mask:
        mask[0] = 0
    return ids, mask


# ------------------------------------------------------------------------------------------ templates


@dataclass
class ChatTemplate:
    """A chat template. ``name`` is stable (recorded in the data's .idx and, by training, in checkpoints);
    ``source`` is the template's Jinja text (so a checkpoint can carry it); ``stop`` the strings that end a
    reply at generation (besides the EOD token); ``bos_token`` the text a Jinja template gets for it."""

    name: str
    source: str
    stop: tuple[str, ...] = ()
    bos_token: str = ""

    def pieces(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[Piece]:
        """The rendered conversation, cut at the start and end of every answer."""
        raise NotImplementedError

    def render(self, messages: list[dict], tokenizer, *, loss_from: int = 0) -> tuple[list[int], list[int]]:
        """The whole conversation: (ids, loss_mask); assistant messages before index ``loss_from`` carry no
        loss (preference data: the prompt's earlier answers). Validates the messages first."""
        messages = check_messages(messages)
        return encode_pieces(self.pieces(messages), tokenizer, loss_from)

    def render_prompt(self, messages: list[dict], tokenizer) -> list[int]:
        """The conversation so far plus the generation prompt: what a model continues with its answer."""
        messages = check_messages(messages, need_answer=False)
        return encode_pieces(self.pieces(messages, add_generation_prompt=True), tokenizer)[0]

    def render_text(self, messages: list[dict], *, add_generation_prompt: bool = False,
                    eos_text: str = "<|endoftext|>") -> str:  # fmt: skip
        """The rendered text (to read, or compare with another renderer), the EOD token written as eos_text."""
        pieces = self.pieces(
            check_messages(messages, need_answer=False), add_generation_prompt=add_generation_prompt
        )
        return "".join(p.text for p in pieces).replace(EOS, eos_text)

    def validate(self, record: dict, keys=None) -> list[dict]:
        """A JSONL record (messages, or prompt/response; ``keys``: a records.ChatKeys) as checked messages."""
        return chat_messages(record, keys or ChatKeys())

    def to_dict(self) -> dict:
        """What the data and checkpoints record; ``template_from_dict`` makes the template again."""
        return {
            "name": self.name,
            "source": self.source,
            "stop": list(self.stop),
            "bos_token": self.bos_token,
        }


@dataclass
class BuiltinTemplate(ChatTemplate):
    """A template written in Python: per role a header (no loss) and a footer (with the content)."""

    headers: dict = field(default_factory=dict)  # role -> text before the content ({role} is filled in)
    footers: dict = field(default_factory=dict)  # role -> text after the content (EOS: the EOD token)
    generation: str = ""

    def pieces(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[Piece]:
        out = []
        for i, m in enumerate(messages):
            head = self.headers[m["role"]].format(role=m["role"])
            body = m["content"] + self.footers[m["role"]]
            out += [Piece(head), Piece(body, i)] if m["role"] == "assistant" else [Piece(head + body)]
        return out + [Piece(self.generation)] * add_generation_prompt


BUILTINS = {
    "chatml": BuiltinTemplate(
        "chatml", CHATML_SOURCE, ("<|im_end|>",), headers=dict.fromkeys(ROLES, "<|im_start|>{role}\n"),
        footers=dict.fromkeys(ROLES, "<|im_end|>\n"), generation="<|im_start|>assistant\n",
    ),
    "plain": BuiltinTemplate(
        "plain", PLAIN_SOURCE, (), headers={"system": "### System:\n", "user": "### User:\n",
        "assistant": "### Assistant:\n"}, footers={"system": "\n\n", "user": "\n\n", "assistant": EOS},
        generation="### Assistant:\n",
    ),
}  # fmt: skip


def _compile(source: str, name: str):
    """The template compiled as transformers compiles chat templates (sandboxed, same options and globals)."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError(f"chat template {name}: Jinja templates need jinja2: pip install jinja2") from None

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks answers for transformers; here it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"chat template {name}: Jinja syntax error at line {e.lineno}: {e.message}") from None


@dataclass
class JinjaTemplate(ChatTemplate):
    """A Jinja chat template; answers are found by rendering growing prefixes of the conversation."""

    origin: str = ""  # where it was read from, for messages

    @cached_property
    def _compiled(self):
        return _compile(self.source, self.name)

    def _text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=EOS, tools=None, documents=None)  # fmt: skip
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise RecordError("template error", f"chat template {self.name} refused it: {e}") from None

    def _follow(self, before: str, after: str, what: str) -> None:
        if not after.startswith(before):
            k = next(
                (i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after))
            )
            raise DataError(
                f"chat template {self.name} ({self.origin}) is not prefix-consistent: {what} does not start with "
                f"the rendering of the messages before it (they differ at character {k}: "
                f"{before[k : k + 30]!r} vs {after[k : k + 30]!r}). neo finds the answer tokens by rendering "
                "growing prefixes of each conversation, so it cannot mask this template. Fix: use a built-in "
                "template (--chat-template chatml) or edit the template so that earlier turns render the same "
                "whatever follows them"
            )

    def pieces(self, messages: list[dict], *, add_generation_prompt: bool = False) -> list[Piece]:
        out, prev = [], ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self._text(messages[:i], True)
                self._follow(prev, head, f"the generation prompt after message {i - 1}")
                out.append(Piece(head[len(prev) :]))  # the answer's header: no loss
                prev = head
            full = self._text(messages[: i + 1], False)
            self._follow(prev, full, f"the rendering up to message {i} ({m['role']})")
            piece = full[len(prev) :]
            if m["role"] == "assistant" and not piece:
                raise RecordError(
                    "template error", f"chat template {self.name} renders nothing for message {i}"
                )
            out.append(Piece(piece, i if m["role"] == "assistant" else -1))
            prev = full
        if add_generation_prompt:
            head = self._text(messages, True)
            self._follow(prev, head, "the generation prompt")
            out.append(Piece(head[len(prev) :]))
        return out

    def probe(self) -> None:
        """Render a small conversation now, so that a broken or inconsistent template fails before any data is
        read; and find the text that ends an answer, for ``stop``."""
        convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                 {"role": "assistant", "content": ANSWER_PROBE}]  # fmt: skip
        try:
            pieces = self.pieces(convo)
        except RecordError:  # e.g. "System role not supported": try without one
            try:
                pieces = self.pieces(convo[1:])
            except RecordError as e:
                raise DataError(f"{e.detail} (on a plain user/assistant conversation); check the template "
                                f"{self.origin}") from None  # fmt: skip
        answer = pieces[-1].text
        if not self.stop and ANSWER_PROBE in answer:
            end = answer.split(ANSWER_PROBE, 1)[1].split(EOS, 1)[0].strip()
            self.stop = (end,) if end else ()


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def jinja_template(source: str, *, bos_token: str = "", origin: str = "") -> JinjaTemplate:
    """A checked Jinja template; its name is ``jinja:`` + a hash of its text (and BOS), the same wherever
    the file lies."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"{origin or 'chat template'}: the template is empty")
    t = JinjaTemplate(f"jinja:{_sha(source + chr(0) + bos_token)}", source, (), bos_token, origin=origin)
    t.probe()
    return t


def _token_text(value) -> str:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else ""


def _from_config(path: Path) -> JinjaTemplate:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e})") from None
    source = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(source, list):  # several named templates: the "default" one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = path.parent / "chat_template.jinja"
    if not source and jinja_file.is_file():  # newer transformers save the template beside the config
        source = jinja_file.read_text(encoding="utf-8")
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"{path}: no chat_template in it; give a .jinja file or a built-in template "
                        f"({', '.join(BUILTINS)}) with --chat-template")  # fmt: skip
    return jinja_template(source, bos_token=_token_text(cfg.get("bos_token")), origin=str(path))


def load_template(spec: str) -> ChatTemplate:
    """``chatml`` | ``plain`` | a Jinja file | a tokenizer_config.json (or chat_template.json) with a
    ``chat_template`` | a folder holding one of those."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer_config.json", "chat_template.json", "chat_template.jinja"):
            if (path / name).is_file():
                return load_template(str(path / name))
        raise DataError(f"{path}: no tokenizer_config.json, chat_template.json or chat_template.jinja in this "
                        "folder; give the template file itself with --chat-template")  # fmt: skip
    if path.is_file():
        if path.suffix == ".json":
            return _from_config(path)
        try:
            return jinja_template(path.read_text(encoding="utf-8"), origin=str(path))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a UTF-8 text file (a Jinja chat template?)") from None
    raise DataError(f"unknown chat template {spec!r}: use one of {', '.join(BUILTINS)}, a .jinja file, a "
                    "tokenizer_config.json with a chat_template, or a folder holding one")  # fmt: skip


def template_from_dict(d: dict) -> ChatTemplate:
    """The template that ``ChatTemplate.to_dict`` (or a data file's header) recorded."""
    if d.get("name") in BUILTINS and d.get("source") == BUILTINS[d["name"]].source:
        return BUILTINS[d["name"]]
    return jinja_template(
        d["source"], bos_token=d.get("bos_token", ""), origin=f"recorded template {d.get('name')}"
    )
