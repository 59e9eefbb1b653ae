"""Text generation from a neo model: greedy and sampled decoding with a KV cache and batched prompts.

The loop is written for the plain (tp = 1, pp = 1) model that ``neo.checkpoint.tensors.load_model`` returns
for a checkpoint of any layout. Three choices shape it:

* **KV cache, preallocated.** Every layer's keys and values live in one buffer sized for the longest
  sequence the call can produce, and each step writes one position into it, so a new token costs one
  position of compute whatever the prefix length (a concatenated cache would copy the whole prefix per
  step). It holds the key/value heads only (grouped-query attention: n_heads / n_kv_heads times less
  than one per query head), and a sliding-window model keeps only its window, as a ring.
  ``use_cache=False`` recomputes the full prefix at every step; it exists as the reference the cache is
  tested against and as the benchmark's baseline.
* **Left padding.** Prompts of different lengths are padded on the left so that every row's next token
  sits in the same column. Each row's positions start at 0 at its first real token and padded keys are
  masked out, so a row's logits do not depend on what it is batched with (batched == one by one).
* **Only real token ids are sampled.** The model's logits cover the vocabulary padded to a multiple of
  128; ids at or above ``tokenizer.vocab_size`` are not tokens and are cut off before any sampling.

The sampling settings and logits filters are in neo/sampling.py; they follow transformers' ``generate``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from neo.errors import GenerationError
from neo.model.layers import Context, KVCache
from neo.sampling import SamplingParams, next_tokens


@dataclass
class Generation:
    """One prompt's result. ``tokens`` are the generated ids (without the end-of-document token)."""

    text: str
    tokens: list[int]
    finish_reason: str  # "eod" | "stop" | "length"
    prompt_tokens: int
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- batching helpers


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [b, P] padded on the left with ``pad_id``, and valid [b, P] (True at real tokens)."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[i, width - len(p) :] = True
    return tokens.to(device), valid.to(device)


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 at each row's first real token (pads get 0: they are never attended)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask(valid: torch.Tensor, queries: int) -> torch.Tensor:
    """[b, 1, queries, total] bool mask for the last ``queries`` positions of ``valid`` [b, total].

    Causal, and padded keys are hidden. A padded query also sees itself: a row of the mask with no
    True gives NaN in some attention kernels (torch's CPU kernels return 0), and a NaN would reach the
    real tokens through the cached keys of later layers (0 x NaN is NaN); attending to itself keeps the
    pad's (unused) values finite everywhere.
    """
    total = valid.shape[-1]
    causal = torch.ones(queries, total, dtype=torch.bool, device=valid.device).tril(total - queries)
    mask = causal & valid[:, None, None, :]
    diag = torch.zeros(queries, total, dtype=torch.bool, device=valid.device)
    diag[:, total - queries :] = torch.eye(queries, dtype=torch.bool, device=valid.device)
    return mask | (diag & ~valid[:, None, None, :])


