#!/usr/bin/env python
"""The GPU campaign of issue 19 (run through ``bash bench/gpu.sh``): one script, under 8 minutes on one
H100/H200, dated records in bench/results/.

    bash bench/gpu.sh                 # a GPU machine: the records go to bench/results/
    bash bench/gpu.sh --dry-run       # a CPU: every step with the tiny model, records to a temporary folder

Steps, in this order (each a subprocess with a deadline; the campaign goes on when one fails):

1. smoke: the 160M shape (pythia-160m.yml + bf16) trains 300 steps on the bundled corpus with the real
   launcher: the loss falls, validation runs, the checkpoint is written, and text is generated from it.
2. fp16: the same shape in fp16 for 100 steps: DeepSpeed's dynamic loss scale is logged, losses stay finite.
3. generate: bench/generate.py on the 160M shape in bf16 (neo's KV cache against transformers).
4. throughput: bench/throughput.py, tokens/s and MFU of 160M, 410M and 1.4B in bf16, eager and compiled,
   with and without selective recomputation (where the config has it), in the time that is left.

The summary, ``gpu-<date>.md`` (``gpu-dry-run-<date>.md``), says what passed and points at the other records.
A dry run on a CPU runs the same steps with the tiny model, a few steps each and fp32 (a CPU has no fp16),
so the script is known to run before a GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, environment, markdown_table, write_record

BUDGET_S = 460  # the whole campaign; the limit is 8 minutes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dry-run", action="store_true", help="CPU: the tiny model, a few steps, records to --out"
    )
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole campaign")
    p.add_argument(
        "--out", default=None, help="records folder (default bench/results; dry run: a temp folder)"
    )
    p.add_argument("--work", default=None, help="scratch folder for runs and logs (default: a temp folder)")
    p.add_argument(
        "--check",
        action="store_true",
        help="only validate every config the GPU steps would run (seconds, no GPU, nothing trained)",
    )
    args = p.parse_args(argv)
    args.work = Path(
        args.work or (tempfile.gettempdir() if args.check else tempfile.mkdtemp(prefix="neo-gpu-"))
    )
    args.out = args.out or (str(args.work / "results") if args.dry_run else None)
    return args


def run(args, name: str, cmd: list[str], timeout: float) -> tuple[bool, str, float]:
    """Run one step's command; (ok, its log's last lines, seconds). The log is kept in the work folder."""
    log, start = args.work / f"{name}.log", time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu" if args.dry_run else "cuda")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    print(f"gpu: {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        try:
            ok = (
                subprocess.run(
                    cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            f.write(f"\ngpu: {name} timed out after {timeout:.0f} s\n")
            ok = False
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-12:])
    return ok, tail, time.perf_counter() - start


def tokens(args) -> str:
    """The bundled sample corpus as tokens (data/tokens/sample when the quickstart made it)."""
    prefix = ROOT / "data" / "tokens" / "sample"
    if Path(f"{prefix}.idx").exists():
        return str(prefix)
    prefix = args.work / "tokens" / "sample"
    if not Path(f"{prefix}.idx").exists():
        subprocess.run([sys.executable, "launch/preprocess.py", "data/sample/austen.jsonl.gz", "--output", str(prefix)],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)  # fmt: skip
    return str(prefix)


def train_cmd(args, run_dir: Path, dtype: str, steps: int, data: str | None = None) -> list[str]:
    shape = ["ds_configs/models/tiny.yml"] if args.dry_run else ["ds_configs/models/pythia-160m.yml"]
    sets = [f"data.train_paths=[{data or tokens(args)}]", f"logging.dir={run_dir}", f"precision.dtype={dtype}",
            f"schedule.iterations={steps}", f"schedule.warmup={max(1, steps // 10)}", "batch.grad_accum=1",
            f"batch.micro_batch_size={4 if args.dry_run else 8}", f"eval.interval={max(1, steps // 3)}",
            "eval.iters=2", f"logging.interval={max(1, steps // 12)}", "checkpoint.save_interval=0"]  # fmt: skip
    return [sys.executable, "launch/train.py", *shape] + [x for s in sets for x in ("--set", s)]


def curve(run_dir: Path) -> dict:
    """What a training run wrote: first and last loss, validation, throughput, loss scale, its end."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in recs if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps if "tokens_per_s" in r][1:] or [
        0.0
    ]  # the first interval compiles
    mfus = [r["mfu"] for r in steps if "mfu" in r][1:]
    scales = [r["loss_scale"] for r in steps if "loss_scale" in r]
    return {
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "steps": len(steps),
        "valid_losses": [r["valid_loss"] for r in recs if "valid_loss" in r],
        "finite": all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in steps),
        "tokens_per_s": statistics.median(rates), "mfu": statistics.median(mfus) if mfus else None,
        "memory_gb": max((r.get("memory_gb", 0.0) for r in steps), default=0.0),
        "loss_scale": {"first": scales[0], "min": min(scales), "last": scales[-1]} if scales else None,
        "finished": any(r.get("event") == "end" and r.get("exit_code") == 0 for r in recs),
    }  # fmt: skip


