"""Benchmark: bytes of model state per rank for tp = 1 and 2, ZeRO 0-3, dp = 2, from the live tensors.

    python bench/memory.py                           # tp1 x dp2 and tp2 x dp2, ZeRO 0-3, bf16 and fp32 (~4 min)
    python bench/memory.py --dtypes bf16 --stages 1,3 --layouts 2x2

Each case is a fresh job of tp x dp local processes (torch.multiprocessing, gloo, CPU) in which every
rank builds neo's real Trainer (bench/common.py: build_trainer), trains one step so the AdamW state
exists, runs the forward and backward of a second, and then, before its optimizer step, adds up:

  params      module parameters actually resident: each parameter's data, plus under ZeRO-3 its
              partition ``p.ds_tensor`` (the full data is then freed, except small "persistent" ones)
  grads       gradient tensors held after backward: ``p.grad`` and ZeRO's gradient partitions
  master      fp32 master weights: the tensors the inner torch AdamW updates, where they are not the
              module's own parameters (fp32 ZeRO-0 updates the parameters themselves: no master)
  adam        the AdamW state of those tensors (exp_avg, exp_avg_sq, step)
  buffers     other tensors the ZeRO optimizer holds whose owning attribute is a communication bucket

grads and buffers come from a walk of every tensor reachable from the DeepSpeed optimizer object,
counted once per storage and minus the other categories. Expected ratios (fractions of the same
quantity for the whole unsplit model, Psi parameters; b = 4 bytes fp32, 2 bf16):

  params  Psi b:   1/tp;  ZeRO-3: 1/(tp dp)
  grads   Psi b:   1/tp;  ZeRO >= 2: 1/(tp dp)
  master  4 Psi:   1/tp;  ZeRO >= 1: 1/(tp dp)   (fp32 with ZeRO-0: 0)
  adam    8 Psi:   1/tp;  ZeRO >= 1: 1/(tp dp)

Writes bench/results/memory-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import common

from neo.distributed import free_port

CATEGORIES = ("params", "grads", "master", "adam", "buffers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1x2,2x2", help="comma list of TPxDP (processes = tp * dp)")
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE.yml",
        help="neo config files applied over the default ~20M shape (repeatable)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="neo config override (repeatable)",
    )
    p.add_argument(
        "--seq",
        type=int,
        default=64,
        help="sequence length of the two steps (memory of model "
        "state does not depend on it; short keeps the run fast)",
    )
    p.add_argument("--timeout-minutes", type=int, default=5, help="collective timeout of each job")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-record", action="store_true", help="print only; write no files")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- measuring one rank


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj, found: dict, seen: set, path: str = "", depth: int = 0) -> None:
    """Every tensor storage reachable from ``obj`` through DeepSpeed / torch.optim objects, lists and
    dicts: ``found[data_ptr] = (nbytes, attribute path)``. Modules are not entered (their parameters are
    counted from the module itself)."""
    import torch

    if depth > 10 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.untyped_storage().nbytes():
            ptr, nbytes = _storage(obj)
            if nbytes > found.get(ptr, (0, ""))[0]:
                found[ptr] = (nbytes, path)
        if obj.grad is not None:
            _walk(obj.grad, found, seen, path + ".grad", depth + 1)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, found, seen, f"{path}[{str(key)[:24]}]", depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for i, value in enumerate(obj):
            _walk(value, found, seen, f"{path}[{i}]", depth + 1)
    elif (
        hasattr(obj, "__dict__")
        and not isinstance(obj, (torch.nn.Module, type))
        and type(obj).__module__.startswith(("deepspeed", "torch.optim", "neo"))
    ):
        for key, value in vars(obj).items():
            _walk(value, found, seen, f"{path}.{key}", depth + 1)


def measure(engine) -> dict:
    """Bytes per category on this rank (see the module docstring), and what the optimizer is."""
    import torch

    params, param_ptrs = 0, set()
    for p in engine.module.parameters():
        for t in (p, getattr(p, "ds_tensor", None)):  # ZeRO-3: the partition; p.data is then empty
            if t is not None and t.numel():
                params += t.numel() * t.element_size()
                param_ptrs.add(_storage(t)[0])
    chain, inner = [type(engine.optimizer).__name__], engine.optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
        chain.append(type(inner).__name__)
    adam, master, state_ptrs = 0, 0, set()
    for key, state in inner.state.items():
        for t in state.values():
            if torch.is_tensor(t):
                adam += t.numel() * t.element_size()
                state_ptrs.add(_storage(t)[0])
        if torch.is_tensor(key) and _storage(key)[0] not in param_ptrs:
            master += key.numel() * key.element_size()
            state_ptrs.add(_storage(key)[0])
    found: dict = {}
    seen: set = set()
    _walk(engine.optimizer, found, seen, "optimizer")
    for name, p in engine.module.named_parameters():
        for t in (p.grad, getattr(getattr(p, "ds_tensor", None), "grad", None)):
            if t is not None:
                _walk(t, found, seen, f"module.{name}.grad")
    grads = buffers = 0
    largest = []
    for ptr, (nbytes, path) in found.items():
        if ptr in param_ptrs or ptr in state_ptrs:
            continue
        if "bucket" in path.lower():
            buffers += nbytes
        else:
            grads += nbytes
        largest.append((nbytes, path))
    largest.sort(reverse=True)
    return {
        "params": params,
        "grads": grads,
        "master": master,
        "adam": adam,
        "buffers": buffers,
        "optimizer": " > ".join(chain),
        "other_tensors": [{"bytes": b, "path": p} for b, p in largest[:6]],
    }


def worker(local_rank: int, case: dict, port: int, out_dir: str) -> None:
    """One rank of one case: build, one step, a second forward/backward, measure, write JSON."""
    world = case["tp"] * case["dp"]
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
        DS_ACCELERATOR="cpu",
    )
    import torch

    from neo import distributed
    from neo.config import load_config

    env = distributed.init(collective_timeout=60 * case["timeout_minutes"])
    cfg = load_config(case["configs"], case["overrides"], world_size=world)
    trainer = common.build_trainer(cfg, env)
    engine, topo = trainer.engine, trainer.topo
    tp_local = sum(p.numel() for p in engine.module.parameters()) if cfg.zero.stage < 3 else None
    g = torch.Generator().manual_seed(env.rank // topo.tp)  # same batch within a TP group, as a dataset gives
    batch = torch.randint(
        0, cfg.model.vocab_size, (cfg.batch.micro_batch_size, cfg.model.seq_length + 1), generator=g
    )
    for step in range(2):
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        if step == 1:
            result = measure(engine)
        engine.step()
    result.update(rank=env.rank, coord=vars(topo.coord), loss=loss.item(), tp_local_params=tp_local)
    with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.shutdown(0)


# --------------------------------------------------------------------------- running the cases


def run_case(case: dict) -> dict:
    """Run one case as a fresh job of tp x dp processes; its per-rank results, or the error it ended with.

    A job whose ranks all wrote their results but that then died at exit (gloo's worker threads
    sometimes abort the interpreter at shutdown) still counts; the record keeps the exit error beside it.
    """
    import torch.multiprocessing as mp

    world = case["tp"] * case["dp"]
    t0 = time.perf_counter()
    exit_error = None
    with tempfile.TemporaryDirectory(prefix="neo-memory-") as tmp:
        try:
            mp.spawn(worker, args=(case, free_port(), tmp), nprocs=world, join=True)
        except Exception as e:  # noqa: BLE001 - a failing layout is a result to record, not the end of the run
            exit_error = (str(e).strip() or traceback.format_exc())[-3000:]
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    seconds = round(time.perf_counter() - t0, 1)
    if len(ranks) != world:
        return {
            "error": exit_error or f"only {len(ranks)} of {world} ranks wrote results",
            "ranks_done": len(ranks),
            "seconds": seconds,
        }
    out = {"ranks": sorted(ranks, key=lambda r: r["rank"]), "seconds": seconds}
    if exit_error:
        out["exit_error"] = exit_error
    return out


def expected_ratios(tp: int, dp: int, stage: int, dtype: str) -> dict[str, float]:
    full, split = 1 / tp, 1 / (tp * dp)
    return {
        "params": split if stage >= 3 else full,
        "grads": split if stage >= 2 else full,
        "master": 0.0 if (dtype == "fp32" and stage == 0) else (split if stage >= 1 else full),
        "adam": split if stage >= 1 else full,
    }


def reference_bytes(total_params: int, dtype: str) -> dict[str, int]:
    b = 4 if dtype == "fp32" else 2
    return {
        "params": total_params * b,
        "grads": total_params * b,
        "master": total_params * 4,
        "adam": total_params * 8,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the cases are CPU/gloo jobs; set before torch is imported
    from neo.config import load_config, to_dict
    from neo.model.gpt import parameter_count

    record = common.environment()
    layouts = [tuple(int(x) for x in item.lower().split("x")) for item in args.layouts.split(",")]
    base = [
        *common.DEFAULT_MODEL,
        *common.BENCH_SETTINGS,
        f"model.seq_length={args.seq}",
        "batch.micro_batch_size=1",
    ]
    cfg = load_config(args.config, [*base, *args.overrides], world_size=1)
    total = parameter_count(cfg.model)["total"]
    print(
        f"bench: {total / 1e6:.2f}M parameters; layouts {layouts}, ZeRO {args.stages}, {args.dtypes}",
        flush=True,
    )

    cases = []
    for dtype in args.dtypes.split(","):
        for tp, dp in layouts:
            for stage in (int(s) for s in args.stages.split(",")):
                case = {
                    "tp": tp,
                    "dp": dp,
                    "zero": stage,
                    "dtype": dtype,
                    "timeout_minutes": args.timeout_minutes,
                    "configs": args.config,
                    "overrides": [
                        *base,
                        *args.overrides,
                        f"parallel.tp={tp}",
                        f"zero.stage={stage}",
                        f"precision.dtype={dtype}",
                    ],
                }
                outcome = run_case(case)
                case.update(
                    outcome,
                    expected=expected_ratios(tp, dp, stage, dtype),
                    reference_bytes=reference_bytes(total, dtype),
                )
                if "ranks" in outcome:
                    worst = {k: max(r[k] for r in outcome["ranks"]) for k in CATEGORIES}
                    case["max_over_ranks"] = worst
                    case["ratios"] = {k: worst[k] / case["reference_bytes"][k] for k in case["expected"]}
                    status = ", ".join(f"{k} {worst[k] / 2**20:.1f} MB" for k in CATEGORIES)
                else:
                    status = "FAILED: " + outcome["error"].strip().splitlines()[-1][:200]
                print(
                    f"bench: {dtype} tp{tp} x dp{dp} ZeRO-{stage} ({outcome['seconds']} s): {status}",
                    flush=True,
                )
                cases.append(case)

    record.update(
        benchmark="memory",
        device="cpu (gloo)",
        config={"neo": to_dict(cfg), "parameters": total, "seq_length": args.seq, "micro_batch_size": 1},
        cases=cases,
    )
    text = markdown(record)
    print(text.replace("{environment}", common.environment_markdown(record)))
    if not args.no_record:
        paths = common.write_record("memory", record, text, args.out)
        print("bench: wrote " + ", ".join(str(p) for p in paths))
    return 0 if all("ranks" in c for c in cases) else 1


# --------------------------------------------------------------------------- reporting


def _mb(x: float) -> str:
    return f"{x / 2**20:,.1f}"


# Why DeepSpeed 0.19 departs from the ZeRO paper's formulas, where it does (checked against its source).
EXPLANATIONS = {
    (
        "grads",
        1,
    ): "ZeRO-1 grads below 1/tp: DeepSpeed 0.19 runs stage 1 through stage 2's code (stage_1_and_2.py); "
    "at an accumulation boundary (every step here: grad_accum 1) backward hooks move each gradient "
    "into a bucket, reduce it and keep only this rank's partition, so after backward only the "
    "partition remains.",
    ("params", 3): "ZeRO-3 params above 1/(tp dp): parameters under stage3_param_persistence_threshold (1e5 "
    "elements) stay whole on every rank: biases and norms, and with tp 2 also the 384 x 192 "
    "attention output projections.",
}


def deviations(cases: list[dict]) -> list[str]:
    """One line per (quantity, ZeRO stage) whose measured ratio misses the formula, with the reason."""
    seen: dict[tuple, list[str]] = {}
    for c in cases:
        if "ranks" not in c:
            continue
        for k, want in c["expected"].items():
            got = c["ratios"][k]
            if abs(got - want) > 0.01:
                seen.setdefault((k, c["zero"]), []).append(
                    f"{c['dtype']} {c['tp']}x{c['dp']}: {got:.3f} vs {want:.3f}"
                )
    return [
        f"{EXPLANATIONS.get(key, f'{key[0]} at ZeRO-{key[1]}: not explained')} ({'; '.join(where)})"
        for key, where in seen.items()
    ]


def markdown(r: dict) -> str:
    m = r["config"]["neo"]["model"]
    total = r["config"]["parameters"]
    out = [
        f"# memory benchmark, {r['date']}",
        "",
        "{environment}",
        "",
        "## Setup",
        "",
        f"- model: {total / 1e6:.2f}M parameters (Psi): {m['n_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['n_heads']} heads, vocab {m['vocab_size']}; micro batch 1 x seq {r['config']['seq_length']}",
        "- each case: tp x dp local processes (gloo, CPU), each building neo's Trainer; one training step, "
        "then the forward and backward of a second; measured on every rank before its optimizer step",
        "- params: resident module parameters (ZeRO-3: the `ds_tensor` partition + parameters kept whole); grads: "
        "`p.grad` and ZeRO gradient partitions; master: fp32 tensors AdamW updates that are not the module's "
        "parameters; adam: exp_avg + exp_avg_sq (+ step); buffers: ZeRO communication buckets",
        "- each cell: MB on the largest rank, then measured / expected fraction of the same quantity for the "
        "whole model (params and grads Psi x bytes of the dtype, master 4 Psi, adam 8 Psi)",
        "- expected: params 1/tp (ZeRO-3: 1/(tp dp)); grads 1/tp (ZeRO>=2: 1/(tp dp)); master and adam 1/tp "
        "(ZeRO>=1: 1/(tp dp)); fp32 ZeRO-0 has no master copy",
        "",
    ]
    failures = []
    for dtype in dict.fromkeys(c["dtype"] for c in r["cases"]):
        out += [f"## {dtype}", ""]
        rows = []
        for c in (c for c in r["cases"] if c["dtype"] == dtype):
            head = [f"{c['tp']} x {c['dp']}", c["zero"]]
            if "ranks" not in c:
                rows.append(head + ["failed (see below)"] + [""] * 6)
                failures.append(c)
                continue
            w = c["max_over_ranks"]
            cells = [
                f"{_mb(w[k])} ({c['ratios'][k]:.3f} / {c['expected'][k]:.3f})"
                for k in ("params", "grads", "master", "adam")
            ]
            rows.append(
                head
                + cells
                + [_mb(w["buffers"]), _mb(sum(w.values())), c["ranks"][0]["optimizer"].split(" > ")[0]]
            )
        out.append(
            common.markdown_table(
                [
                    "tp x dp",
                    "ZeRO",
                    "params MB (meas / exp)",
                    "grads MB (meas / exp)",
                    "fp32 master MB (meas / exp)",
                    "adam MB (meas / exp)",
                    "buffers MB",
                    "total MB",
                    "DeepSpeed optimizer",
                ],
                rows,
            )
        )
        out.append("")
    tp_shares = {
        c["tp"]: c["ranks"][0]["tp_local_params"] / total
        for c in r["cases"]
        if "ranks" in c and c["ranks"][0].get("tp_local_params")
    }
    if tp_shares:
        out += [
            "TP-local share of the parameters on one rank (before ZeRO): "
            + ", ".join(f"tp {tp}: {share:.4f}" for tp, share in sorted(tp_shares.items()))
            + " (LayerNorm gains/biases and row-parallel output biases are replicated, so a little over 1/tp).",
            "",
        ]
    notes = deviations(r["cases"])
    if notes:
        out += (
            ["## Where measured and expected differ (by more than 0.01)", ""]
            + [f"- {n}" for n in notes]
            + [""]
        )
    buffers = [c for c in r["cases"] if "ranks" in c and c["max_over_ranks"]["buffers"]]
    if buffers:
        big = max(buffers, key=lambda c: c["max_over_ranks"]["buffers"])
        path = next(
            (t["path"] for t in big["ranks"][0]["other_tensors"] if "bucket" in t["path"].lower()), "?"
        )
        out += [
            "## Buffers",
            "",
            f"- ZeRO-3 allocates its gradient-reduction bucket up front (`{path}`, with contiguous_gradients): "
            f"zero.reduce_bucket_size = {r['config']['neo']['zero']['reduce_bucket_size']:,} elements of the "
            f"model dtype per rank, {_mb(big['max_over_ranks']['buffers'])} MB here, whatever the model size. "
            "On a GPU the caching allocator holds all of it; on a CPU untouched pages of the `torch.empty` are "
            "not resident. A smaller zero.reduce_bucket_size shrinks it proportionally.",
            "",
        ]
    if failures:
        out += ["## Failures", ""]
        for c in failures:
            out += [
                f"### {c['dtype']} tp {c['tp']} x dp {c['dp']}, ZeRO-{c['zero']}",
                "",
                "```",
                c["error"].strip()[-2000:],
                "```",
                "",
            ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
