"""Benchmark: tokens/s of launch/preprocess.py (1 and 2 workers) against plain tiktoken loops, side by side.

    python bench/preprocess.py                    # builds ~48 MB of JSONL from the sample corpus in /tmp
    python bench/preprocess.py --input big.jsonl  # or any JSONL with a "text" field

Every method reads and parses the same JSONL and tokenizes with the same gpt2 encoding; the rounds
are interleaved and the median is reported, since only ratios measured in one run mean anything.
  plain loop    one process: for each line, json.loads, encode_ordinary
  batch         one process: encode_ordinary_batch(num_threads=1 or 2) over 1000-document batches
  preprocess    `python launch/preprocess.py --workers N` (its own timer, so interpreter start-up and
                tokenizer loading are excluded as for the loops; wall time including them is shown too)
Writes bench/results/preprocess-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, environment, write_record

from neo.data.tokenizer import load_tokenizer

SAMPLE = ROOT / "data" / "sample" / "austen.jsonl.gz"


def make_input(path: Path, mb: float) -> None:
    """Repeat the sample corpus up to `mb` MB; each copy shifts every chapter's paragraphs, so no
    document repeats exactly."""
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    size, copy = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while size < mb * 1e6:
            for d in docs:
                paras = d["text"].split("\n\n")
                k = copy % len(paras)
                line = json.dumps({"text": "\n\n".join(paras[k:] + paras[:k]), "copy": copy}) + "\n"
                out.write(line)
                size += len(line.encode())
            copy += 1


def plain_loop(path: Path, enc) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += len(enc.encode_ordinary(json.loads(line)["text"])) + 1
    return n


def batched(path: Path, enc, threads: int) -> int:
    n, batch = 0, []
    with open(path, "rb") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                n += sum(len(x) + 1 for x in enc.encode_ordinary_batch(batch, num_threads=threads))
                batch = []
    return n + sum(len(x) + 1 for x in enc.encode_ordinary_batch(batch, num_threads=threads))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its children (Linux /proc); processes may vanish meanwhile."""
    total = 0
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(name) == pid or int(fields[1]) == pid:
            total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return total


def run_cli(path: Path, out: Path, workers: int) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "preprocess.py"),
        str(path),
        "-o",
        str(out),
        "--workers",
        str(workers),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    stdout = proc.communicate()[0]
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout}")
    m = re.search(r"done in ([\d.]+) s: .* -> ([\d,]+) tokens", stdout)
    tokens, seconds = int(m.group(2).replace(",", "")), float(m.group(1))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "wall_seconds": wall,
        "peak_rss_mb": peak[0] / 1e6,
        "command": " ".join(cmd),
    }