def step_smoke(args) -> dict:
    dtype, steps = ("fp32", 10) if args.dry_run else ("bf16", 300)
    run_dir = args.work / "smoke"
    ok, tail, seconds = run(args, "smoke", train_cmd(args, run_dir, dtype, steps), 300)
    out = {"ok": ok, "seconds": seconds, "dtype": dtype, "log": tail}
    if not ok:
        return out
    out.update(curve(run_dir))
    gen = [sys.executable, "launch/generate.py", str(run_dir / "checkpoints"), "--prompt", "It is a truth universally",
           "--max-new-tokens", "32", "--greedy", "--ignore-eod"]  # fmt: skip
    gen_ok, text, gen_s = run(args, "smoke-generate", gen, 180)
    text = " ".join(x.strip() for x in text.splitlines() if x.strip() and not x.startswith(("[20", "neo:")))
    out.update(generated=text[-200:], seconds=seconds + gen_s)
    out["ok"] = gen_ok and out["finished"] and out["finite"] and out["last_loss"] < out["first_loss"]
    return out


def step_fp16(args) -> dict:
    dtype, steps = ("fp32", 6) if args.dry_run else ("fp16", 100)
    run_dir = args.work / "fp16"
    ok, tail, seconds = run(args, "fp16", train_cmd(args, run_dir, dtype, steps), 240)
    out = {"ok": ok, "seconds": seconds, "dtype": dtype, "log": tail}
    if args.dry_run:
        out["note"] = "dry run: a CPU has no fp16 (DeepSpeed refuses it), so this step ran in fp32"
    if ok:
        out.update(curve(run_dir))
        out["ok"] = out["finished"] and out["finite"] and (args.dry_run or out["loss_scale"] is not None)
    return out


def step_generate(args) -> dict:
    model = ["model.n_layers=12", "model.hidden_size=768", "model.n_heads=12", "model.vocab_size=50304"]
    if args.dry_run:
        cmd = ["--device", "cpu", "--reps", "1", "--new", "4", "--prefixes", "16", "--no-cache-prefixes", "16",
               "--tag", "dry-run", "--set", "model.n_layers=2", "--set", "model.hidden_size=64", "--set", "model.n_heads=4"]  # fmt: skip
    else:
        cmd = ["--device", "cuda", "--dtype", "bf16", "--batch", "8", "--reps", "3", "--new", "64",
               "--prefixes", "32,512", "--no-cache-prefixes", "32"] + [x for m in model for x in ("--set", m)]  # fmt: skip
    cmd += ["--out", args.out] if args.out else []
    ok, tail, seconds = run(args, "generate", [sys.executable, "bench/generate.py", *cmd], 240)
    return {"ok": ok, "seconds": seconds, "log": tail}


