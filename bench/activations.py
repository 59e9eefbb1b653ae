"""Benchmark: activation memory per layer for recomputation none / full / selective, with and without
sequence parallelism, beside the theory of Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", section 4).

    python bench/activations.py                       # Pythia-410M's layer, seq 2048, bf16: tp 1, tp 2, tp 2 + SP
    python bench/activations.py --seq 1024 --cases 1,2sp --modes none,selective

What is measured. Each case is a fresh job of tp local processes (gloo, CPU) with glibc's mmap threshold fixed
at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor above that size is its own mapping, returned to the system
when freed: the process's resident memory follows the live tensors. Each rank builds neo's model (bf16, the
paper's 2-byte activations; dropout 0.1 everywhere, as the paper counts its masks), runs one warm-up step (so
the gradients exist), and then measures a second:

  stored   resident memory after the forward (loss computed) minus before it: what autograd keeps for backward
  peak     the high-water mark over forward and backward (reset through /proc/self/clear_refs) minus before

Per layer is (value with 4 blocks - value with 2 blocks) / 2: the embedding, head and loss cancel out.

The theory, per layer, in bytes (s sequence, b batch, h hidden, a heads, t tensor-parallel ranks):

  none        s b h (10 + 24/t + 5 a s / (h t))    with sequence parallelism:  s b h (34 + 5 a s / h) / t
  selective   s b h (10 + 24/t)                                                 s b h 34 / t
  full        2 s b h (each block's input)                                      2 s b h / t

neo's layer differs from the paper's in two small ways, both within the comparison's 15%: GPT-NeoX's parallel
residual feeds both norms the same input and has one residual dropout (-3 sbh), and rotary keeps the unrotated
queries and keys alive (they share storage with the values: +4 sbh). Writes
bench/results/activations-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import common

THEORY = {  # bytes per s*b*h, from (t, a*s/h) - the formulas of the module docstring
    ("none", False): lambda t, r: 10 + 24 / t + 5 * r / t,
    ("none", True): lambda t, r: (34 + 5 * r) / t,
    ("selective", False): lambda t, r: 10 + 24 / t,
    ("selective", True): lambda t, r: 34 / t,
    ("full", False): lambda t, r: 2.0,
    ("full", True): lambda t, r: 2.0 / t,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="ds_configs/models/pythia-410m.yml", help="the layer's shape (a neo config)"
    )
    p.add_argument("--seq", type=int, default=2048, help="sequence length")
    p.add_argument("--modes", default="none,full,selective", help="parallel.activation_checkpoint values")
    p.add_argument(
        "--cases", default="1,2,2sp", help="tensor-parallel sizes; a trailing 'sp': sequence parallel"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="attention and hidden dropout")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-record", action="store_true", help="print only; write no files")
    return p.parse_args(argv)


def _memory() -> tuple[int, int]:
    """(resident bytes, high-water mark bytes) of this process."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            values[line[:5]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _settle() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    return _memory()[0]


def _rank(rank: int, world: int, init: str, out: str, shape: dict, case: dict) -> None:
    import torch
    import torch.distributed as dist

    from neo.model.args import ModelArgs
    from neo.model.gpt import GPT

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = dist.group.WORLD if world > 1 else None
    args = ModelArgs(**dict(shape, n_layers=case["layers"]))
    model = GPT(args, tp_group=group, seed=1, recompute=case["mode"], sequence_parallel=case["sp"])
    model = model.to(torch.bfloat16).train()
    tokens = torch.randint(
        0, args.vocab_size, (1, case["seq"] + 1), generator=torch.Generator().manual_seed(0)
    )
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    model(inputs, labels).backward()  # warm-up: the gradients exist from here on
    before = _settle()
    loss = model(inputs, labels)
    stored = _memory()[0] - before
    loss.backward()
    peak = _memory()[1] - before
    Path(out, f"{rank}.json").write_text(json.dumps({"stored": stored, "peak": peak}))
    dist.barrier()
    dist.destroy_process_group()


def run_case(shape: dict, case: dict) -> dict:
    """One job of ``case['tp']`` processes; each rank's bytes (rank 0's are reported: the ranks agree)."""
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks (see the docstring)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(case["tp"], os.path.join(tmp, "init"), tmp, shape, case),
                           nprocs=case["tp"], join=True, start_method="spawn")  # fmt: skip
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(case["tp"])]
    return {"stored": ranks[0]["stored"], "peak": ranks[0]["peak"], "ranks": ranks}


