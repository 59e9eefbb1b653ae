"""Export to a transformers GPTNeoX directory (from any parallel layout) and import back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from runs import ROOT, run_training

from neo.checkpoint import load_full_weights, load_model
from neo.errors import UsageError

pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e .[test]")

HELD_OUT = (
    "The committee met on a grey Tuesday to discuss the railway timetable, and nobody, least of all the "
    "chairman, expected the argument about the new station clock to last until supper."
)

COMPARE = r"""
import json, sys, torch
from transformers import AutoTokenizer, GPTNeoXForCausalLM
out, text = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(out)
model = GPTNeoXForCausalLM.from_pretrained(out).eval()
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
torch.save({"ids": ids, "logits": logits}, out + "/../hf_logits.pt")
"""


@pytest.fixture(scope="module")
def tp2_pp2_checkpoint(sample_tokens, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2pp2")
    run_training(
        run_dir,
        f"data.train_paths=[{sample_tokens}]",
        "schedule.iterations=4",
        "eval.interval=0",
        "parallel.tp=2",
        "parallel.pp=2",
        "model.n_layers=3",
        "batch.global_batch_size=4",
        "batch.micro_batch_size=2",
        nproc=4,
    )
    return run_dir / "checkpoints"


@pytest.mark.multiproc
def test_export_from_tp2_pp2_matches_neo_in_a_fresh_transformers_process(tp2_pp2_checkpoint, tmp_path):
    out = tmp_path / "hf"
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "export.py"), str(tp2_pp2_checkpoint), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert {"model.safetensors", "config.json", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    fresh = subprocess.run(
        [sys.executable, "-c", COMPARE, str(out), HELD_OUT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr
    hf = torch.load(tmp_path / "hf_logits.pt", weights_only=True)
    model, args, meta = load_model(str(tp2_pp2_checkpoint))
    from neo.data.tokenizer import load_tokenizer

    assert hf["ids"][0].tolist() == load_tokenizer(meta["tokenizer_spec"]).encode(HELD_OUT)
    with torch.no_grad():
        ours = model(hf["ids"])
    assert ((ours - hf["logits"]).abs().max() / hf["logits"].abs().max()).item() <= 1e-5


@pytest.mark.multiproc
def test_round_trip_is_the_identity_and_import_continues_training(
    tp2_pp2_checkpoint, sample_tokens, tmp_path
):
    from neo.export.hf import export_checkpoint
    from neo.export.hf_import import import_hf

    export_checkpoint(str(tp2_pp2_checkpoint), str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "neo"))
    original, _ = load_full_weights(str(tp2_pp2_checkpoint))
    back, meta = load_full_weights(str(tmp_path / "neo"))
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    run = run_training(
        tmp_path / "tune",
        f"data.train_paths=[{sample_tokens}]",
        "schedule.iterations=2",
        "model.n_layers=3",
        f"checkpoint.load={tmp_path / 'neo'}",
        "checkpoint.load_weights_only=true",
        "eval.interval=0",
    )
    assert "loaded the weights of" in run.output and len(run.losses) == 2


def test_export_refuses_a_non_empty_output_and_explains_tied_models(tmp_path, sample_tokens):
    run_training(
        tmp_path / "run",
        f"data.train_paths=[{sample_tokens}]",
        "schedule.iterations=2",
        "eval.interval=0",
        "model.tie_embeddings=true",
    )
    from neo.export.hf import export_checkpoint

    result = export_checkpoint(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and result["tokenizer"]
    with pytest.raises(UsageError, match="not empty"):
        export_checkpoint(str(tmp_path / "run" / "checkpoints"), str(tmp_path / "hf"))
