"""Generation: the KV cache, left padding and the sampling filters, checked against independent references.

References: recomputing the whole prefix at every step (no cache), one prompt at a time (no padding),
transformers' ``GPTNeoXForCausalLM.generate`` on the same weights, and hand-made logits whose filtered
sets are known. Models: a trained tiny checkpoint (made once through the real launchers), and randomly
initialised models with a large init std, whose logits have wide gaps (greedy choices that do not
hinge on rounding) and whose greedy text does not collapse into one repeated token.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import clean_env

from neo.data.tokenizer import load_tokenizer
from neo.generate import (
    GenerationError,
    Generator,
    SamplingParams,
    forward_last,
    left_pad,
    positions_of,
)
from neo.model.args import ModelArgs
from neo.model.gpt import GPT
from neo.model.layers import Context, KVCache
from neo.sampling import apply_repetition_penalty, filter_top_k, filter_top_p

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "It is a truth universally acknowledged, that a single man",
    "Emma",
    "Mr. Darcy said that she was very",
    "The",
]
GREEDY = SamplingParams(max_new_tokens=24, greedy=True, stop_at_eod=False)


def _env() -> dict:
    return clean_env(OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def trained(checkpoint) -> Generator:
    return Generator.from_checkpoint(str(checkpoint))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def random_model(dtype=torch.float32, **kw) -> GPT:
    args = dict(
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        seq_length=128,
        vocab_size=50304,
        init_method="normal",
        init_std=0.3,
    )
    args.update(kw)
    return GPT(ModelArgs(**args), seed=3).eval().to(dtype)


@pytest.fixture(scope="module")
def rand(tokenizer) -> Generator:
    return Generator(random_model(), tokenizer)


# ------------------------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("which", ["rand", "trained"])
def test_cached_generation_equals_full_recompute(request, which):
    """Greedy, and sampled with one seed (the same random draws meet the same logits): a 20-step model's
    greedy text is mostly repeats, its samples are not."""
    gen = request.getfixturevalue(which)
    sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, seed=11, stop_at_eod=False)
    for params in (GREEDY, sampled):
        cached = gen.generate(PROMPTS, params)
        full = gen.generate(PROMPTS, params, use_cache=False)
        assert [r.tokens for r in cached] == [r.tokens for r in full]
        assert all(len(r.tokens) == params.max_new_tokens for r in cached)
    assert len({tuple(r.tokens) for r in cached}) == len(PROMPTS)  # not a degenerate constant output
    assert len({t for r in cached for t in r.tokens}) > 20


@pytest.mark.parametrize("preallocated", [True, False])
def test_cached_logits_equal_full_forward(tokenizer, preallocated):
    """Feeding tokens one at a time through the cache reproduces the full forward's logits at every position,
    for the preallocated cache and the concatenating one."""
    model = random_model()
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(max_length=ids.shape[1] if preallocated else None)
        steps = [forward_last(model, ids[:, :5], Context(positions=torch.arange(5)[None], cache=cache))]
        for t in range(5, ids.shape[1]):
            steps.append(
                forward_last(model, ids[:, t : t + 1], Context(positions=torch.tensor([[t]]), cache=cache))
            )
    assert cache.length == ids.shape[1]
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, full[:, 4:], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------- batching / padding


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_batched_equals_one_by_one(tokenizer, use_cache, positions):
    """Rotary scores depend only on position differences; learned positions also catch a wrong offset.
    With a repetition penalty, the pads must not count as seen tokens."""
    gen = Generator(random_model(position_embedding=positions), tokenizer)
    prompts = [*PROMPTS, ""]
    for params in (GREEDY, dataclasses.replace(GREEDY, repetition_penalty=1.5)):
        batched = gen.generate(prompts, params, use_cache=use_cache)
        single = [gen.generate([p], params, use_cache=use_cache)[0] for p in prompts]
        assert [r.tokens for r in batched] == [r.tokens for r in single]
        assert [r.text for r in batched] == [r.text for r in single]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_left_padded_logits_equal_unpadded(tokenizer, positions):
    """Positions restart at each row's first real token and pads are masked: a row's logits do not depend on
    the longer prompts it is batched with (fp32, ~1e-6)."""
    from neo.generate import attention_mask

    model = random_model(position_embedding=positions)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    tokens, valid = left_pad(prompts, tokenizer.eod_id)
    assert positions_of(valid)[1].tolist()[-len(prompts[1]) :] == list(range(len(prompts[1])))
    with torch.no_grad():
        batched = forward_last(
            model, tokens, Context(positions=positions_of(valid), mask=attention_mask(valid, tokens.shape[1]))
        )
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0, -1]
            torch.testing.assert_close(batched[i], alone, rtol=0, atol=2e-5)
    assert torch.isfinite(batched).all()


def test_attention_mask_hides_pads_and_the_future():
    from neo.generate import attention_mask

    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    m = attention_mask(valid, 4)[:, 0]
    assert m[0].tolist() == [
        [True, False, False, False],
        [False, True, False, False],  # pads: themselves only
        [False, False, True, False],
        [False, False, True, True],
    ]
    assert m[1].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    assert attention_mask(valid, 1)[:, 0, 0].tolist() == [[False, False, True, True], [True] * 4]


# ------------------------------------------------------------------------------------ transformers parity


def _hf_greedy(model: GPT, state: dict, prompts: list[list[int]], new: int, vocab: int, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    from neo.export.hf import hf_config, load_into_hf

    hf = transformers.GPTNeoXForCausalLM(hf_config(model.args)).eval()
    load_into_hf(hf, state, model.args)
    hf = hf.to(dtype)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        res = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            suppress_tokens=list(range(vocab, model.args.vocab_size)),
        )
        out.append(res[0, len(p) :].tolist())
    return out


def test_greedy_equals_transformers_on_the_trained_checkpoint(trained, checkpoint):
    from neo.checkpoint import load_full_weights

    state, _ = load_full_weights(str(checkpoint))
    prompts = [trained.encode_prompt(p) for p in PROMPTS]
    ours = [r.tokens for r in trained.generate_ids(prompts, GREEDY)]
    assert ours == _hf_greedy(trained.model, state, prompts, GREEDY.max_new_tokens, trained.vocab_size)


def test_greedy_equals_transformers_on_a_random_model(rand):
    prompts = [rand.encode_prompt(p) for p in PROMPTS]
    ours = [r.tokens for r in rand.generate_ids(prompts, GREEDY)]
    assert ours == _hf_greedy(
        rand.model, rand.model.state_dict(), prompts, GREEDY.max_new_tokens, rand.vocab_size
    )


# --------------------------------------------------------------------------------------------- sampling


def test_top_k_one_equals_greedy(rand):
    sampled = rand.generate(
        PROMPTS, SamplingParams(max_new_tokens=24, temperature=1.7, top_k=1, seed=5, stop_at_eod=False)
    )
    assert [r.tokens for r in sampled] == [r.tokens for r in rand.generate(PROMPTS, GREEDY)]


def test_same_seed_same_sample(rand):
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=123, stop_at_eod=False)
    a, b = rand.generate(PROMPTS, params), rand.generate(PROMPTS, params)
    c = rand.generate(PROMPTS, dataclasses.replace(params, seed=124))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]
    assert [r.tokens for r in a] != [r.tokens for r in rand.generate(PROMPTS, GREEDY)]


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 2.5, -5.0]])
    assert kept(filter_top_k(logits, 1)[0]) == {1}
    assert kept(filter_top_k(logits, 3)[0]) == {1, 3, 4}
    assert kept(filter_top_k(logits, 0)[0]) == set(range(6))  # off
    assert kept(filter_top_k(logits, 99)[0]) == set(range(6))
    assert torch.equal(filter_top_k(logits, 3)[0, [1, 3, 4]], logits[0, [1, 3, 4]])  # survivors unchanged


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()[None].repeat(2, 1)
    logits[1] = logits[1].flip(0)  # the second row holds the same values in another order
    cases = {
        0.3: {1},
        0.49: {1},
        0.51: {1, 3},
        0.75: {1, 3},
        0.81: {1, 3, 2},
        0.94: {1, 3, 2},
        0.96: {0, 1, 2, 3},
        1.0: {0, 1, 2, 3},
    }
    for p, want in cases.items():
        out = filter_top_p(logits, p)
        assert kept(out[0]) == want, p
        assert kept(out[1]) == {3 - i for i in want}, p
    # top-k then top-p, as transformers orders them: p applies to the renormalised survivors of k
    assert kept(filter_top_p(filter_top_k(logits[:1], 2), 0.6)[0]) == {1}
    assert kept(filter_top_p(filter_top_k(logits[:1], 2), 0.7)[0]) == {1, 3}


def test_repetition_penalty_as_transformers():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    transformers = pytest.importorskip("transformers")
    ref = transformers.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), ref)


def test_sampled_distribution_follows_the_filtered_probabilities(tokenizer):
    """With top-k 2 at temperature 1, token frequencies over many draws match the renormalised softmax."""
    from neo.sampling import next_tokens

    logits = torch.tensor([[1.0, 2.0, 0.0, 1.5]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = next_tokens(logits, SamplingParams(top_k=2), gen)
    p1 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.5))
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - p1) < 0.03


def test_padded_vocabulary_is_never_sampled(tokenizer):
    """The head rows past the tokenizer's vocabulary are made to dominate; no generated id reaches them."""
    model = random_model()
    with torch.no_grad():
        head = model.layers[-1].embed_out.weight
        head[tokenizer.vocab_size :] = head[: tokenizer.vocab_size].mean(0) * 0 + 50.0
    gen = Generator(model, tokenizer)
    for params in (GREEDY, SamplingParams(max_new_tokens=24, seed=0, stop_at_eod=False)):
        for r in gen.generate(PROMPTS, params):
            assert r.tokens and max(r.tokens) < tokenizer.vocab_size