def idle_share(seconds: float = 3.0) -> float:
    """Fraction of CPU time idle over a short window (Linux /proc/stat): other work skews the ratios."""

    def snap():
        with open("/proc/stat") as f:
            v = list(map(int, f.readline().split()[1:]))
        return v[3] + v[4], sum(v)

    a = snap()
    time.sleep(seconds)
    b = snap()
    return round((b[0] - a[0]) / max(b[1] - a[1], 1), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--input", type=Path, help="JSONL with a 'text' field (default: built from the sample corpus)"
    )
    ap.add_argument("--mb", type=float, default=48, help="size of the generated input (default: 48 MB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--flat-x",
        type=int,
        default=5,
        help="also run 2 workers once on the input repeated this many times, to show memory stays flat",
    )
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import numpy
    import tiktoken

    tmp = Path(tempfile.mkdtemp(prefix="neo-bench-"))
    path = args.input or tmp / "corpus.jsonl"  # the generated input is removed at the end
    if not args.input:
        make_input(path, args.mb)
    mb = path.stat().st_size / 1e6
    with open(path, "rb") as f:
        n_docs = sum(1 for _ in f)
    enc = load_tokenizer("gpt2").encoding
    methods = {
        "plain loop (encode_ordinary)": lambda: {"tokens": plain_loop(path, enc)},
        "encode_ordinary_batch, 1 thread": lambda: {"tokens": batched(path, enc, 1)},
        "encode_ordinary_batch, 2 threads": lambda: {"tokens": batched(path, enc, 2)},
        "preprocess.py --workers 1": lambda: run_cli(path, tmp / "w1", 1),
        "preprocess.py --workers 2": lambda: run_cli(path, tmp / "w2", 2),
    }
    idle_before = idle_share()
    runs: dict[str, list[dict]] = {k: [] for k in methods}
    for r in range(args.rounds):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            res = fn()
            res.setdefault("seconds", time.perf_counter() - t0)
            res["tokens_per_s"] = res["tokens"] / res["seconds"]
            runs[name].append(res)
            print(f"round {r + 1}: {name:34s} {res['tokens_per_s'] / 1e6:6.2f} M tokens/s", flush=True)
    tokens = {runs[k][0]["tokens"] for k in runs}
    assert len(tokens) == 1, f"methods disagree on the token count: {tokens}"
    base = statistics.median(x["tokens_per_s"] for x in runs["plain loop (encode_ordinary)"])
    rows = []
    for name, rs in runs.items():
        tps = statistics.median(x["tokens_per_s"] for x in rs)
        row = {
            "method": name,
            "tokens_per_s": tps,
            "vs_plain_loop": tps / base,
            "seconds": statistics.median(x["seconds"] for x in rs),
        }
        if "wall_seconds" in rs[0]:
            row |= {
                "wall_seconds": statistics.median(x["wall_seconds"] for x in rs),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
                "command": rs[0]["command"],
            }
        rows.append(row)
    by = {r["method"]: r for r in rows}
    memory = None
    if args.flat_x > 1:
        big = tmp / "big.jsonl"
        with open(big, "wb") as out:
            for _ in range(args.flat_x):
                out.write(path.read_bytes())
        r = run_cli(big, tmp / "big", 2)
        memory = {
            "input_mb": round(big.stat().st_size / 1e6, 1),
            "peak_rss_mb": round(r["peak_rss_mb"]),
            "base_input_mb": round(mb, 1),
            "base_peak_rss_mb": round(by["preprocess.py --workers 2"]["peak_rss_mb"]),
        }
    shutil.rmtree(tmp, ignore_errors=True)
    env = environment()
    env["hardware"]["cpu_idle_before_after"] = [idle_before, idle_share()]
    env["versions"].update(tiktoken=tiktoken.__version__, numpy=numpy.__version__)
    record = {
        "benchmark": "preprocess",
        **env,
        "input": {
            "path": str(path),
            "mb": round(mb, 1),
            "documents": n_docs,
            "tokens": tokens.pop(),
            "generated_from_sample": not args.input,
        },
        "rounds": args.rounds,
        "results": rows,
        "memory": memory,
        "targets": {
            "2 workers >= 1.7x plain loop": by["preprocess.py --workers 2"]["vs_plain_loop"] >= 1.7,
            "plain loop >= encode_ordinary_batch 1 thread": by["plain loop (encode_ordinary)"]["tokens_per_s"]
            >= by["encode_ordinary_batch, 1 thread"]["tokens_per_s"],
        },
    }
    json_path, md_path = write_record("preprocess", record, _markdown(record), args.results)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path.name}")


def _markdown(r: dict) -> str:
    lines = [
        f"# preprocess benchmark, {r['date']}",
        "",
        "{environment}",
        f"- input: {r['input']['mb']} MB JSONL, {r['input']['documents']:,} documents, {r['input']['tokens']:,} "
        f"gpt2 tokens ({'generated from data/sample' if r['input']['generated_from_sample'] else r['input']['path']})",
        "- CPU idle in the 3 s before/after: {:.0%} / {:.0%} (other work on the machine skews the ratios)".format(
            *r["hardware"]["cpu_idle_before_after"]
        ),
        f"- median of {r['rounds']} interleaved rounds; preprocess seconds are its own timer (after start-up "
        "and tokenizer load, as for the loops); wall includes the interpreter start-up",
        "",
        "| method | M tokens/s | vs plain loop | seconds | wall s | peak RSS (MB, all processes) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for x in r["results"]:
        wall, rss = (
            (f"{x['wall_seconds']:.2f}", f"{x['peak_rss_mb']:.0f}") if "wall_seconds" in x else ("-", "-")
        )
        lines.append(
            f"| {x['method']} | {x['tokens_per_s'] / 1e6:.2f} | {x['vs_plain_loop']:.2f}x | {x['seconds']:.2f} | "
            f"{wall} | {rss} |"
        )
    if r["memory"]:
        m = r["memory"]
        lines += [
            "",
            f"Memory (2 workers, all processes): peak RSS {m['base_peak_rss_mb']} MB on the "
            f"{m['base_input_mb']} MB input, {m['peak_rss_mb']} MB on the same input repeated to "
            f"{m['input_mb']} MB.",
        ]
    lines += [
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in r["targets"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
