"""The record of bench/train_step.py: per-variant statistics, the ratios the issue asks for, the markdown.

Kept apart from the bench itself so that each file reads in one sitting; nothing here imports torch.
"""

from __future__ import annotations

import statistics

import common

# Thresholds from issue 19: neo (DeepSpeed) >= 1.3x transformers; DeepSpeed's step <= 5% slower than the
# plain loop (both measured on the quickstart shape, fp32, CPU).
TARGET_VS_HF = 1.3
TARGET_DS_OVERHEAD = 0.05


def clean(v, i: int, threads: int, share: float) -> bool:
    """Whether block ``i`` ran with the cores to itself.

    On a shared CPU another busy process makes one of our two OpenMP threads wait for the other at every
    parallel region: the block runs 3-6x slower at a CPU share of ~0.5 (measured), so such blocks say
    nothing about the code. Quiet blocks run at a share of ~0.97-1.0. On a GPU every block counts.
    """
    return threads == 0 or v.cpu_seconds[i] / v.seconds[i] / threads >= share


def summarise(args, variants: list, tokens_per_step: int, fpt: float, threads: int) -> dict:
    """Median tokens/s of each variant's clean blocks, and the ratios the issue asks for.

    Ratios are of those medians; the paired range uses the rounds in which both variants were clean.
    A variant without a clean block falls back to all its blocks, and the record says so.
    """
    rows = [(v, variant_row(args, v, tokens_per_step, fpt, threads)) for v in variants]
    return {"results": [r for _, r in rows], "ratios": comparisons(args, rows)}


def variant_row(args, v, tokens_per_step: int, fpt: float, threads: int) -> dict:
    from neo.train.metrics import peak_tflops

    rates = [args.steps * tokens_per_step / s for s in v.seconds]
    ok = [clean(v, i, threads, args.clean_share) for i in range(len(rates))]
    keep = ok if any(ok) else [True] * len(rates)
    used = [x for x, k in zip(rates, keep) if k]
    median = statistics.median(used)
    row = {
        "variant": v.name,
        "dtype": v.dtype,
        "recipe": v.recipe,
        "label": v.label,
        "seconds": v.seconds,
        "cpu_seconds": v.cpu_seconds,
        "tokens_per_s": rates,
        "clean": ok,
        "kept": keep,
        "clean_blocks": sum(ok),
        "used_all_blocks": not any(ok),
        "median_tokens_per_s": median,
        "min_tokens_per_s": min(used),
        "max_tokens_per_s": max(used),
        "median_step_ms": 1e3 * tokens_per_step / median,
        "model_tflops": median * fpt / 1e12,
        "first_loss": v.first_loss,
    }
    if threads:
        row["cpu_share"] = [c / s / threads for c, s in zip(v.cpu_seconds, v.seconds)]
    peak = peak_tflops(v.dtype, args.peak_tflops)
    if peak:
        row["mfu"] = row["model_tflops"] / peak
    return row


def ratio_entry(what: str, n: dict, d: dict, target: float | None = None, kind: str | None = None) -> dict:
    """numerator / denominator tokens/s: the ratio of medians, and the median and range of the per-round
    ratios over rounds in which both were clean. A target counts as met only if both estimates meet it:
    on a noisy machine they can disagree by several percent."""
    paired = [
        a / b for a, b, ka, kb in zip(n["tokens_per_s"], d["tokens_per_s"], n["kept"], d["kept"]) if ka and kb
    ]
    value = n["median_tokens_per_s"] / d["median_tokens_per_s"]
    paired_median = statistics.median(paired) if paired else value
    entry = {
        "comparison": what,
        "dtype": n["dtype"],
        "numerator": n["label"],
        "denominator": d["label"],
        "ratio": value,
        "paired_median": paired_median,
        "pairs": len(paired),
        "paired_min": min(paired) if paired else None,
        "paired_max": max(paired) if paired else None,
    }
    worst = min(value, paired_median)
    if kind == "speed":
        entry.update(target=f">= {target:.2f}x", met=worst >= target)
    elif kind == "overhead":
        overhead = 1 / value - 1  # extra time per step of the numerator's step over the denominator's
        entry.update(overhead=overhead, target=f"overhead <= {target:.0%}", met=1 / worst - 1 <= target)
    elif kind == "cost":  # a DeepSpeed setting against neo's own: the extra time per step, no target
        entry.update(overhead=1 / value - 1)
    return entry