def test_repetition_penalty_reduces_repeats(trained):
    plain = trained.generate(PROMPTS, GREEDY)
    penalised = trained.generate(PROMPTS, dataclasses.replace(GREEDY, repetition_penalty=1.8))
    repeats = [len(r.tokens) - len(set(r.tokens)) for r in plain]
    assert sum(len(r.tokens) - len(set(r.tokens)) for r in penalised) < sum(repeats)


# ---------------------------------------------------------------------------------------------- stopping


def test_stop_strings_cut_the_text(rand):
    full = rand.generate(PROMPTS[0], GREEDY)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = rand.generate(PROMPTS[0], dataclasses.replace(GREEDY, stop=("never appears", stop)))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert full.text.startswith(cut.text) and len(cut.tokens) < len(full.tokens)
    assert full.finish_reason == "length"


def test_stop_at_end_of_document(rand, tokenizer):
    """The end-of-document id ends a row (without being returned); other rows of the batch go on."""
    full = rand.generate(PROMPTS, GREEDY)
    t = full[0].tokens[6]
    eod_gen = Generator(rand.model, dataclasses.replace(tokenizer, eod_id=t))
    out = eod_gen.generate(PROMPTS, dataclasses.replace(GREEDY, stop_at_eod=True))
    for r, f in zip(out, full):
        k = f.tokens.index(t) if t in f.tokens else None
        assert r.tokens == (f.tokens[:k] if k is not None else f.tokens)
        assert r.finish_reason == ("eod" if k is not None else "length")
    assert out[0].finish_reason == "eod" and len(out[0].tokens) <= 6


