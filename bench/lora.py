"""Full fine-tuning against LoRA (rank 8 on qkv, attn_out, mlp_in, mlp_out): optimizer-state bytes, peak
resident memory and step time, with ZeRO-1, on one model.

    python bench/lora.py                                          # pythia-410m shape, seq 128, 2 rounds
    python bench/lora.py --model ds_configs/models/pythia-160m.yml --rounds 1

Each variant runs in its own process (peak RSS is per process), built by neo's real Trainer
(bench/common.py: build_trainer) on random tokens: one untimed step (Adam's state and DeepSpeed's buffers
come into being), then ``--steps`` timed steps; then the optimizer state is counted from the live tensors
(bench/memory.py: measure: fp32 masters + Adam's moments). Rounds alternate the variants (full, lora, full,
lora, ...), so both see the same machine. Targets (issue 16): LoRA's optimizer state <= 2% of full
fine-tuning's, LoRA's peak memory <= 45% of full's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import ROOT, environment, markdown_table, write_record

import neo  # noqa: F401 - before torch, as neo's entry points: sets THP_MEM_ALLOC_ENABLE

VARIANTS = {"full": [], "lora": ["lora.rank=8", "lora.alpha=16"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "ds_configs" / "models" / "pythia-410m.yml"))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--no-record", action="store_true")
    return p.parse_args(argv)


def worker(args) -> dict:
    """One variant in this process: step times, optimizer bytes, peak RSS."""
    import torch
    from common import build_trainer, micro_batches
    from memory import measure

    from neo import distributed
    from neo.config import load_config

    env = distributed.init()
    sets = ["checkpoint.resume=false", f"model.seq_length={args.seq}", "batch.micro_batch_size=1",
            "batch.grad_accum=1", "zero.stage=1", "model.vocab_size=50304", *VARIANTS[args.worker]]  # fmt: skip
    trainer = build_trainer(load_config([args.model], sets), env)
    g = torch.Generator().manual_seed(0)
    batches = micro_batches(
        torch.randint(0, 50304, (1, args.seq + 1), generator=g) for _ in range(args.steps + 1)
    )
    trainer.train_step(batches)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
    counted = measure(trainer.engine)
    trainable = sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad)
    return {"variant": args.worker, "step_s": statistics.median(times), "optimizer_bytes": counted["master"] + counted["adam"],
            "trainable": trainable, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "categories": counted}  # fmt: skip


def run_variant(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--seq", str(args.seq),
           "--steps", str(args.steps)]  # fmt: skip
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    record = environment()
    runs = []
    for r in range(args.rounds):
        for name in VARIANTS:
            runs.append(run_variant(args, name))
            print(f"round {r + 1} {name}: {runs[-1]['step_s']:.2f} s/step, optimizer {runs[-1]['optimizer_bytes'] / 2**30:.3f} "
                  f"GiB, peak RSS {runs[-1]['peak_rss_gb']:.2f} GB", flush=True)  # fmt: skip
    med = {n: {k: statistics.median(x[k] for x in runs if x["variant"] == n) for k in ("step_s", "optimizer_bytes",
                                                                                     "peak_rss_gb", "trainable")}
           for n in VARIANTS}  # fmt: skip
    record.update(benchmark="lora", model=args.model, seq=args.seq, steps=args.steps, runs=runs, medians=med)
    text = markdown(record)
    print(text.replace("{environment}", ""))
    if not args.no_record:
        json_path, md_path = write_record("lora", record, text, args.out)
        print(f"wrote {md_path} and {json_path.name}")


def markdown(r: dict) -> str:
    m = r["medians"]
    full, lora = m["full"], m["lora"]
    rows = [[n, f"{v['trainable']:,.0f}", f"{v['optimizer_bytes'] / 2**20:,.1f}", f"{v['peak_rss_gb']:.2f}",
             f"{v['step_s']:.2f}"] for n, v in m.items()]  # fmt: skip
    opt, rss = lora["optimizer_bytes"] / full["optimizer_bytes"], lora["peak_rss_gb"] / full["peak_rss_gb"]
    ratios = [["LoRA optimizer state / full", f"{opt:.2%}", "<= 2%", "met" if opt <= 0.02 else "NOT met"],
              ["LoRA peak RSS / full", f"{rss:.2%}", "<= 45%", "met" if rss <= 0.45 else "NOT met"],
              ["LoRA step time / full", f"{lora['step_s'] / full['step_s']:.2f}x", "", ""]]  # fmt: skip
    return "\n".join([
        f"# full fine-tuning vs LoRA, {r['date']}", "", "{environment}", "",
        f"Model `{r['model']}`, seq {r['seq']}, micro-batch 1, fp32, ZeRO-1, one process per variant; medians of "
        f"{len(r['runs']) // 2} run(s) per variant, {r['steps']} timed steps each. Optimizer state = fp32 masters + "
        "Adam moments, counted from the live tensors; peak RSS of the whole process.", "",
        markdown_table(["variant", "trainable parameters", "optimizer state (MiB)", "peak RSS (GB)", "s/step"], rows),
        "", markdown_table(["ratio", "measured", "target", ""], ratios), "",
    ])  # fmt: skip


if __name__ == "__main__":
    main()