def comparisons(args, rows: list) -> list[dict]:
    """The ratio table: the issue's two targets, then what compiling, fusing and each --ds-variant change."""
    by_key = {(r["variant"], r["dtype"], r["recipe"]): r for _, r in rows}
    out = []

    def add(what, num, den, target=None, kind=None):
        n, d = by_key.get(num), by_key.get(den)
        if n is not None and d is not None:
            out.append(ratio_entry(what, n, d, target, kind))

    for dtype in args.dtypes.split(","):
        ds = ("neo-deepspeed", dtype, "deepspeed")
        dsc = ("neo-deepspeed-compiled", dtype, "deepspeed")
        recipes = ["fp32"] if dtype == "fp32" else args.bf16_recipes.split(",")
        for recipe in recipes:
            add("neo (DeepSpeed) vs transformers", ds, ("hf", dtype, recipe), TARGET_VS_HF, "speed")
        for recipe in recipes:
            like_for_like = recipe in ("fp32", "master")
            add("DeepSpeed overhead over neo plain", ds, ("neo-plain", dtype, recipe), TARGET_DS_OVERHEAD,
                "overhead" if like_for_like else None)  # fmt: skip
        for recipe in recipes:
            plain, hf = ("neo-plain", dtype, recipe), ("hf", dtype, recipe)
            add("neo plain vs transformers plain", plain, hf)
            add("model.compile vs eager (DeepSpeed)", dsc, ds)
            add("model.compile vs eager (plain loop)", ("neo-plain-compiled", dtype, recipe), plain)
            add("neo compiled (DeepSpeed) vs transformers", dsc, hf)
            add("DeepSpeed overhead, compiled", dsc, ("neo-plain-compiled", dtype, recipe), kind="cost")
            add("fused output head + loss vs unfused", plain, ("neo-plain-unfused", dtype, recipe))
        for name, d, _ in by_key:
            if name.startswith("neo-deepspeed[") and d == dtype:
                add(f"{name} vs neo-deepspeed", (name, dtype, "deepspeed"), ds, kind="cost")
    return out


def markdown(r: dict) -> str:
    """The record as a person reads it; ``{environment}`` is filled in by ``common.write_record``."""
    out = [f"# train_step benchmark, {r['date']} ({r['device']})", "", "{environment}", "", "## Setup", ""]
    out += setup_lines(r)
    out += ["", "## Tokens/s", "", results_table(r), ""]
    out += [
        "Loss at step 1: same weights and batch, so the variants agree (fp32 to ~1e-5, bf16 to ~1e-3).",
        "",
    ]
    out += ["## Ratios", "", ratios_table(r)]
    out += [f"- note: {n}" for n in r.get("notes", [])]
    out += [
        "",
        "Overhead = DeepSpeed step time / plain step time - 1 (= 1/ratio - 1). Targets (issue 19, on the "
        f"quickstart shape, fp32, CPU): neo (DeepSpeed) >= {TARGET_VS_HF}x transformers; DeepSpeed overhead <= "
        f"{TARGET_DS_OVERHEAD:.0%} over neo's plain loop with the same precision recipe. The per-round ratios are "
        "over rounds in which both variants were clean. A target counts as met only when both the ratio of "
        "medians and the median of the per-round ratios meet it. Rows without a target show what a variant "
        "changes (for a DeepSpeed variant, its extra time per step against neo-deepspeed).",
    ]
    return "\n".join(out) + "\n"