def test_empty_prompt_starts_a_fresh_document(rand, tokenizer):
    empty = rand.generate("", GREEDY)[0]
    assert empty.prompt_tokens == 1
    assert empty.tokens == rand.generate_ids([[tokenizer.eod_id]], GREEDY)[0].tokens


def test_bad_settings_are_refused(rand):
    for bad in (
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(temperature=-1.0),
        dict(max_new_tokens=0),
        dict(repetition_penalty=0.0),
        dict(stop=("",)),
    ):
        with pytest.raises(GenerationError):
            rand.generate("x", SamplingParams(**bad))
    with pytest.raises(GenerationError, match="exceeds"):
        Generator(random_model(position_embedding="learned"), rand.tokenizer).generate(
            "x", SamplingParams(max_new_tokens=200)
        )


# ------------------------------------------------------------------------------------------------- CLI


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "generate.py"), *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
        env=_env(),
        cwd=ROOT,
    )


def test_cli_prints_only_the_generated_text(checkpoint, trained):
    run_dir = checkpoint.parent  # the run's logging dir: its checkpoints/ is found
    proc = cli(str(run_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--greedy", "--ignore-eod")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == trained.generate(PROMPTS[0], GREEDY)[0].text + "\n"
    assert "tokens/s" in proc.stderr


def test_cli_prompt_file_gives_jsonl(checkpoint, trained, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    proc = cli(
        str(checkpoint),
        "--prompt-file",
        str(tmp_path / "prompts.txt"),
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--ignore-eod",
        "--batch-size",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["text"] for r in rows] == [g.text for g in trained.generate(PROMPTS, GREEDY)]
    assert all(r["finish_reason"] == "length" and r["tokens"] == 24 for r in rows)


def test_cli_interactive_answers_each_line(checkpoint, trained):
    proc = cli(
        str(checkpoint),
        "--interactive",
        "--max-new-tokens",
        "5",
        "--greedy",
        "--ignore-eod",
        "--stop",
        "\\n",  # as typed in a shell: backslash, n
        stdin="Emma\nThe\n",
    )
    assert proc.returncode == 0, proc.stderr
    params = dataclasses.replace(GREEDY, max_new_tokens=5, stop=("\n",))
    assert proc.stdout == "".join(trained.generate(p, params)[0].text + "\n" for p in ("Emma", "The"))


def launcher(name: str):
    """The front end neo-NAME as a module, to call its main() in this process (error paths need no subprocess)."""
    import importlib

    return importlib.import_module(f"neo.cli.{name}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--top-p", "1.2"], "--top-p must be in (0, 1]"),
        (["--prompt", "x", "--top-k", "-2"], "--top-k must be an integer >= 0"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        ([], "give --prompt TEXT, --prompt-file FILE or --interactive"),
        (["--prompt-file", "EMPTY"], "holds no prompts"),
        (["--prompt-file", "MISSING"], "does not exist"),
        (["--prompt", "x", "--max-new-tokens", "500"], "exceeds the model's length"),
    ],
)
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [
        str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / "nope.txt") if a == "MISSING" else a
        for a in args
    ]
    if "500" in args:
        args += ["--max-length", "128"]
    assert launcher("generate").main([str(checkpoint), *args]) == 2
    out, err = capsys.readouterr()
    last = err.splitlines()[-1]  # errors found after loading follow the "loaded" log line
    assert out == "" and err.count("neo-generate: error: ") == 1 and last.startswith("neo-generate: error: ")
    assert message in last, err


def test_cli_missing_checkpoint(tmp_path, capsys):
    main = launcher("generate").main
    assert main([str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert (
        capsys.readouterr().err == f"neo-generate: error: checkpoint {tmp_path / 'nowhere'} does not exist\n"
    )
    assert main([str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and err.count("\n") == 1
