"""transformers folders in and out: GPTNeoX, Llama, Mistral and Qwen2 models built from configs with random
weights (nothing downloaded), imported into neo checkpoints of a tp/pp layout, exported back. Logits are
compared after import and after export (fp32 and fp64), round trips bit for bit; what neo cannot
represent is refused by name; an imported model generates, evaluates and trains with its own tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from data_helpers import sample_texts
from hf_helpers import library, make_tokenizer, save_hf_model
from runs import make_tokens, run_training
from safetensors.torch import load_file

from neo.checkpoint import load_model, read_meta
from neo.errors import ExportError
from neo.export.hf import args_from_hf_config, export_checkpoint
from neo.export.hf_import import import_hf

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

# Shapes the model tests (test_llama_family.py) do not use: other widths, head ratios, depths and options.
CONFIGS = {  # name: (transformers config kwargs, tokenizer kind, tp, pp of the imported checkpoint)
    "llama": (dict(model_type="llama", hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                   rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=32.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16),
                   max_position_embeddings=64), "llama3", 2, 2),
    "llama-bias": (dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, attention_bias=True, mlp_bias=True, max_position_embeddings=64),
                   "llama3", 2, 3),
    "mistral": (dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=1, sliding_window=6, max_position_embeddings=64),
                "sentencepiece", 1, 2),
    "qwen2": (dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(rope_type="default",
                   rope_theta=1e6), max_position_embeddings=64), "llama3", 2, 1),
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False,
                      max_position_embeddings=64), "byte", 2, 2),
}  # fmt: skip


def build(name: str, root, dtype=torch.float32):
    """A random transformers model of CONFIGS[name] with its tokenizer, saved to ``root/hf``."""
    kwargs, kind, tp, pp = CONFIGS[name]
    tok_dir = make_tokenizer(root / "tok", kind)
    vocab = library(tok_dir).get_vocab_size(with_added_tokens=True)
    config = transformers.AutoConfig.for_model(**kwargs, vocab_size=vocab)
    model = save_hf_model(root / "hf", config, dtype=dtype)
    for f in tok_dir.iterdir():
        (root / "hf" / f.name).write_bytes(f.read_bytes())
    return model, tp, pp


def error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_then_export_equals_transformers_and_round_trips_bit_for_bit(
    name, dtype, tmp_path, one_torch_thread
):
    hf, tp, pp = build(name, tmp_path, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    result = import_hf(str(tmp_path / "hf"), str(tmp_path / "neo"), tp=tp, pp=pp)
    meta = read_meta(str(tmp_path / "neo"))
    assert meta["layout"]["tp"] == tp and meta["layout"]["pp"] == pp
    assert result["architecture"] == hf.config.architectures[0]
    model, args, _ = load_model(str(tmp_path / "neo"), dtype=dtype)
    assert args.vocab_size == hf.config.vocab_size  # exactly, never padded
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
        assert error(ours, hf(ids).logits) <= tolerance  # after import

    export_checkpoint(str(tmp_path / "neo"), str(tmp_path / "out"))
    src, out = tmp_path / "hf", tmp_path / "out"
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=dtype).eval()
    with torch.no_grad():
        assert error(ours, back(ids).logits) <= tolerance  # after export
    text = sample_texts()[1][:300]
    assert (
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))(text).input_ids
        == library(tmp_path / "hf").encode(text).ids
    )


REFUSED = [
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=8), "'mixtral'"),
    (dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]), "'qwen2_moe'"),
    (dict(model_type="llama", num_local_experts=4), "num_local_experts = 4"),
    (dict(model_type="llama", rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
     "rope_type = 'yarn'"),
    (dict(model_type="llama", rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type = 'dynamic'"),
    (dict(model_type="llama", head_dim=32), "head_dim = 32"),
    (dict(model_type="llama", attention_bias=True), "attention_bias = True with mlp_bias = False"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act = 'gelu'"),
    (dict(model_type="llama", architectures=["LlamaForSequenceClassification"]), "LlamaForSequenceClassification"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), "layer_types"),
    (dict(model_type="gpt_neox", attention_bias=False), "attention_bias = false"),
    (dict(model_type="gpt_neox", hidden_act="gelu_new"), "hidden_act = 'gelu_new'"),
]  # fmt: skip


@pytest.mark.parametrize("config, message", REFUSED, ids=[m for _, m in REFUSED])
def test_import_refuses_what_neo_cannot_represent_by_name(config, message):
    base = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100
    )
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace("[", r"\[")):
        args_from_hf_config({**base, **config})


def test_cli_refuses_a_mixture_of_experts_in_one_line(tmp_path, capsys):
    from neo.cli.export import main

    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text(
        json.dumps({"model_type": "mixtral", "num_local_experts": 8})
    )
    assert main(["--from-hf", str(tmp_path / "moe"), str(tmp_path / "neo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixtral" in err and len(err.splitlines()) == 1 and not (tmp_path / "neo").exists()


def test_imported_model_generates_evaluates_and_trains_with_its_own_tokenizer(tmp_path):
    """Import through the CLI records the folder's tokenizer: generation and evaluation need no flag; data
    preprocessed with ``hf:`` trains from the imported weights."""
    from neo.cli.evaluate import main as evaluate
    from neo.cli.export import main as export
    from neo.generate import Generator, SamplingParams

    build("qwen2", tmp_path)
    assert export(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "neo")]) == 0
    meta = read_meta(str(tmp_path / "neo"))
    spec = meta["tokenizer_spec"]
    assert spec == f"hf:{tmp_path / 'neo' / 'tokenizer'}" and meta["tokenizer"].startswith("hf:")
    gen = Generator.from_checkpoint(str(tmp_path / "neo"))
    assert gen.tokenizer.name == meta["tokenizer"]
    out = gen.generate("It is a truth", SamplingParams(max_new_tokens=6, greedy=True, stop_at_eod=False))[0]
    spelled = b"".join(gen.tokenizer.token_bytes(t) for t in out.tokens)
    assert len(out.tokens) == 6 and out.text == spelled.decode("utf-8", errors="replace")
    (tmp_path / "held_out.txt").write_text(sample_texts()[2][:2000])
    assert evaluate([str(tmp_path / "neo"), str(tmp_path / "held_out.txt"), "--batch-size", "2"]) == 0

    tokens = make_tokens(tmp_path / "data", "--tokenizer", spec)
    shape = tmp_path / "shape.yml"
    shape.write_text(yaml.safe_dump({"model": {**meta["model"], "seq_length": 32}}))
    run = run_training(tmp_path / "tune", f"data.train_paths=[{tokens}]", f"data.tokenizer={spec}",
                       f"checkpoint.load={tmp_path / 'neo'}", "checkpoint.load_weights_only=true",
                       "schedule.iterations=2", "eval.interval=0", configs=(str(shape),))  # fmt: skip
    assert "loaded the weights of" in run.output and len(run.losses) == 2
