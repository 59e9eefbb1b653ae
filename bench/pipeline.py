#!/usr/bin/env python
"""The pipeline bubble, measured: tokens/s of pp = 2 against pp = 1 for one global batch split into
1, 2, 4 and 8 micro-batches.

A 2-stage pipeline idles (p - 1) / (m + p - 1) of each step with m micro-batches in flight (GPipe's
bubble; DeepSpeed's 1F1B schedule has the same fill and drain), so pp = 2 should approach its ideal
as m grows. Each configuration is a real ``launch/train.py`` run (torchrun for pp = 2) on the sample
corpus; tokens/s is the median over the logged intervals after warm-up. On a 2-core CPU the pp = 1 run
uses both cores in one process (2 threads) and pp = 2 one core per stage, so the ratio also shows
what splitting the model costs on this machine; on GPUs compare at fixed devices instead.

    python bench/pipeline.py                # writes bench/results/pipeline-<date>.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, command_line, environment, markdown_table, write_record

# Byte-level tokens (vocabulary 257, padded to 384) keep the output layer small, so the two stages
# ("type:Block": 4 blocks each) do about the same work and the bubble is what the table shows. With
# GPT-2's 50k vocabulary the last stage would carry the head and run ~5x longer than the first.
MODEL = [
    "model.n_layers=8",
    "model.hidden_size=384",
    "model.n_heads=6",
    "model.seq_length=128",
    "parallel.partition_method=type:Block",
]


def tokens(workdir: Path) -> tuple[str, str]:
    """The sample corpus as byte-level tokens, with the .tiktoken rank file that defines them."""
    import base64

    ranks = workdir / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    prefix = workdir / "sample-bytes"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "preprocess.py"),
            str(ROOT / "data" / "sample" / "austen.jsonl.gz"),
            "--output",
            str(prefix),
            "--tokenizer",
            str(ranks),
        ],
        check=True,
        capture_output=True,
    )
    return str(prefix), str(ranks)


def run(
    workdir: Path, pp: int, micro_batches: int, global_batch: int, steps: int, data: tuple[str, str]
) -> dict:
    out = workdir / f"pp{pp}-m{micro_batches}"
    script = str(ROOT / "launch" / "train.py")
    cmd = (
        [sys.executable, script]
        if pp == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={pp}", script]
    )
    sets = [
        *MODEL,
        f"data.train_paths=[{data[0]}]",
        f"data.tokenizer={data[1]}",
        f"parallel.pp={pp}",
        f"batch.global_batch_size={global_batch}",
        f"batch.grad_accum={micro_batches}",
        f"schedule.iterations={steps}",
        "schedule.warmup=1",
        "eval.interval=0",
        "logging.interval=2",
        "checkpoint.resume=false",
        "checkpoint.save_interval=0",
        f"logging.dir={out}",
        f"checkpoint.dir={out}/ckpt",
    ]
    cmd += [str(ROOT / "ds_configs" / "models" / "tiny.yml")] + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    records = (
        [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if (out / "metrics.jsonl").exists()
        else []
    )
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # drop the warm-up interval
    if proc.returncode != 0 and not any(r.get("event") == "end" for r in records):
        raise RuntimeError(f"pp={pp} m={micro_batches} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {
        "pp": pp,
        "micro_batches": micro_batches,
        "micro_batch_size": global_batch // micro_batches,
        "tokens_per_s": statistics.median(rates),
        "intervals": rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    env = environment()
    env["command"] = command_line()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = tokens(Path(tmp))
        for m in args.micro_batches:  # pp = 1 and pp = 2 side by side for each m
            for pp in (1, 2):
                r = run(Path(tmp), pp, m, args.global_batch, args.steps, data)
                results.append(r)
                print(f"pp={pp} micro-batches={m}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows = []
    for m in args.micro_batches:
        one = next(r for r in results if r["pp"] == 1 and r["micro_batches"] == m)
        two = next(r for r in results if r["pp"] == 2 and r["micro_batches"] == m)
        bubble = 1 / (m + 1)
        rows.append(
            [
                m,
                one["micro_batch_size"],
                f"{one['tokens_per_s']:,.0f}",
                f"{two['tokens_per_s']:,.0f}",
                f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}",
                f"{bubble:.0%}",
            ]
        )
    record = dict(
        env, name="pipeline", model=MODEL, global_batch=args.global_batch, steps=args.steps, results=results
    )
    md = "\n\n".join(
        [
            "# Pipeline bubble: pp = 2 vs pp = 1 as micro-batches grow",
            "{environment}",
            f"Model: {' '.join(MODEL)}; global batch {args.global_batch} sequences of 128 tokens; fp32, ZeRO-0; "
            f"{args.steps} steps per run, median tokens/s over the logged 2-step intervals after the first. "
            "Byte-level tokens (vocabulary 384 after padding) keep the output layer small: each stage holds 4 "
            "blocks and does about the same work.",
            markdown_table(
                [
                    "micro-batches m",
                    "micro-batch size",
                    "pp=1 tokens/s",
                    "pp=2 tokens/s",
                    "pp2 / pp1",
                    "ideal bubble (p-1)/(m+p-1)",
                ],
                rows,
            ),
            "How to read: with one micro-batch the second stage waits for the first (half of each step idle); "
            "as m grows the bubble shrinks and the pp = 2 throughput rises toward its no-bubble rate. pp = 1 also "
            "changes with m (smaller micro-batches use the cores less well), so the ratio column is the one to "
            "compare.",
        ]
    )
    json_path, md_path = write_record("pipeline", record, md)
    print(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
