"""Config: merging, overrides, typed validation, the batch arithmetic and the DeepSpeed dict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neo.config import ConfigError, deepspeed_config, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "ds_configs").rglob("*.yml"))


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def problems(tmp_path: Path, data: dict, *overrides: str, world_size: int = 1) -> str:
    path = write(tmp_path, "bad.yml", data)
    with pytest.raises(ConfigError) as err:
        load_config([path], list(overrides), world_size)
    return str(err.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_validates(path):
    data = yaml.safe_load(path.read_text()) or {}
    par = data.get("parallel", {})
    cfg = load_config([str(path)], world_size=par.get("tp", 1) * par.get("pp", 1))
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.batch.global_batch_size


def test_files_merge_left_to_right_and_set_wins(tmp_path):
    a = write(tmp_path, "a.yml", {"model": {"n_layers": 3, "hidden_size": 64}, "optimizer": {"lr": 1e-3}})
    b = write(tmp_path, "b.yml", {"model": {"n_layers": 5}})
    cfg = load_config([a, b], ["optimizer.lr=5e-4", "data.train_paths=[x, y]"])
    assert (cfg.model.n_layers, cfg.model.hidden_size) == (5, 64)
    assert cfg.optimizer.lr == 5e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.train_paths == ["x", "y"]
    assert cfg.sources["model.n_layers"] == b and cfg.sources["model.hidden_size"] == a


def test_yaml_exponent_strings_are_floats_and_shorthand_precision(tmp_path):
    # PyYAML reads 6e-4 (no dot) as a string; neo accepts it for a float field.
    path = tmp_path / "c.yml"
    path.write_text("optimizer:\n  lr: 6e-4\nprecision: bf16\n")
    cfg = load_config([str(path)])
    assert cfg.optimizer.lr == pytest.approx(6e-4) and cfg.precision.dtype == "bf16"
    assert deepspeed_config(cfg)["bf16"]["enabled"] is True


def test_unknown_key_suggests_the_right_one_and_names_the_file(tmp_path):
    msg = problems(tmp_path, {"model": {"hiden_size": 64}})
    assert "unknown key 'model.hiden_size'" in msg and "Did you mean 'model.hidden_size'" in msg
    assert "bad.yml" in msg


def test_unknown_section(tmp_path):
    assert "Did you mean 'optimizer'" in problems(tmp_path, {"optimiser": {"lr": 1e-3}})


def test_wrong_type(tmp_path):
    msg = problems(tmp_path, {"model": {"n_layers": "six"}})
    assert "model.n_layers = 'six'" in msg and "must be int" in msg
    assert "must be 'fp32' | 'bf16' | 'fp16'" in problems(tmp_path, {"precision": {"dtype": "fp8"}})
    assert "must be bool" in problems(tmp_path, {"model": {"parallel_residual": "yes"}})


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"model": {"hidden_size": 100, "n_heads": 3}}, "model.hidden_size = 100 (set in"),
        (
            {"model": {"seq_length": 4096, "max_position_embeddings": 2048}},
            "is above model.max_position_embeddings",
        ),
        (
            {"zero": {"stage": 2}, "parallel": {"pp": 2}, "model": {"n_layers": 4}},
            "cannot be combined with pipeline",
        ),
        (
            {"zero": {"stage": 3}, "parallel": {"pp": 2}, "model": {"n_layers": 4}},
            "Fix: use zero.stage 0 or 1",
        ),
        (
            {"precision": {"dtype": "fp16"}, "deepspeed": {"bf16": {"enabled": True}}},
            "fp16 and bf16 are never both on",
        ),
        (
            {"model": {"hidden_size": 64, "n_heads": 4}, "parallel": {"tp": 3}},
            "not divisible by parallel.tp = 3",
        ),
        ({"batch": {"micro_batch_size": 4, "grad_accum": 2, "global_batch_size": 9}}, "4 x 2 x 1 = 8, not"),
        (
            {"batch": {"micro_batch_size": 3, "global_batch_size": 10}},
            "not divisible by micro_batch_size x dp",
        ),
        ({"schedule": {"iterations": 10, "warmup": 20}}, "schedule.warmup = 20"),
        ({"zero": {"stage": 4}}, "zero.stage = 4"),
        ({"zero": {"stage": 0, "offload_optimizer": "cpu"}}, "needs zero.stage >= 1"),
        ({"data": {"train_paths": ["a", "b"], "train_weights": [1.0]}}, "one weight per path"),
        ({"data": {"split": "90,x"}}, "data.split = '90,x'"),
        ({"deepspeed": {"train_batch_size": 8}}, "derived by neo from batch.global_batch_size"),
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "set zero.stage instead"),
        ({"model": {"rotary_pct": 0.2, "hidden_size": 64, "n_heads": 4}}, "odd rotary dimension"),
        ({"precision": "bf16", "parallel": {"pp": 2}, "model": {"n_layers": 4}}, "set zero.stage: 1"),
        ({"parallel": {"sequence_parallel": True}}, "Fix: set parallel.tp >= 2, or sequence_parallel: false"),
        (
            {"parallel": {"sequence_parallel": True, "tp": 2}, "model": {"seq_length": 127}},
            "model.seq_length = 127 (set in",
        ),
    ],
)
def test_impossible_combinations_name_key_file_and_fix(tmp_path, data, expected):
    world = data.get("parallel", {}).get("pp", 1)
    msg = problems(tmp_path, data, world_size=world)
    assert expected in msg, msg
    assert "bad.yml" in msg or "(default)" in msg


def test_world_size_must_divide_by_tp_pp(tmp_path):
    msg = problems(tmp_path, {"parallel": {"tp": 2}}, world_size=3)
    assert "world size 3" in msg and "multiple of 2" in msg


def test_all_problems_reported_at_once(tmp_path):
    msg = problems(
        tmp_path,
        {"model": {"hidden_size": 100, "n_heads": 3}, "zero": {"stage": 7}, "optimizer": {"lr": -1.0}},
    )
    assert "3 problems" in msg


@pytest.mark.parametrize(
    "batch, world, expected",
    [
        ({"micro_batch_size": 4, "grad_accum": 2}, 2, (4, 2, 16)),
        ({"micro_batch_size": 2, "global_batch_size": 16}, 2, (2, 4, 16)),
        ({"grad_accum": 4, "global_batch_size": 16}, 2, (2, 4, 16)),
        ({"global_batch_size": 8}, 4, (2, 1, 8)),
        ({"micro_batch_size": 3}, 1, (3, 1, 3)),
        ({}, 2, (4, 1, 8)),
    ],
)
def test_batch_any_two_derive_the_third(tmp_path, batch, world, expected):
    cfg = load_config([write(tmp_path, "b.yml", {"batch": batch})], world_size=world)
    assert (cfg.batch.micro_batch_size, cfg.batch.grad_accum, cfg.batch.global_batch_size) == expected
    ds = deepspeed_config(cfg)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == expected


def test_deepspeed_dict_derivation_and_passthrough(tmp_path):
    path = write(
        tmp_path,
        "z.yml",
        {
            "zero": {"stage": 2, "offload_optimizer": "cpu"},
            "precision": "fp16",
            "optimizer": {"grad_clip": 0.5},
            "deepspeed": {
                "flops_profiler": {"enabled": True},
                "zero_optimization": {"round_robin_gradients": True},
            },
        },
    )
    ds = deepspeed_config(load_config([path]))
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["flops_profiler"] == {"enabled": True}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config([str(tmp_path / "nope.yml")])
    bad = tmp_path / "broken.yml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config([str(bad)])


def test_explain_cli_prints_arithmetic_and_rejects_bad_config(tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "neo.config",
            str(ROOT / "ds_configs" / "quickstart.yml"),
            "--explain",
            "--world-size",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    assert "global_batch_size 32 = micro_batch_size 16 x grad_accum 1 x data-parallel 2" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "neo.config", write(tmp_path, "x.yml", {"model": {"n_layers": 0}})],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "model.n_layers = 0" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_config_reference_is_generated_from_the_code():
    from neo.config import reference_markdown

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n", 1)[1].split("<!-- config-reference:end -->", 1)[
        0
    ]
    assert block == reference_markdown(), "README is stale: paste `python -m neo.config --reference` into it"
