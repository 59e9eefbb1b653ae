#!/usr/bin/env python
"""Training throughput and MFU of neo's real Trainer, per model shape and setting, in one process.

    python bench/throughput.py --device cuda                       # 160M, 410M, 1.4B; bf16; eager and compiled
    python bench/throughput.py --device cuda --shapes 410m --recompute none,selective
    python bench/throughput.py --dry-run                           # CPU: the tiny model, every case, to check

Each case builds neo's ``Trainer`` (DeepSpeed engine, the config a user runs: ``ds_configs/models/pythia-*.yml``
+ the precision preset; only the tokenizer and datasets stubbed, see bench/common.py), trains ``--warmup``
untimed steps (compiling happens there), then ``--steps`` timed steps on random tokens, with a device sync
at the end. Reported per case: tokens/s, model TFLOP/s (6N + 12 L h s per token), MFU against the device's
dense peak (``neo.train.metrics``), peak memory. Cases run one after another and free the GPU between them
(a shape that does not fit is recorded as an error, not a crash); ``--budget`` seconds bound the whole run
(cases left when it is spent are recorded as skipped). Selective recomputation runs only where the config
accepts ``parallel.activation_checkpoint: selective``; otherwise the record says it was skipped and why.
Targets (issue 19, bf16 on one H100/H200): MFU >= 40% at 160M and >= 50% at 410M-1.4B.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import os
import sys
import time

from common import (
    BENCH_SETTINGS,
    ROOT,
    build_trainer,
    environment,
    markdown_table,
    micro_batches,
    start_one_rank,
    write_record,
)

import neo  # noqa: F401 - before torch, as neo's entry points: sets THP_MEM_ALLOC_ENABLE

SHAPES = {  # name: (config file, micro-batch of 2048-token sequences on one 80 GB GPU)
    "160m": ("ds_configs/models/pythia-160m.yml", 16),
    "410m": ("ds_configs/models/pythia-410m.yml", 8),
    "1.4b": ("ds_configs/models/pythia-1.4b.yml", 8),
}
MFU_TARGET = {"160m": 0.40, "410m": 0.50, "1.4b": 0.50}
DRY_SHAPE = ("ds_configs/models/tiny.yml", 4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--shapes", default="160m,410m,1.4b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--compile", default="off,on", help="model.compile settings to run: off, on or both")
    p.add_argument("--recompute", default="none,selective", help="none and/or selective (when supported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per case (compiling happens here)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per case")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all cases; the rest are skipped")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny model, fp32, 1+2 steps per case")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--tag", default=None, help="inserted into the record's name (default: cuda on a GPU)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.dtype, args.warmup, args.steps = "cpu", "fp32", 1, 2
        args.tag = args.tag or "dry-run"
    return args


@functools.lru_cache
def selective_problem(config_file: str) -> str | None:
    """Why selective recomputation cannot run here (None: it can). Asks neo's own config validation, so the
    answer follows the code: ``parallel.activation_checkpoint: selective`` must load."""
    from neo.config import ConfigError, load_config

    try:
        load_config([str(ROOT / config_file)], ["parallel.activation_checkpoint=selective"], world_size=1)
    except ConfigError as e:
        print(f"bench: selective recomputation not run: {e.one_line()}", flush=True)
        return "skipped: this neo's config does not accept parallel.activation_checkpoint=selective"
    return None


def cases(args) -> list[dict]:
    """Every (shape, compile, recompute) case, in the order they run: all shapes eager first, so that a
    budget that runs out drops the compiled and selective variants, never a shape's baseline."""
    out = []
    recomputes = args.recompute.split(",")
    for recompute in recomputes:
        for compiled in [c == "on" for c in args.compile.split(",")]:
            for shape in args.shapes.split(","):
                out.append({"shape": shape, "compile": compiled, "recompute": recompute})
    return out


def case_config(args, case: dict):
    from neo.config import load_config

    config_file, micro = DRY_SHAPE if args.dry_run else SHAPES[case["shape"]]
    overrides = [*BENCH_SETTINGS, f"batch.micro_batch_size={micro}", f"precision.dtype={args.dtype}",
                 f"model.compile={str(case['compile']).lower()}", "model.vocab_size=50304", *args.overrides]  # fmt: skip
    if case["recompute"] == "selective":
        overrides.append("parallel.activation_checkpoint=selective")
    return load_config([str(ROOT / config_file)], overrides, world_size=1)