def forward_last(model: torch.nn.Module, tokens: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Logits [b, V] of the last position only.

    The output head is by far the largest matmul at small model sizes (vocab x hidden per position),
    so a prompt of P tokens would otherwise spend P head projections to use one.
    """
    from neo.parallel.mappings import gather_from_region

    layers = model.layers
    x = tokens
    for layer in layers[:-1]:
        x = layer(x, ctx)
    # a tensor-parallel model (RL rollouts from the training policy) holds its slice of the vocabulary
    return gather_from_region(layers[-1](x[:, -1:], ctx)[:, -1], getattr(model, "tp_group", None))


# ------------------------------------------------------------------------------------------- generator


class _StopScanner:
    """Finds stop strings in a row's growing text by scanning only the bytes a new token could complete."""

    def __init__(self, token_bytes, stops: tuple[str, ...]):
        self.token_bytes = token_bytes
        self.stops = [s.encode("utf-8") for s in stops]
        self.longest = max((len(s) for s in self.stops), default=0)

    def cut(self, buf: bytearray, added: int) -> int | None:
        """Byte offset of the earliest stop string that ends within the last ``added`` bytes, or None."""
        if not self.stops:
            return None
        start = max(0, len(buf) - added - self.longest + 1)
        hits = [i for s in self.stops if (i := buf.find(s, start)) >= 0]
        return min(hits) if hits else None


class Generator:
    """Generates text with a loaded neo model and its tokenizer.

    Prompt + generated tokens may not exceed the position table of a model with learned or
    sinusoidal positions. Rotary models have no such table: they may run past their training length
    (quality falls off there; a warning says so), up to ``max_length`` when one is given.
    ``batch_size`` prompts are decoded together.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        max_length: int | None = None,
        batch_size: int = 8,
        preallocate: bool = True,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = model.args
        self.device = next(model.parameters()).device
        self.vocab_size = int(tokenizer.vocab_size)
        if self.vocab_size > self.args.vocab_size:
            raise GenerationError(
                f"tokenizer has {self.vocab_size} tokens, the model only {self.args.vocab_size}"
            )
        self.trained_length = self.args.max_positions
        hard = self.trained_length if self.args.position_embedding != "rotary" else None
        if hard is not None and max_length is not None and max_length > hard:
            raise GenerationError(f"max_length {max_length} exceeds the model's {hard} positions")
        self.max_length = max_length or hard
        self._warned = False
        self.batch_size = batch_size
        self.preallocate = (
            preallocate  # False: a concatenating KV cache (kept for the benchmark's comparison)
        )
        self.last_seed: int | None = None
        self.last_cache_bytes = 0  # KV cache of the last batch: key/value heads x positions held x layers
        self._bytes_cache: dict[int, bytes] = {}
        self.chat_template = None  # set from the checkpoint of a chat fine-tune (neo.data.chat.ChatTemplate)

    @classmethod
    def from_checkpoint(
        cls, path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        checksums: bool = True, **kwargs,
    ) -> Generator:  # fmt: skip
        """Load a checkpoint folder (or a checkpoint dir: its newest) saved with any tp/pp layout, after
        verifying its files (``checksums=False``: sizes only)."""
        from neo.checkpoint import load_model, resolve_run_or_checkpoint
        from neo.data.tokenizer import load_tokenizer

        path = resolve_run_or_checkpoint(path)
        model, _, meta = load_model(path, device=device, dtype=dtype, checksums=checksums)
        spec = meta.get("tokenizer_spec") or meta.get("tokenizer")
        if not spec:
            raise GenerationError(f"checkpoint {path} does not record its tokenizer")
        gen = cls(model, load_tokenizer(spec), **kwargs)
        if meta.get("chat_template"):
            from neo.data.chat import template_from_dict

            gen.chat_template = template_from_dict(meta["chat_template"])
        return gen

    # -- text in, text out

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's ids; an empty prompt starts from the end-of-document token (a fresh document)."""
        ids = self.tokenizer.encode(prompt)
        return ids if ids else [self.tokenizer.eod_id]

    def chat_prompt(self, prompt: str, system: str | None = None) -> list[int]:
        """A user turn (after an optional system one) rendered with the chat template the model was fine-tuned
        with, up to the assistant's header: the model answers from there."""
        if self.chat_template is None:
            raise GenerationError("this checkpoint records no chat template (it was not trained with objective "
                                  "sft). Fix: drop --chat, or give --chat-template NAME|FILE.")  # fmt: skip
        messages = [{"role": "system", "content": system}] if system else []
        return self.chat_template.render_prompt(
            [*messages, {"role": "user", "content": prompt}], self.tokenizer
        )

    def generate(
        self, prompts: list[str] | str, params: SamplingParams | None = None, *, use_cache: bool = True,
        chat: bool = False, system: str | None = None,
    ) -> list[Generation]:  # fmt: skip
        """One Generation per prompt, batched ``batch_size`` at a time (longest first, less padding). With
        ``chat``, each prompt is a user message in the model's chat template, and the template's end-of-turn
        text ends an answer."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if chat:
            from dataclasses import replace

            ids = [self.chat_prompt(p, system) for p in prompts]
            params = params or SamplingParams()
            params = replace(params, stop=tuple(dict.fromkeys([*params.stop, *self.chat_template.stop])))
        else:
            ids = [self.encode_prompt(p) for p in prompts]
        return self.generate_ids(ids, params, use_cache=use_cache)

    def generate_ids(
        self, prompts: list[list[int]], params: SamplingParams | None = None, *, use_cache: bool = True
    ) -> list[Generation]:
        """One Generation per prompt of token ids (the API under ``generate``, for callers that tokenize).

        One random generator, seeded once, serves all batches, so a seed reproduces the whole call.
        """
        params = params or SamplingParams()
        params.validate()
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise GenerationError("a prompt has no tokens; use [eod_id] to start a fresh document")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.last_seed = seed
        generator = torch.Generator(device=self.device).manual_seed(seed)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Generation | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            for i, g in zip(rows, self._batch([prompts[i] for i in rows], params, generator, use_cache)):
                results[i] = g
        return results  # type: ignore[return-value]

    # -- the decoding loop

    def _token_bytes(self, t: int) -> bytes:
        b = self._bytes_cache.get(t)
        if b is None:
            of = getattr(self.tokenizer, "token_bytes", None)  # tokenizers without it: text only
            b = of(t) if of is not None else self.tokenizer.decode([t]).encode("utf-8")
            self._bytes_cache[t] = b
        return b

    @torch.inference_mode()
    def _check_length(self, width: int, new: int) -> None:
        """Refuse what the model cannot place; warn once when rotary runs past its training length."""
        if self.max_length is not None and width + new > self.max_length:
            raise GenerationError(
                f"prompt of {width} tokens + max_new_tokens {new} exceeds the model's length "
                f"{self.max_length}; shorten the prompt or lower max_new_tokens"
            )
        if width + new > self.trained_length and not self._warned:
            self._warned = True
            print(
                f"neo: warning: prompt + max_new_tokens = {width + new} positions, the model was trained on "
                f"{self.trained_length}; text past that length may degrade",
                file=sys.stderr,
                flush=True,
            )

    def _seen_tokens(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] flags of the tokens each row's prompt holds (pads excluded): the repetition penalty's."""
        seen = torch.zeros((tokens.shape[0], self.vocab_size), dtype=torch.bool, device=self.device)
        rows, cols = valid.nonzero(as_tuple=True)
        seen[rows, tokens[rows, cols].clamp(max=self.vocab_size - 1)] = True
        return seen

    def _batch(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator, use_cache: bool
    ) -> list[Generation]:
        b, width = len(prompts), max(len(p) for p in prompts)
        new = params.max_new_tokens
        self._check_length(width, new)
        eod, device = self.tokenizer.eod_id, self.device
        tokens, valid = left_pad(prompts, eod, device)
        seen = self._seen_tokens(tokens, valid) if params.repetition_penalty != 1.0 else None
        # Room for every generated token; written column by column.
        seq = torch.cat([tokens, torch.full((b, new), eod, dtype=torch.long, device=device)], dim=1)
        steps = _Steps(
            self.model,
            seq,
            valid=torch.cat([valid, torch.ones((b, new), dtype=torch.bool, device=device)], dim=1),
            padded=not bool(valid.all()),
            cache=KVCache(max_length=width + new if self.preallocate else None) if use_cache else None,
        )
        rows = _Rows(
            b, self._token_bytes, _StopScanner(self._token_bytes, params.stop), eod, params.stop_at_eod
        )
        logits = steps.prefill(width)
        for step in range(new):
            nxt = next_tokens(logits[:, : self.vocab_size], params, generator, seen)
            if seen is not None:
                seen[torch.arange(b, device=device), nxt] = True
            steps.append(nxt)
            rows.add(nxt.tolist())
            if rows.done or step == new - 1:
                break
            logits = steps.next_logits()
        self.last_cache_bytes = steps.cache.nbytes() if steps.cache is not None else 0
        return rows.results(prompts)


class _Steps:
    """One batch's token columns and the forward passes over them: the prompt once, then one column per step
    with the KV cache (or the whole prefix again without it)."""

    def __init__(self, model, seq: torch.Tensor, valid: torch.Tensor, padded: bool, cache: KVCache | None):
        self.model, self.seq, self.valid, self.padded, self.cache = model, seq, valid, padded, cache
        self.positions = positions_of(valid)
        self.cur = 0

    def _mask(self, one_cached_query: bool) -> torch.Tensor | None:
        """Padded keys masked out: a causal mask over the prefix, or one query's row over the cache."""
        if not self.padded:
            return None
        if one_cached_query:
            return self.valid[:, None, None, : self.cur]
        return attention_mask(self.valid[:, : self.cur], self.cur)

    def prefill(self, width: int) -> torch.Tensor:
        """Last-position logits of the prompts (fills the cache)."""
        self.cur = width
        ctx = Context(positions=self.positions[:, :width], cache=self.cache, mask=self._mask(False))
        return forward_last(self.model, self.seq[:, :width], ctx)

    def append(self, nxt: torch.Tensor) -> None:
        self.seq[:, self.cur] = nxt
        self.cur += 1

    def next_logits(self) -> torch.Tensor:
        """Last-position logits after the newest column: one position with the cache, the prefix without."""
        first = self.cur - 1 if self.cache is not None else 0
        ctx = Context(positions=self.positions[:, first : self.cur], cache=self.cache,
                      mask=self._mask(self.cache is not None))  # fmt: skip
        return forward_last(self.model, self.seq[:, first : self.cur], ctx)


class _Rows:
    """Each row's generated tokens and text, and why it stopped (end of document, a stop string, or length)."""

    def __init__(self, b: int, token_bytes, scanner: _StopScanner, eod: int, stop_at_eod: bool):
        self.token_bytes, self.scanner, self.eod, self.stop_at_eod = token_bytes, scanner, eod, stop_at_eod
        self.texts = [bytearray() for _ in range(b)]
        self.out: list[list[int]] = [[] for _ in range(b)]
        self.reasons: list[str | None] = [None] * b
        self.cuts: list[int | None] = [None] * b

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def add(self, column: list[int]) -> None:
        for i, t in enumerate(column):
            if self.reasons[i] is not None:
                continue
            if t == self.eod and self.stop_at_eod:
                self.reasons[i] = "eod"
                continue
            self.out[i].append(t)
            piece = self.token_bytes(t)
            self.texts[i] += piece
            cut = self.scanner.cut(self.texts[i], len(piece))
            if cut is not None:
                self.reasons[i], self.cuts[i] = "stop", cut

    def results(self, prompts: list[list[int]]) -> list[Generation]:
        results = []
        for i, prompt in enumerate(prompts):
            raw = self.texts[i][: self.cuts[i]] if self.cuts[i] is not None else self.texts[i]
            text = bytes(raw).decode("utf-8", errors="replace")
            results.append(Generation(text=text, tokens=self.out[i], finish_reason=self.reasons[i] or "length",
                                      prompt_tokens=len(prompt)))  # fmt: skip
        return results


def generate_text(
    generator: Generator, prompts: list[str], params: SamplingParams, *, use_cache: bool = True, **chat
) -> tuple[list[Generation], float]:
    """Generate and time it; logs throughput on stderr (stdout is reserved for generated text). ``chat``:
    ``chat=True`` (and ``system=...``) to render prompts with the model's chat template."""
    t0 = time.perf_counter()
    results = generator.generate(prompts, params, use_cache=use_cache, **chat)
    dt = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in results)
    print(
        f"neo: {n} tokens in {dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s), seed {generator.last_seed}",
        file=sys.stderr,
        flush=True,
    )
    return results, dt
