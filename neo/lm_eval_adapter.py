"""lm-evaluation-harness (``lm_eval``) on a neo checkpoint.

``NeoLM`` implements lm_eval's three request types on the plain neo model, following the conventions of
lm_eval's own ``HFLM`` so that a neo checkpoint and its transformers export score the same:

* ``loglikelihood``: context and continuation are encoded together and split where the context ends
  (lm_eval's ``_encode_pair``); an empty context is the end-of-document token; inputs longer than the
  model are cut on the left. Returns (sum of log-probabilities, whether greedy decoding gives the
  continuation).
* ``loglikelihood_rolling``: the text in disjoint windows of ``max_length`` predictions, the first one
  conditioned on the end-of-document token (lm_eval's ``get_rolling_token_windows``).
* ``generate_until``: neo's generator (KV cache, batched left-padded prompts), greedy unless the task
  asks for sampling, cut at the first ``until`` string; the context keeps its last
  ``max_length - max_gen_toks`` tokens.

Importing this module registers the model as ``neo`` (``lm_eval --model neo --model_args
checkpoint=PATH`` from Python code that imported it); ``launch/evaluate.py --tasks`` does that for you.
lm_eval is an optional extra (``pip install neo[eval]``).
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
import torch.nn.functional as F

from neo.dtypes import default_device, torch_dtype

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("lm-eval is not installed: pip install 'lm-eval>=0.4.13' (the neo[eval] extra)") from e

from neo.generate import Generator, SamplingParams

# fp32 logits elements per forward (512 MiB): a 2k context x 50k vocab is 400 MiB a row. Scoring needs each
# position's log-probabilities, so here (unlike the loss) the logits are materialised.
LOGITS_BUDGET = 1 << 27


def rows_per_batch(batch_size: int, seq_length: int, vocab_size: int) -> int:
    """``batch_size``, lowered so one forward's fp32 logits stay within LOGITS_BUDGET (at least one row)."""
    return max(1, min(batch_size, LOGITS_BUDGET // max(1, seq_length * vocab_size)))


@register_model("neo")
class NeoLM(TemplateLM):
    """A neo checkpoint (any tp/pp layout) as an lm_eval language model, in one process."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        generator: Generator | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        **_ignored,
    ) -> None:
        super().__init__()
        if generator is None:
            if checkpoint is None:
                raise ValueError("NeoLM needs checkpoint=PATH (or a Generator)")
            device = device or default_device()
            dt = torch_dtype(dtype)
            generator = Generator.from_checkpoint(str(checkpoint), device=device, dtype=dt)
        self.gen = generator
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self._device = generator.device
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> a fixed size
        self.gen.batch_size = self.batch_size
        self._max_length = int(max_length or generator.args.max_positions)

    # -- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", "neo")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is False:  # a continuation: no BOS in front (Hugging Face tokenizers add one)
            return self.tokenizer.encode(string, add_special_tokens=False)
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    # -- scoring

    @torch.inference_mode()
    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) for (key, context ids, continuation ids) requests."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        step = rows_per_batch(self.batch_size, self.max_length, self.model.args.vocab_size)
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            seqs, conts = [], []
            for i in rows:
                _, ctx, cont = requests[i]
                if not ctx or not cont:
                    raise ValueError("loglikelihood request with an empty context or continuation")
                seqs.append((ctx + cont)[-(self.max_length + 1) :])
                conts.append(len(cont))
            width = max(len(s) - 1 for s in seqs)
            # Right padding: causal attention keeps each row's real positions blind to the pads after them.
            inputs = torch.zeros((len(rows), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                inputs[r, : len(s) - 1] = torch.tensor(s[:-1])
            logits = self.model(inputs.to(self._device)).float()
            logprobs = F.log_softmax(logits, dim=-1)
            for r, (i, s, n) in enumerate(zip(rows, seqs, conts)):
                end = len(s) - 1
                target = torch.tensor(s[-n:], device=self._device)
                lp = logprobs[r, end - n : end]
                answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        for key, idx in groups.items():
            params = self._params(json.loads(key))
            keep = max(1, self.max_length - params.max_new_tokens)
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in idx]
            for i, g in zip(idx, self.gen.generate_ids(prompts, params)):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out  # type: ignore[return-value]

    def _params(self, kwargs: dict) -> SamplingParams:
        """lm_eval's gen_kwargs (until, max_gen_toks, do_sample, temperature, top_k, top_p) as neo's."""
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
        return SamplingParams(
            max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
            temperature=temperature if do_sample else 0.0,
            greedy=not do_sample or temperature == 0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            seed=kwargs.get("seed", 1234),
            stop=tuple(u for u in until if u),
            stop_at_eod=True,
        )


def run_tasks(
    lm: NeoLM,
    tasks: list[str],
    *,
    include_path: list[str] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    **kwargs,
) -> dict:
    """lm_eval.simple_evaluate on ``lm``; ``include_path`` adds folders of local YAML tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks and not t.endswith((".yaml", ".yml"))]
    if unknown:
        raise ValueError(
            f"unknown lm_eval task(s) {', '.join(unknown)}; local YAML tasks need --include-path DIR"
        )
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=lm.batch_size,
        **kwargs,
    )