def step_throughput(args, seconds_left: float) -> dict:
    cmd = [sys.executable, "bench/throughput.py", "--budget", str(max(30.0, seconds_left - 40))]
    cmd += ["--dry-run"] if args.dry_run else ["--device", "cuda"]
    cmd += ["--out", args.out] if args.out else []
    ok, tail, seconds = run(args, "throughput", cmd, max(60.0, seconds_left))
    return {"ok": ok, "seconds": seconds, "log": tail}


def check(args) -> int:
    """Load every config the GPU campaign runs (the dry run uses the tiny model, so it cannot catch a bad key
    in a GPU step's command): the smoke and fp16 runs, and each throughput case of each shape."""
    import throughput

    from neo.config import load_config

    args.dry_run = False
    checked = 0
    for dtype, steps in (("bf16", 300), ("fp16", 100)):
        cmd = train_cmd(args, args.work / "check", dtype, steps, data="data/tokens/sample")
        files = [a for a in cmd[2:] if a.endswith(".yml")]
        load_config(files, [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"], world_size=1)
        checked += 1
    t_args = throughput.parse_args(["--device", "cuda"])
    for case in throughput.cases(t_args):
        if case["recompute"] == "none" or not throughput.selective_problem(
            throughput.SHAPES[case["shape"]][0]
        ):
            throughput.case_config(t_args, case)
            checked += 1
    print(f"gpu: --check: {checked} configs of the GPU campaign load and validate")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return check(args)
    start, record = time.perf_counter(), environment()
    steps = {}
    for name, fn in (("smoke", step_smoke), ("fp16", step_fp16), ("generate", step_generate)):
        steps[name] = fn(args)
        print(
            f"gpu: {name}: {'PASS' if steps[name]['ok'] else 'FAIL'} ({steps[name]['seconds']:.0f} s)",
            flush=True,
        )
    steps["throughput"] = step_throughput(args, args.budget - (time.perf_counter() - start))
    print(f"gpu: throughput: {'PASS' if steps['throughput']['ok'] else 'FAIL'}", flush=True)
    total = time.perf_counter() - start
    record.update(
        benchmark="gpu", dry_run=args.dry_run, steps=steps, total_seconds=total, work=str(args.work)
    )
    text = summary(record)
    print(text.replace("{environment}", "(environment)"))
    paths = write_record("gpu" + ("-dry-run" if args.dry_run else ""), record, text, args.out)
    print("gpu: wrote " + ", ".join(str(p) for p in paths) + f"; logs in {args.work}")
    return 0 if all(s["ok"] for s in steps.values()) else 1


def summary(record: dict) -> str:
    rows = []
    for name, s in record["steps"].items():
        facts = []
        if "first_loss" in s:
            facts.append(f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']} steps")
            facts.append(
                f"{s['tokens_per_s']:,.0f} tokens/s" + (f", MFU {s['mfu']:.1%}" if s.get("mfu") else "")
            )
        if s.get("loss_scale"):
            facts.append("loss scale {first:g} -> {last:g} (min {min:g})".format(**s["loss_scale"]))
        if s.get("generated"):
            facts.append(f"generated: {s['generated'][-80:]!r}")
        facts += [s["note"]] if s.get("note") else []
        rows.append(
            [name, "PASS" if s["ok"] else "FAIL", f"{s['seconds']:.0f}", "; ".join(facts) or "see its record"]
        )
    minutes = record["total_seconds"] / 60
    return "\n".join([
        f"# GPU campaign{' (dry run on a CPU)' if record['dry_run'] else ''}, {record['date']}", "", "{environment}", "",
        f"- command: `bash bench/gpu.sh{' --dry-run' if record['dry_run'] else ''}`; total {minutes:.1f} min "
        f"({'within' if minutes < 8 else 'OVER'} the 8-minute limit); logs were in {record['work']}",
        "- the generation and throughput numbers are in generate-*/throughput-* records of the same date", "",
        markdown_table(["step", "result", "seconds", "what it showed"], rows), "",
    ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