def setup_lines(r: dict) -> list[str]:
    c = r["config"]
    m, o, b = c["neo"]["model"], c["neo"]["optimizer"], c["neo"]["batch"]
    counts = c["parameters"]
    head_share = (m["vocab_size"] * m["hidden_size"] * 6) / c["flops_per_token"]
    clean_rule = (
        f"blocks in which the process had at least {c['clean_cpu_share']} of its {r['hardware']['torch_threads']}"
        " threads' CPU time (others ran 3-6x slower with another job on a core, and are left out)"
        if c["clean_cpu_share"]
        else "all blocks"
    )
    stage, run_as = c["zero_stage"], c.get("zero_stage_run", c["zero_stage"])
    zero = f"ZeRO-{stage}" + (
        f" as configured, run as ZeRO-{run_as} (one data-parallel rank)" if run_as != stage else ""
    )
    lines = [
        f"- config: {', '.join(c.get('config_files') or []) or 'the default bench shape (bench/common.py)'}",
        f"- model: {counts['total'] / 1e6:.2f}M parameters ({counts['blocks'] / 1e6:.2f}M in {m['n_layers']} blocks, "
        f"embedding and untied head {counts['embedding'] / 1e6:.2f}M each): hidden {m['hidden_size']}, "
        f"{m['n_heads']} heads, vocab {m['vocab_size']}, seq {m['seq_length']}, rotary {m['rotary_pct']}, "
        f"parallel residual {m['parallel_residual']}; {c['flops_per_token'] / 1e6:.1f} MFLOP/token "
        f"(6N + 12Lhs; head {head_share:.0%})",
        f"- step: batch {b['micro_batch_size']} x seq {m['seq_length']} = {c['tokens_per_step']} tokens, no "
        f"accumulation; AdamW lr {o['lr']}, betas {o['betas']}, weight decay {o['weight_decay']} on matrices, clip "
        f"{o['grad_clip']}; AdamW implementation: {c['adamw']}",
        "- hf: transformers GPTNeoXForCausalLM (sdpa), same weights, plain loop; neo-plain: neo's GPT, same loop; "
        f"neo-deepspeed: neo's Trainer (DeepSpeed engine, {zero}, one rank), step = Trainer.train_step; "
        "*-compiled: the same with model.compile (each block compiled by torch.compile, inductor)",
    ]
    for text in c.get("ds_variants") or []:
        name, *overrides = text.split()
        lines.append(f"- neo-deepspeed[{name}]: neo-deepspeed with {' '.join(overrides)}")
    if any(x["dtype"] == "bf16" for x in r["results"]):
        lines.append("- bf16 recipes of the plain loops: master = bf16 weights/activations/grads + fp32 master "
                     "weights and AdamW state (DeepSpeed's recipe); autocast = fp32 weights + torch.autocast(bf16)")  # fmt: skip
    lines.append(
        f"- timing: {c['warmup_steps']} warmup steps per variant excluded; {c['rounds']} rounds of "
        f"{c['steps_per_block']} step(s) per variant, in a random order each round, {c['timed_seconds']} s; "
        f"statistics over {clean_rule}"
    )
    return lines


def results_table(r: dict) -> str:
    mfu = any("mfu" in x for x in r["results"])
    header = ["variant", "dtype", "tokens/s (median)", "range", "clean blocks", "step ms", "model TFLOP/s"]
    header += (["MFU"] if mfu else []) + ["loss at step 1"]
    rows = []
    for x in r["results"]:
        row = [
            x["label"],
            x["dtype"],
            f"{x['median_tokens_per_s']:,.0f}",
            f"{x['min_tokens_per_s']:,.0f}-{x['max_tokens_per_s']:,.0f}",
            f"{x['clean_blocks']}/{len(x['tokens_per_s'])}" + (" (all used)" if x["used_all_blocks"] else ""),
            f"{x['median_step_ms']:,.0f}",
            f"{x['model_tflops']:.3f}",
        ]
        if mfu:
            row.append(f"{x['mfu']:.1%}" if "mfu" in x else "")
        row.append(f"{x['first_loss']:.5f}")
        rows.append(row)
    return common.markdown_table(header, rows)


def ratios_table(r: dict) -> str:
    rows = []
    for x in r["ratios"]:
        verdict = ("met" if x["met"] else "NOT met") + f" ({x['target']})" if "met" in x else ""
        shown = f"{x['ratio']:.3f}x" + (f" (overhead {x['overhead']:+.1%})" if "overhead" in x else "")
        spread = (
            f"{x['paired_min']:.3f}-{x['paired_max']:.3f} ({x['pairs']})" if x["pairs"] else "no clean pair"
        )
        median = f"{x['paired_median']:.3f}x" if x["pairs"] else ""
        rows.append([x["comparison"], x["dtype"], f"{x['numerator']} / {x['denominator']}", shown, median, spread,
                     verdict])  # fmt: skip
    header = ["comparison", "dtype", "tokens/s ratio", "ratio of medians", "median of per-round ratios",
              "per-round range (pairs)", "target"]  # fmt: skip
    return common.markdown_table(header, rows)