def layer_shape(model_file: str, seq: int, dropout: float) -> dict:
    from dataclasses import fields

    from neo.config import load_config
    from neo.model.args import ModelArgs

    m = load_config([str(common.ROOT / model_file)], world_size=1).model
    shape = {f.name: getattr(m, f.name) for f in fields(ModelArgs)}
    # a small vocabulary: the head cancels out of the per-layer figure, and a 50k one only slows the run
    shape.update(vocab_size=1024, seq_length=seq, max_position_embeddings=max(seq, m.max_positions),
                 attention_dropout=dropout, hidden_dropout=dropout)  # fmt: skip
    return shape


def main(argv=None) -> int:
    a = parse_args(argv)
    shape, env = layer_shape(a.model, a.seq, a.dropout), common.environment()
    sbh, ratio = a.seq * shape["hidden_size"], shape["n_heads"] * a.seq / shape["hidden_size"]
    rows, results = [], []
    for spec in a.cases.split(","):
        tp, sp = int(spec.rstrip("sp")), spec.endswith("sp")
        for mode in a.modes.split(","):
            started, got = time.perf_counter(), {}
            for layers in (2, 4):
                got[layers] = run_case(shape, dict(tp=tp, sp=sp, mode=mode, layers=layers, seq=a.seq))
            per_layer = {k: (got[4][k] - got[2][k]) / 2 for k in ("stored", "peak")}
            theory = THEORY[(mode, sp)](tp, ratio) * sbh
            result = dict(tp=tp, sequence_parallel=sp, mode=mode, per_layer=per_layer, theory=theory,
                          measured_over_theory=per_layer["stored"] / theory, raw=got,
                          seconds=round(time.perf_counter() - started, 1))  # fmt: skip
            results.append(result)
            rows.append([f"{tp}{' + SP' if sp else ''}", mode, f"{per_layer['stored'] / 2**20:.1f}",
                         f"{theory / 2**20:.1f}", f"{result['measured_over_theory']:.3f}",
                         f"{got[4]['peak'] / 2**20:.0f}"])  # fmt: skip
            print(
                f"bench: tp {rows[-1][0]:8s} {mode:9s} stored {rows[-1][2]:>8s} MiB/layer, theory "
                f"{rows[-1][3]:>8s} MiB ({rows[-1][4]}), peak of 4 blocks {rows[-1][5]} MiB",
                flush=True,
            )
    return _record(a, shape, env, rows, results)


def _record(a, shape: dict, env: dict, rows: list, results: list) -> int:
    table = common.markdown_table(["tp", "recompute", "stored MiB/layer", "theory MiB/layer", "measured / theory",
                                   "peak, 4 blocks, MiB"], rows)  # fmt: skip
    worst = max(abs(r["measured_over_theory"] - 1) for r in results)
    stored = {(r["tp"], r["sequence_parallel"], r["mode"]): r["per_layer"]["stored"] for r in results}
    split = [f"{mode}: tp 1 {stored[1, False, mode] / 2**20:.1f} MiB, tp {t} {stored[t, False, mode] / 2**20:.1f} "
             f"(1/{stored[1, False, mode] / stored[t, False, mode]:.2f}), tp {t} + SP {stored[t, True, mode] / 2**20:.1f} "
             f"(1/{stored[1, False, mode] / stored[t, True, mode]:.2f})"
             for (t, sp, mode) in stored if sp and (1, False, mode) in stored and (t, False, mode) in stored]  # fmt: skip
    per_rank = ("Per rank, per layer, against one process:\n\n" + "\n".join(f"- {line}" for line in split)
                + "\n\n") if split else ""  # fmt: skip
    md = (f"# Activation memory per layer, {env['date']}\n\n`{common.command_line()}`\n\n"
          f"{Path(a.model).name} layer (h {shape['hidden_size']}, {shape['n_heads']} heads), seq {a.seq}, "
          f"micro-batch 1, bf16, dropout {a.dropout}. Stored: what autograd keeps after the forward, per layer (4 "
          f"blocks minus 2, halved). Theory: "
          f"Korthikanti et al. 2022 (see bench/activations.py). Peak: the high-water mark of the 4-block model over "
          f"forward and backward (with full recomputation: the stored inputs + one block recomputed).\n\n{table}\n\n"
          f"Largest deviation from theory: {worst:.1%}.\n\n{per_rank}{{environment}}\n")  # fmt: skip
    print(md.replace("{environment}", ""))
    if not a.no_record:
        record = dict(
            env, command=common.command_line(), model=a.model, seq=a.seq, shape=shape, results=results
        )
        paths = common.write_record("activations", record, md, a.out)
        print(f"bench: wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
