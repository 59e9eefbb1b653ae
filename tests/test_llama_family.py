"""The Llama family against transformers: grouped-query attention, bias-free linears, Qwen2's qkv bias,
Mistral's sliding window and Llama 3.1's rotary scaling, each compared by logits (and training gradients)
with ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` holding the same weights; the KV
cache against the full forward; the shapes of the released models against their published sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from runs import ROOT

from neo.config import load_config
from neo.errors import ExportError
from neo.export.hf import family, from_hf_state_dict, hf_config, load_into_hf, to_hf_state_dict
from neo.model.args import ModelArgs, RopeScaling
from neo.model.gpt import GPT, parameter_count
from neo.model.layers import Context, KVCache

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

LLAMA = dict(
    n_layers=2,
    hidden_size=64,
    n_heads=8,
    vocab_size=256,
    seq_length=24,
    norm="rmsnorm",
    activation="swiglu",
    rotary_pct=1.0,
    parallel_residual=False,
    bias=False,
    norm_eps=1e-6,
)
LLAMA3 = RopeScaling(
    type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=16
)
SHAPES = {  # name: (architecture, options over LLAMA)
    "llama-gqa": ("LlamaForCausalLM", dict(n_kv_heads=2)),
    "llama-mqa-tied": ("LlamaForCausalLM", dict(n_kv_heads=1, tie_embeddings=True)),
    "llama-bias-llama3": ("LlamaForCausalLM", dict(n_kv_heads=4, bias=True, rope_scaling=LLAMA3, rotary_base=5e5)),
    "llama-linear-rope": ("LlamaForCausalLM", dict(rope_scaling=RopeScaling(type="linear", factor=4.0))),
    "mistral-window": ("MistralForCausalLM", dict(n_kv_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2ForCausalLM", dict(n_kv_heads=2, qkv_bias=True, rotary_base=1e6)),
    "qwen2-window-tied": ("Qwen2ForCausalLM", dict(n_kv_heads=4, qkv_bias=True, sliding_window=7, tie_embeddings=True)),
    "gpt-neox-llama3": ("GPTNeoXForCausalLM", dict(norm="layernorm", activation="gelu", rotary_pct=0.25,
                                                   parallel_residual=True, bias=True, rope_scaling=LLAMA3)),
}  # fmt: skip


def randomized(args: ModelArgs, seed: int = 0) -> GPT:
    """Every parameter random (biases and norm gains too), so no term hides behind a zero or a one."""
    model = GPT(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def reference(args: ModelArgs, model: GPT, dtype: torch.dtype):
    ref = transformers.AutoModelForCausalLM.from_config(hf_config(args)).to(dtype).eval()
    load_into_hf(ref, model.state_dict(), args)
    return ref


def logit_error(args: ModelArgs, dtype: torch.dtype, perturb: bool = False) -> tuple[float, float]:
    """(max |ours - theirs| / max |theirs|, max |ours - theirs|) on two random sequences."""
    model = randomized(args).to(dtype).eval()
    ref = reference(args, model, dtype)
    if perturb:  # negative control: one key-projection weight of one kv head
        with torch.no_grad():
            next(p for n, p in ref.named_parameters() if "k_proj.weight" in n)[-1, 0] += 0.05
    ids = torch.randint(0, args.vocab_size, (2, args.seq_length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    diff = (ours - theirs).abs().max().item()
    return diff / theirs.abs().max().item(), diff


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_equal_transformers(name, one_torch_thread):
    arch, options = SHAPES[name]
    args = ModelArgs(**{**LLAMA, **options})
    assert family(None, args).arch == arch  # the automatic choice of architecture
    assert logit_error(args, torch.float64)[0] <= 1e-9
    assert logit_error(args, torch.float32)[0] <= 1e-5


def test_negative_control_a_changed_key_weight_shows():
    args = ModelArgs(**LLAMA, n_kv_heads=2)
    assert logit_error(args, torch.float64, perturb=True)[0] > 1e-4


def test_sliding_window_and_rope_scaling_change_the_function():
    """The options under test are not no-ops: transformers without them disagrees."""
    for args, without in (
        (ModelArgs(**LLAMA, n_kv_heads=2, sliding_window=5), dict(sliding_window=None)),
        (ModelArgs(**LLAMA, rope_scaling=LLAMA3), dict(rope_scaling=RopeScaling())),
    ):
        model = randomized(args).double().eval()
        other = dataclasses.replace(args, **without)
        ref = transformers.AutoModelForCausalLM.from_config(hf_config(other)).double().eval()
        load_into_hf(ref, model.state_dict(), other)
        ids = torch.randint(
            0, args.vocab_size, (1, args.seq_length), generator=torch.Generator().manual_seed(3)
        )
        with torch.no_grad():
            assert (model(ids) - ref(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-window-tied"])
def test_training_loss_and_every_gradient_equal_transformers(name, one_torch_thread):
    args = ModelArgs(**{**LLAMA, **SHAPES[name][1], "loss_chunk_size": 7})
    model = randomized(args).double()
    ref = reference(args, model, torch.float64).train()
    ids = torch.randint(
        0, args.vocab_size, (2, args.seq_length + 1), generator=torch.Generator().manual_seed(1)
    )
    loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-12
    ours = to_hf_state_dict({n: p.grad for n, p in model.named_parameters()}, args)
    for n, p in ref.named_parameters():
        assert ((ours[n] - p.grad).abs().max() / p.grad.abs().max()).item() < 1e-9, n


@pytest.mark.parametrize("name", ["llama-gqa", "llama-bias-llama3", "qwen2", "mistral-window"])
def test_state_dict_round_trip_is_exact(name):
    args = ModelArgs(**{**LLAMA, **SHAPES[name][1]})
    state = randomized(args).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, args), args)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "options, arch, message",
    [
        (dict(n_kv_heads=2, norm="layernorm", activation="gelu", parallel_residual=True, bias=True,
              rotary_pct=0.25), "gpt_neox", "no grouped-query attention"),
        (dict(sliding_window=8), "llama", "model.sliding_window = 8"),
        (dict(qkv_bias=True), "llama", "model.qkv_bias = True"),
        (dict(bias=True), "mistral", "Mistral's linears have no biases"),
        (dict(), "qwen2", "Qwen2 has biases on q, k, v only"),
        (dict(rotary_pct=0.5), "llama", "model.rotary_pct = 0.5"),
        (dict(norm="layernorm", parallel_residual=True), None, "no transformers architecture expresses"),
    ],
)  # fmt: skip
def test_export_refuses_what_an_architecture_cannot_express(options, arch, message):
    args = ModelArgs(**{**LLAMA, **options})
    with pytest.raises(ExportError, match=message):
        hf_config(args, arch)


# ------------------------------------------------------------------------------------------ the KV cache


def incremental_logits(
    model: GPT, ids: torch.Tensor, chunks: list[int], max_length: int | None
) -> torch.Tensor:
    """Logits of every position after the first chunk, fed to a KV cache chunk by chunk."""
    cache, start, out = KVCache(max_length=max_length), 0, []
    for size in chunks:
        positions = torch.arange(start, start + size).expand(ids.shape[0], size)
        out.append(model(ids[:, start : start + size], ctx=Context(positions=positions, cache=cache)))
        start += size
    return torch.cat(out[1:], dim=1), cache


@pytest.mark.parametrize("kv, window", [(2, None), (1, 5), (4, 6)], ids=["gqa", "mqa-window", "gqa-window"])
@pytest.mark.parametrize("preallocate", [True, False], ids=["preallocated", "concatenated"])
def test_kv_cache_holds_kv_heads_only_and_equals_the_full_forward(kv, window, preallocate):
    """Prompt of 7, a chunk of 5, then one token at a time: past the window the ring buffer wraps."""
    args = ModelArgs(**{**LLAMA, "n_heads": 4, "n_kv_heads": kv, "sliding_window": window, "seq_length": 20})
    model = randomized(args).double().eval()
    ids = torch.randint(0, args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        inc, cache = incremental_logits(model, ids, [7, 5, *[1] * 8], 20 if preallocate else None)
    assert (inc - full[:, 7:]).abs().max().item() < 1e-12
    held = min(window or 20, 20)
    assert cache.keys[0].shape == (2, kv, held, args.head_dim)
    assert cache.nbytes() == 2 * args.n_layers * 2 * kv * held * args.head_dim * 8


def test_generation_with_the_cache_equals_without_for_gqa_and_a_window():
    """Batched prompts of different lengths (left padding), greedy, past the window: the same tokens."""
    from neo.generate import Generator, SamplingParams

    class Ids:  # what Generator needs from a tokenizer, for token ids only
        vocab_size, eod_id, name = 256, 0, "ids"

        def decode(self, ids) -> str:
            return ""

    args = ModelArgs(**{**LLAMA, "n_heads": 4, "n_kv_heads": 2, "sliding_window": 5, "seq_length": 40})
    gen = Generator(randomized(args).double(), Ids())
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [5, 6, 7], [9]]
    params = SamplingParams(max_new_tokens=12, greedy=True, stop_at_eod=False)
    cached = [g.tokens for g in gen.generate_ids(prompts, params)]
    assert cached == [g.tokens for g in gen.generate_ids(prompts, params, use_cache=False)]
    assert cached == [gen.generate_ids([p], params)[0].tokens for p in prompts]


# -------------------------------------------------------------------------- shapes of the released models

PUBLISHED = {  # parameters, as the model cards and their safetensors indexes give them
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.1": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_model_shapes_have_the_published_parameter_counts(name):
    """Counted from the shape (no 8B model is built); transformers' model of the same config, built on the
    meta device (no memory), counts the same."""
    args = load_config([str(ROOT / "ds_configs" / "models" / f"{name}.yml")]).model
    assert parameter_count(args)["total"] == PUBLISHED[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(args))
    assert sum(p.numel() for p in hf.parameters()) == PUBLISHED[name]