def run_case(args, case: dict, env, device) -> dict:
    """Build the Trainer, warm up, time; the numbers of one case (or its error)."""
    import torch

    from neo.model.gpt import flops_per_token, parameter_count
    from neo.train.metrics import peak_tflops

    cfg = case_config(args, case)
    tokens = cfg.batch.micro_batch_size * cfg.model.seq_length
    g = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, cfg.model.vocab_size, (cfg.batch.micro_batch_size, cfg.model.seq_length + 1),
                          generator=g) for _ in range(2)]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = build_trainer(cfg, env)
    stream = micro_batches(itertools.cycle(pool))
    built = time.perf_counter()
    losses = [trainer.train_step(stream) for _ in range(args.warmup)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    losses += [trainer.train_step(stream) for _ in range(args.steps)]
    sync()
    seconds = time.perf_counter() - t0
    fpt = flops_per_token(cfg.model)
    rate = args.steps * tokens / seconds
    peak = peak_tflops(args.dtype, args.peak_tflops)
    del trainer
    return dict(case, parameters=parameter_count(cfg.model)["total"], micro_batch=cfg.batch.micro_batch_size,
                tokens_per_step=tokens, tokens_per_s=rate, tflops=rate * fpt / 1e12,
                mfu=rate * fpt / 1e12 / peak if peak else None, build_s=built - start,
                warmup_s=t0 - built, step_ms=1e3 * seconds / args.steps, losses=losses,
                memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)  # fmt: skip


def free(device) -> None:
    import torch

    gc.collect()
    torch._dynamo.reset()  # each case compiles its own shapes (no dynamic-shape recompiles across cases)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_all(args, env, device) -> list[dict]:
    results, start = [], time.perf_counter()
    selective = selective_problem((DRY_SHAPE if args.dry_run else SHAPES["160m"])[0])
    for case in cases(args):
        label = f"{case['shape']} compile={'on' if case['compile'] else 'off'} recompute={case['recompute']}"
        if case["recompute"] == "selective" and selective:
            results.append(dict(case, skipped=selective))
        elif time.perf_counter() - start > args.budget:
            results.append(dict(case, skipped=f"time budget of {args.budget:.0f} s spent"))
        else:
            try:
                results.append(run_case(args, case, env, device))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, and the next case runs
                results.append(dict(case, error=f"{type(e).__name__}: {str(e)[:300]}"))
            free(device)
        r = results[-1]
        shown = r.get("skipped") or r.get("error") or (
            f"{r['tokens_per_s']:,.0f} tokens/s" + (f", MFU {r['mfu']:.1%}" if r["mfu"] else ""))  # fmt: skip
        print(f"bench: {label}: {shown}", flush=True)
    return results


def markdown(record: dict) -> str:
    rows = []
    for r in record["results"]:
        target = MFU_TARGET.get(r["shape"]) if not record["dry_run"] else None
        if "tokens_per_s" not in r:
            rows.append([r["shape"], "on" if r["compile"] else "off", r["recompute"], r.get("skipped") or
                         f"error: {r['error']}", "", "", "", "", ""])  # fmt: skip
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        verdict = (
            ("met" if r["mfu"] >= target else "NOT met") + f" (>= {target:.0%})"
            if target and r["mfu"]
            else ""
        )
        mem = f"{r['memory_gb']:.1f}" if r["memory_gb"] is not None else ""
        rows.append([r["shape"], "on" if r["compile"] else "off", r["recompute"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['tflops']:.1f}", mfu, f"{r['step_ms']:,.0f}", mem, verdict])  # fmt: skip
    header = [
        "shape",
        "compile",
        "recompute",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "step ms",
        "peak GB",
        "MFU target",
    ]
    c = record["config"]
    return "\n".join([
        f"# throughput benchmark, {record['date']} ({record['device']})", "", "{environment}", "", "## Setup", "",
        f"- neo's Trainer (DeepSpeed, one rank), {c['dtype']}, configs {', '.join(c['configs'])} with micro-batches "
        f"{c['micro_batches']} of their seq_length, random tokens; {c['warmup']} untimed + {c['steps']} timed steps per "
        "case; MFU = model FLOP/s (6N + 12 L h s per token) / the device's dense peak",
        *(["- dry run: every case with the tiny model (64 tokens) on the CPU, to check the script; the numbers "
           "mean nothing"]
          if record["dry_run"] else []),  # fmt: skip
        "", "## Results", "", markdown_table(header, rows), "",
    ])  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    env = start_one_rank(kind)
    device = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
    record = environment()
    results = run_all(args, env, device)
    shapes = [DRY_SHAPE] if args.dry_run else [SHAPES[s] for s in args.shapes.split(",")]
    record.update(benchmark="throughput", device=str(device), dry_run=args.dry_run, results=results,
                  config={"dtype": args.dtype, "configs": [f for f, _ in shapes], "micro_batches": [m for _, m in shapes],
                          "warmup": args.warmup, "steps": args.steps, "budget_s": args.budget,
                          "overrides": args.overrides})  # fmt: skip
    text = markdown(record)
    print(text.replace("{environment}", "(environment)"))
    if not args.no_record:
        tag = args.tag or ("cuda" if kind == "cuda" else None)
        paths = write_record("throughput" + (f"-{tag}" if tag else ""), record, text, args.out)
        print("bench: wrote " + ", ".join(str(p) for p in paths))
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    code = main()
    from neo.distributed import shutdown

    shutdown(code)
