"""Checkpoint bytes and time: neo's own format (after) against DeepSpeed's files plus neo's (before), and the
cost of the sha256 checksums, side by side on one model in one process.

    python bench/checkpoint.py                                   # pythia-410m shape, fp32, 3 rounds
    python bench/checkpoint.py --model ds_configs/models/pythia-160m.yml --rounds 2

One process builds neo's real Trainer (DeepSpeed engine, ZeRO-0, AdamW) on random tokens, takes one step so
Adam has state, then in each round, in a shuffled order:

- **save after**: ``neo.checkpoint.save.save`` (weights + Adam state + RNG as safetensors, sha256 computed
  while writing, manifest);
- **save before**: DeepSpeed's ``engine.save_checkpoint`` (what neo wrote until 2026-12-02) and then neo's
  files, as the old save did;
- **checksum cost**: the same tensors written with ``write_safetensors`` (hashing) and with safetensors'
  ``save_file`` (no hash); and reading a checkpoint's files for verification;
- **resume after**: verify + copy the weights into the model + set Adam's state, LR schedule, RNG (neo's
  path for every layout); **resume before**: DeepSpeed's ``engine.load_checkpoint`` (unpickles).

Files go to ``--dir`` (default: a temporary folder on the same disk as the results), removed at the end.
The page cache is dropped where the process may (root: /proc/sys/vm/drop_caches) before each read timing.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, environment, markdown_table, write_record

import neo  # noqa: F401 - before torch, as neo's entry points: sets THP_MEM_ALLOC_ENABLE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "ds_configs" / "models" / "pythia-410m.yml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache, so reads come from the disk (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(args) -> object:
    """A Trainer for the model config on random tokens, stepped once (so Adam's state exists)."""
    import torch
    from common import build_trainer, micro_batches

    from neo import distributed
    from neo.config import load_config

    env = distributed.init()
    cfg = load_config([args.model], ["checkpoint.resume=false", "model.seq_length=128", "batch.micro_batch_size=1",
                                     "batch.grad_accum=1", "model.vocab_size=50304"])  # fmt: skip
    trainer = build_trainer(cfg, env)
    tokens = torch.randint(0, 50304, (1, 129), generator=torch.Generator().manual_seed(0))
    trainer.train_step(micro_batches(iter([tokens])))
    return trainer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_round(trainer, root: Path, it: int) -> dict[str, float]:
    """One round: every variant once, in a shuffled order; seconds per variant."""
    from safetensors.torch import save_file

    from neo.checkpoint import files, load, save
    from neo.checkpoint.layout import tag_for

    meta = {
        "consumed_samples": 0,
        "model": {},
        "layout": trainer.layout(),
        "lr_schedule": trainer.scheduler.state_dict(),
    }
    state = {k: v.detach().cpu() for k, v in trainer.engine.module.state_dict().items()}

    def save_after():
        save.save(trainer.engine, str(root / "after"), it, meta, 1, trainer.topo)

    def save_before():
        trainer.engine.save_checkpoint(str(root / "before"), tag=f"ds-{tag_for(it)}", save_latest=False)
        save.save(trainer.engine, str(root / "before"), it, meta, None, trainer.topo)

    variants = {
        "save after (neo format, sha256)": save_after,
        "save before (DeepSpeed + neo format)": save_before,
        "write weights with sha256": lambda: files.write_safetensors(str(root / "w_sha.safetensors"), state),
        "write weights without hash": lambda: save_file(state, str(root / "w_plain.safetensors")),
    }
    order = list(variants)
    random.shuffle(order)
    out = {name: timed(variants[name]) for name in order}
    path = root / "after" / tag_for(it)
    plan_meta = load.read_meta(str(path))
    drop_caches()
    out["verify (read + sha256 every file)"] = timed(lambda: files.verify(str(path), plan_meta))
    drop_caches()
    out["resume after (verify, weights, Adam, schedule)"] = timed(lambda: _resume_after(trainer, path))
    drop_caches()
    out["resume before (DeepSpeed load_checkpoint)"] = timed(
        lambda: trainer.engine.load_checkpoint(str(root / "before"), tag=f"ds-{tag_for(it)}"))  # fmt: skip
    return out


def _resume_after(trainer, path: Path) -> None:
    from neo.checkpoint import load

    plan = load.plan_load(str(path), trainer.layout(), False)
    load.copy_weights_into(trainer.engine.module, str(path), trainer.topo)
    load.restore_training_state(trainer.engine, trainer.scheduler, plan, trainer.topo)


def main(argv=None) -> None:
    args = parse_args(argv)
    trainer = build(args)
    n = sum(p.numel() for p in trainer.engine.module.parameters())
    root = Path(tempfile.mkdtemp(prefix="neo-bench-ckpt-", dir=args.dir))
    record = environment()
    rounds = []
    try:
        for r in range(args.rounds):
            rounds.append(measure_round(trainer, root, r + 1))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rounds[-1].items()), flush=True)
        from neo.checkpoint.layout import tag_for

        last = tag_for(args.rounds)
        after = folder_bytes(root / "after" / last)
        before = folder_bytes(root / "before" / last) + folder_bytes(root / "before" / f"ds-{last}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    record.update(benchmark="checkpoint", model=args.model, parameters=n, rounds=rounds, medians=medians,
                  bytes={"after": after, "before": before, "weights_plus_adam": 12 * n}, drop_caches=drop_caches())  # fmt: skip
    text = markdown(record)
    print(text.replace("{environment}", ""))
    if not args.no_record:
        json_path, md_path = write_record("checkpoint", record, text, args.out)
        print(f"wrote {md_path} and {json_path.name}")


def markdown(r: dict) -> str:
    m, b, n = r["medians"], r["bytes"], r["parameters"]
    rows = [[k, f"{v:.2f}"] for k, v in m.items()]
    ratio = [
        ["save: after / before", f"{m['save after (neo format, sha256)'] / m['save before (DeepSpeed + neo format)']:.2f}x"],
        ["resume: after / before", f"{m['resume after (verify, weights, Adam, schedule)'] / m['resume before (DeepSpeed load_checkpoint)']:.2f}x"],
        ["writing with sha256 / without", f"{m['write weights with sha256'] / m['write weights without hash']:.2f}x"],
    ]  # fmt: skip
    sizes = [["after (neo format)", f"{b['after']:,}", f"{b['after'] / b['weights_plus_adam']:.4f}"],
             ["before (DeepSpeed + neo)", f"{b['before']:,}", f"{b['before'] / b['weights_plus_adam']:.4f}"]]  # fmt: skip
    return "\n".join([
        f"# checkpoint bytes and time, {r['date']}", "", "{environment}", "",
        f"Model: `{r['model']}`, {n:,} parameters, fp32, ZeRO-0, one process; median of {len(r['rounds'])} "
        f"rounds (variants shuffled in each); page cache dropped before reads: {r['drop_caches']}.", "",
        markdown_table(["variant", "seconds (median)"], rows), "",
        markdown_table(["ratio", "value"], ratio), "",
        markdown_table(["checkpoint", "bytes", "/ (weights + Adam = 12 bytes per parameter)"], sizes), "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
