"""The model against an independent reference: transformers' GPTNeoXForCausalLM with the same weights."""

from __future__ import annotations

import pytest
import torch

from neo.export.hf import from_hf_state_dict, hf_config, load_into_hf, to_hf_state_dict
from neo.model.args import ModelArgs
from neo.model.gpt import GPT, flops_per_token, parameter_count

transformers = pytest.importorskip(
    "transformers", reason="transformers is in the test extra: pip install -e .[test]"
)


def randomized(args: ModelArgs, seed: int = 0) -> GPT:
    """A model whose every parameter (biases and norm gains too) is random, so no term hides behind a zero."""
    model = GPT(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def compare(args: ModelArgs, dtype: torch.dtype, seed: int = 0, perturb: bool = False) -> float:
    model = randomized(args, seed).to(dtype).eval()
    ref = transformers.GPTNeoXForCausalLM(hf_config(args)).to(dtype).eval()
    load_into_hf(ref, model.state_dict(), args)
    if perturb:  # negative control: a small change in one weight must show up
        with torch.no_grad():
            ref.gpt_neox.layers[0].attention.dense.weight[0, 0] += 0.05
    ids = torch.randint(
        0, args.vocab_size, (2, args.seq_length), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


SHAPES = [
    dict(parallel_residual=True, rotary_pct=0.25, tie_embeddings=False),
    dict(parallel_residual=False, rotary_pct=0.25, tie_embeddings=False),
    dict(parallel_residual=True, rotary_pct=1.0, tie_embeddings=False),
    dict(parallel_residual=False, rotary_pct=1.0, tie_embeddings=True),
    dict(parallel_residual=True, rotary_pct=0.25, tie_embeddings=True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_logits_equal_transformers(shape):
    args = ModelArgs(
        n_layers=3, hidden_size=64, n_heads=4, vocab_size=384, seq_length=24, rotary_base=10000.0, **shape
    )
    assert compare(args, torch.float64) < 1e-9
    assert compare(args, torch.float32) < 1e-5


def test_other_shapes_equal_transformers():
    args = ModelArgs(
        n_layers=2,
        hidden_size=96,
        n_heads=6,
        ffn_hidden_size=200,
        vocab_size=256,
        seq_length=17,
        rotary_pct=0.5,
        rotary_base=500.0,
        norm_eps=1e-6,
    )
    assert compare(args, torch.float64, seed=3) < 1e-9


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [0, 7, 1024], ids=["unfused", "chunk7", "chunk1024"])
def test_training_loss_and_every_gradient_equal_transformers(tie, chunk):
    """The loss path of training: head and loss fused over chunks of tokens (7 leaves a remainder of
    48 tokens; 1024 is one chunk) or unfused (0). Loss and each gradient against transformers' in fp64,
    with the loss scaled by 3 before backward (as a loss scale or 1/accumulation does)."""
    args = ModelArgs(
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        vocab_size=384,
        seq_length=24,
        tie_embeddings=tie,
        loss_chunk_size=chunk,
    )
    model = randomized(args).double()
    ref = transformers.GPTNeoXForCausalLM(hf_config(args)).double()
    load_into_hf(ref, model.state_dict(), args)
    ids = torch.randint(
        0, args.vocab_size, (2, args.seq_length + 1), generator=torch.Generator().manual_seed(1)
    )
    inputs, labels = ids[:, :-1], ids[:, 1:]

    loss = model(inputs, labels)
    (3 * loss).backward()
    ref_loss = torch.nn.functional.cross_entropy(ref(inputs).logits.flatten(0, 1), labels.flatten())
    (3 * ref_loss).backward()
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-12
    ours = to_hf_state_dict({name: p.grad for name, p in model.named_parameters()}, args)
    theirs = {name.replace("lm_head.", "embed_out."): p.grad for name, p in ref.named_parameters()}
    for name, grad in theirs.items():
        assert ((ours[name] - grad).abs().max() / grad.abs().max()).item() < 1e-9, name
    with torch.no_grad():  # evaluation: the same loss without the gradient work
        assert abs(model(inputs, labels).item() - ref_loss.item()) / ref_loss.item() < 1e-12


def test_fused_loss_with_a_frozen_head_still_back_propagates_into_the_body():
    args = ModelArgs(n_layers=2, hidden_size=32, n_heads=4, vocab_size=128, seq_length=16, loss_chunk_size=5)
    fused, unfused = randomized(args).double(), randomized(args).double()
    unfused.layers[-1].loss_chunk_size = 0
    ids = torch.randint(
        0, args.vocab_size, (2, args.seq_length + 1), generator=torch.Generator().manual_seed(2)
    )
    for model in (fused, unfused):
        model.layers[-1].embed_out.weight.requires_grad_(False)
        model(ids[:, :-1], ids[:, 1:]).backward()
    assert fused.layers[-1].embed_out.weight.grad is None
    assert torch.allclose(
        fused.layers[1].mlp.dense_h_to_4h.weight.grad,
        unfused.layers[1].mlp.dense_h_to_4h.weight.grad,
        rtol=1e-10,
        atol=0,
    )


def test_fused_loss_under_autocast_matches_the_unfused_head_and_loss():
    """Under torch.autocast(bf16) (a user's mixed precision; neo's own runs cast the model) the fused loss
    works and gives the unfused loss and gradients."""
    args = ModelArgs(n_layers=2, hidden_size=32, n_heads=4, vocab_size=128, seq_length=16, loss_chunk_size=5)
    fused, unfused = randomized(args), randomized(args)
    unfused.layers[-1].loss_chunk_size = 0
    ids = torch.randint(
        0, args.vocab_size, (2, args.seq_length + 1), generator=torch.Generator().manual_seed(3)
    )
    losses = []
    for model in (fused, unfused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(fused.parameters(), unfused.parameters()):
        assert a.grad.dtype == torch.float32
        assert ((a.grad - b.grad).norm() / b.grad.norm()).item() < 2e-2


def test_negative_control_detects_a_changed_weight():
    args = ModelArgs(n_layers=2, hidden_size=64, n_heads=4, vocab_size=256, seq_length=16)
    assert compare(args, torch.float64, perturb=True) > 1e-4


def test_state_dict_round_trip_through_transformers_names():
    args = ModelArgs(n_layers=2, hidden_size=64, n_heads=4, vocab_size=256, tie_embeddings=False)
    state = randomized(args).state_dict()
    back = from_hf_state_dict(to_hf_state_dict(state, args), args)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(tie_embeddings=True),
        dict(norm="rmsnorm", activation="swiglu"),
        dict(position_embedding="learned"),
        dict(position_embedding="sinusoidal", parallel_residual=False),
    ],
)
def test_parameter_count_matches_the_built_model(options):
    args = ModelArgs(n_layers=2, hidden_size=64, n_heads=4, vocab_size=256, seq_length=32, **options)
    model = GPT(args)
    assert parameter_count(args)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "options",
    [
        dict(norm="rmsnorm", activation="swiglu"),
        dict(position_embedding="learned", tie_embeddings=True),
        dict(position_embedding="sinusoidal", attention_dropout=0.1, hidden_dropout=0.1),
    ],
)
def test_options_train(options):
    """Each architecture option builds, back-propagates into every parameter, and learns a fixed batch."""
    args = ModelArgs(n_layers=2, hidden_size=32, n_heads=4, vocab_size=128, seq_length=16, **options)
    model = GPT(args)
    ids = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_initialisation_is_per_layer_seeded_and_follows_small_init():
    args = ModelArgs(n_layers=4, hidden_size=128, n_heads=4, vocab_size=512)
    a, b, c = GPT(args, seed=1), GPT(args, seed=1), GPT(args, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(
        a.layers[1].attention.query_key_value.weight, c.layers[1].attention.query_key_value.weight
    )
    # blocks do not share draws: each layer has its own generator
    assert not torch.equal(a.layers[1].mlp.dense_h_to_4h.weight, a.layers[2].mlp.dense_h_to_4h.weight)
    small = (2 / (5 * 128)) ** 0.5
    wang = 2 / 4 / 128**0.5
    assert a.layers[1].mlp.dense_h_to_4h.weight.std().item() == pytest.approx(small, rel=0.05)
    assert a.layers[1].mlp.dense_4h_to_h.weight.std().item() == pytest.approx(wang, rel=0.05)


def test_flops_per_token_formula():
    args = ModelArgs(n_layers=6, hidden_size=512, n_heads=8, vocab_size=50304, seq_length=2048)
    blocks = parameter_count(args)["blocks"]
    expected = 6 * (blocks + 50304 * 512) + 12 * 6 * 512 * 2048
    assert flops_per_token(args) == expected
    # Pythia-70M is ~70M parameters with its 50304 padded vocabulary
    assert 69e6 < parameter_count(args)["total"] < 72e6


@pytest.mark.parametrize("interval, segments", [(1, 4), (2, 2), (3, 2), (4, 1)])
def test_activation_checkpointing_recomputes_segments_of_n_blocks_with_the_same_gradients(
    monkeypatch, interval, segments
):
    """parallel.activation_checkpoint: full with every_n = N in the plain form: the 4 blocks run as checkpointed
    segments of N (the last may be shorter), and the loss and every gradient are those without it."""
    import neo.parallel.random as tp_random

    args = ModelArgs(n_layers=4, hidden_size=32, n_heads=4, vocab_size=128, hidden_dropout=0.0)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(n: int):
        model = GPT(args, seed=3, recompute="full" if n else "none", every_n=max(n, 1)).train()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}

    calls = []
    real = tp_random.checkpoint
    monkeypatch.setattr(tp_random, "checkpoint", lambda fn, *a: calls.append(len(a[0])) or real(fn, *a))
    loss, grads = loss_and_grads(interval)
    assert len(calls) == segments and sum(calls) == 4
    monkeypatch.setattr(tp_random, "checkpoint", real)
    ref_loss, ref_grads = loss_and_grads(0)
    assert loss == ref_loss and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
