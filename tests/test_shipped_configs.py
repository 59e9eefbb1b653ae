"""The fine-tuning and post-training configs of ds_configs/ (the README's walkthrough) load and validate as
they are meant to be used: ``X-lora.yml`` is an overlay given after ``X.yml``. Each stage starts from the
checkpoints of the stage before it, so a renamed run directory or a schema change cannot silently break the
chain. Cheap: no training, no files beyond the configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neo.config import deepspeed_config, load_config

ROOT = Path(__file__).resolve().parent.parent
STAGES = sorted(
    [*(ROOT / "ds_configs" / "finetune").glob("*.yml"), *(ROOT / "ds_configs" / "posttrain").glob("*.yml")]
)
OBJECTIVES = {"sft": "sft", "reward": "reward", "dpo": "dpo", "ppo": "ppo", "grpo": "grpo"}


def files_of(path: Path) -> list[str]:
    """How the walkthrough runs a config: a LoRA overlay after the full-parameter config it modifies."""
    if path.stem.endswith("-lora"):
        return [str(path.with_name(path.stem.removesuffix("-lora") + ".yml")), str(path)]
    return [str(path)]


def load(path: Path):
    return load_config(files_of(path), world_size=1)


def test_every_stage_and_its_lora_variant_is_shipped():
    names = {p.stem for p in STAGES}
    assert names == {*OBJECTIVES, *(f"{o}-lora" for o in OBJECTIVES)}


@pytest.mark.parametrize("path", STAGES, ids=[str(p.relative_to(ROOT)) for p in STAGES])
def test_stage_validates_as_the_walkthrough_runs_it(path):
    cfg = load(path)
    assert deepspeed_config(cfg)["train_batch_size"] == cfg.batch.global_batch_size
    assert cfg.objective.type == OBJECTIVES[path.stem.removesuffix("-lora")]
    assert (cfg.lora.rank > 0) == path.stem.endswith("-lora")
    assert cfg.finetune.init_from, "every stage starts from an earlier stage's checkpoint"
    assert cfg.logging.dir == f"runs/{path.stem}", "one run directory per config, named after it"


def checkpoint_dirs() -> dict[str, str]:
    """Which config writes each checkpoint directory: the quickstart and every stage."""
    out = {load_config([str(ROOT / "ds_configs" / "quickstart.yml")]).checkpoint_dir: "quickstart"}
    out.update({load(p).checkpoint_dir: p.stem for p in STAGES})
    return out


def test_each_stage_starts_from_a_checkpoint_an_earlier_stage_writes():
    writers = checkpoint_dirs()
    order = ["quickstart", "sft", "reward", "dpo", "ppo", "grpo"]
    for path in STAGES:
        cfg = load(path)
        sources = [cfg.finetune.init_from] + (
            [cfg.objective.reward_model] if cfg.objective.reward_model else []
        )
        for source in sources:
            assert source in writers, f"{path.name}: {source} is written by no shipped config"
            base = path.stem.removesuffix("-lora")
            assert order.index(writers[source].removesuffix("-lora")) < order.index(base), (path.name, source)
    ppo = load(ROOT / "ds_configs" / "posttrain" / "ppo.yml")
    assert writers[ppo.objective.reward_model] == "reward"


def test_data_the_readme_preprocesses_is_the_data_the_stages_read():
    readme = (ROOT / "README.md").read_text()
    written = set(re.findall(r"launch/preprocess\.py \S+ .*?--output (\S+)", readme))
    for path in STAGES:
        for prefix in load(path).data.train_paths:
            assert prefix in written, f"{path.name} reads {prefix}, which no README command writes"


def test_readme_names_only_configs_that_exist():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"ds_configs/[\w./-]+\.yml", readme))
    stages = {str(p.relative_to(ROOT)) for p in STAGES if not p.stem.endswith("-lora")}
    assert stages <= named, "a stage the README does not show"
    missing = sorted(n for n in named if "STAGE" not in n and not (ROOT / n).is_file())
    assert not missing, missing
