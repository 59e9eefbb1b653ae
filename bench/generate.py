#!/usr/bin/env python
"""Generation speed: neo with and without the KV cache, next to transformers' ``generate``, in one run.

    python bench/generate.py                          # CPU, ~2-3 minutes on 2 cores
    python bench/generate.py --reps 3 --new 32        # quicker
    python bench/generate.py --device cuda --batch 8  # a GPU: record generate-cuda-<date>
    python bench/generate.py --set model.n_layers=12  # another shape (keys of the model section)
    python bench/generate.py --kv-heads 6,3,2,1       # KV cache memory of grouped-query attention

Model: the ~20M-parameter shape of every neo bench (``common.DEFAULT_MODEL``: 6 layers, hidden 384,
6 heads, vocab 12,288), randomly initialised; transformers' ``GPTNeoXForCausalLM`` gets the same weights
(``neo.export.hf``). Prompts are random token ids; decoding is greedy with no end-of-document stop, so
every variant produces exactly the same tokens (checked, and recorded as ``outputs_match``).

Variants, per prompt length (``--prefixes``): **neo-cache** (``Generator``, preallocated KV cache),
**hf-cache** (``model.generate``, its default cache), **neo-concat** (neo with a KV cache that grows by
``torch.cat`` each step: the alternative to preallocation, measured to justify the choice), and at the ``--no-cache-prefixes`` lengths
**neo-nocache** (the whole prefix recomputed per token) and **hf-nocache** (``use_cache=False``).
Each is timed generating 1 token and ``--new`` + 1 tokens; *tokens/s* = (new + 1) / time of the long
call (prompt processing included), *ms/token* = (long - short) / new (decoding only: the per-token
cost, which with a cache should not grow with the prefix).

Protocol: one untimed warm-up call of everything, then ``--reps`` rounds that each time every variant
once, the order rotating per round, so other jobs on the machine hit all variants alike. Reported:
medians over rounds, and ratios as the median (and range) of the per-round paired ratios, and of
the best (fastest) round of each variant, which a round slowed by other jobs cannot move. Targets
(the issue): neo-cache >= 1.0x hf-cache tokens/s on CPU; neo-cache ms/token at the longest prefix
about equal to the shortest.

``--kv-heads`` runs another comparison (record ``generate-gqa-<date>``): the same shape with each number
of key/value heads (grouped-query attention; n_heads = multi-head, 1 = multi-query), neo-cache only,
greedy from the longest prefix. Reported per variant: the KV cache's bytes after the call (measured
from its buffers) against the multi-head model's, which should shrink by n_heads / n_kv_heads exactly,
and tokens/s, interleaved as above.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import DEFAULT_MODEL, environment, markdown_table, write_record

import neo  # noqa: F401 - before torch, as neo's entry points: sets THP_MEM_ALLOC_ENABLE


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--prefixes", default="32,512", help="prompt lengths, comma-separated")
    p.add_argument(
        "--no-cache-prefixes", default="32", help="prompt lengths that also run the no-cache variants"
    )
    p.add_argument("--new", type=int, default=64, help="timed new tokens (the long call makes new + 1)")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (same length)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="model.KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--tag", default=None, help="inserted into the record's name (default: 'cuda' on a GPU)")
    p.add_argument("--no-record", action="store_true", help="print only; write no files")
    p.add_argument(
        "--kv-heads", default=None, help="comma-separated n_kv_heads: the grouped-query KV cache comparison"
    )
    return p.parse_args(argv)


def model_args(overrides: list[str], seq_length: int):
    """ModelArgs from the shared bench shape plus ``model.KEY=VALUE`` overrides (YAML-typed values)."""
    import yaml

    from neo.model.args import ModelArgs

    kw = {}
    for item in [*DEFAULT_MODEL, *overrides]:
        key, _, value = item.partition("=")
        if not key.startswith("model.") or not value:
            raise SystemExit(f"bench/generate.py: --set takes model.KEY=VALUE, got {item!r}")
        kw[key[len("model.") :]] = yaml.safe_load(value)
    kw["seq_length"] = max(int(kw.get("seq_length", 0)), seq_length)
    return ModelArgs(**kw)


class _IdsTokenizer:
    """What Generator needs from a tokenizer, for random ids with no text (a 12k vocabulary has none)."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod_id, self.name = vocab_size, 0, f"random-{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return [1]

    def decode(self, ids) -> str:
        return ""


def _kv_heads_measure(opts, device: str):
    """(rows per n_kv_heads, the multi-head shape): cache bytes after the call and tokens/s, interleaved."""
    import torch

    from neo.generate import Generator, SamplingParams
    from neo.model.gpt import GPT, parameter_count

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
    prefix, new = max(int(x) for x in opts.prefixes.split(",")), opts.new
    kv_list = [int(x) for x in opts.kv_heads.split(",")]
    gens, args = {}, {}
    for kv in kv_list:
        args[kv] = model_args([*opts.overrides, f"model.n_kv_heads={kv}"], prefix + new + 1)
        model = GPT(args[kv], seed=opts.seed).eval().to(device=device, dtype=dtype)
        gens[kv] = Generator(model, _IdsTokenizer(args[kv].vocab_size), batch_size=opts.batch)
    heads = args[kv_list[0]].n_heads
    g = torch.Generator().manual_seed(opts.seed)
    prompt = torch.randint(1, args[kv_list[0]].vocab_size, (opts.batch, prefix), generator=g).tolist()
    params = SamplingParams(max_new_tokens=new + 1, greedy=True, stop_at_eod=False)
    times: dict[int, list[float]] = {kv: [] for kv in kv_list}
    for kv in kv_list:
        gens[kv].generate_ids(prompt, params)  # warm-up
    for r in range(opts.reps):
        for kv in kv_list[r % len(kv_list) :] + kv_list[: r % len(kv_list)]:
            t0 = time.perf_counter()
            gens[kv].generate_ids(prompt, params)
            times[kv].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{opts.reps} done", file=sys.stderr, flush=True)
    full = gens[heads].last_cache_bytes if heads in gens else None
    rows = {}
    for kv in kv_list:
        tps = [(new + 1) * opts.batch / t for t in times[kv]]
        nbytes = gens[kv].last_cache_bytes
        rows[str(kv)] = {
            "n_kv_heads": kv,
            "parameters_M": round(parameter_count(args[kv])["total"] / 1e6, 3),
            "cache_bytes": nbytes,
            "cache_ratio_vs_mha": (full / nbytes) if full else None,
            "expected_ratio": heads / kv,
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_range": [min(tps), max(tps)],
        }
    return rows, args[kv_list[0]]


def kv_heads_main(opts) -> int:
    """KV cache bytes and tokens/s of the same shape with each number of key/value heads."""
    import torch

    device = "cuda" if opts.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    env = environment()
    prefix, new = max(int(x) for x in opts.prefixes.split(",")), opts.new
    rows, a = _kv_heads_measure(opts, device)
    heads = a.n_heads
    record = {**env, "bench": "generate-gqa", "device": device, "dtype": opts.dtype, "batch": opts.batch,
              "prefix": prefix, "new_tokens": new, "reps": opts.reps, "n_heads": heads,
              "model": {k: getattr(a, k) for k in ("n_layers", "hidden_size", "n_heads", "vocab_size")},
              "variants": rows}  # fmt: skip
    table = markdown_table(
        ["n_kv_heads", "parameters (M)", "KV cache (MB)", "MHA cache / this", "n_heads / n_kv_heads",
         "tokens/s (median)", "range"],
        [[v["n_kv_heads"], f"{v['parameters_M']:.2f}", f"{v['cache_bytes'] / 2**20:.3f}",
          "-" if v["cache_ratio_vs_mha"] is None else f"{v['cache_ratio_vs_mha']:.3f}", f"{v['expected_ratio']:.3f}",
          f"{v['tokens_per_s']:.1f}", f"{v['tokens_per_s_range'][0]:.1f}-{v['tokens_per_s_range'][1]:.1f}"]
         for v in rows.values()],
    )  # fmt: skip
    markdown = f"""# Generation: the KV cache of grouped-query attention

{{environment}}

Model: {a.n_layers} layers, hidden {a.hidden_size}, {heads} query heads, vocab {a.vocab_size}, random weights,
{device} {opts.dtype}; each row the same shape with n_kv_heads key/value heads (the k/v projection, and so
the parameter count, shrinks with them). Greedy, batch {opts.batch}, prompt {prefix} tokens + {new + 1} new
tokens; {opts.reps} interleaved rounds. *KV cache* = bytes of the cache's key and value buffers after the
call ({prefix + new + 1} positions x layers x kv heads x head size x 2 x dtype bytes), measured with
``KVCache.nbytes``; it should shrink by n_heads / n_kv_heads exactly. *tokens/s*: median and range over
the rounds; fewer kv heads read less cache per token, but at this size the step is dominated by the
matmuls, and on a shared machine (see the load average above) the timings are indicative only: the
memory column is the measurement.

{table}
"""
    print(markdown.replace("{environment}", ""))
    if not opts.no_record:
        name = "generate-gqa" + (f"-{opts.tag}" if opts.tag else "")
        paths = write_record(name, record, markdown, opts.out)
        print("wrote " + ", ".join(str(x) for x in paths), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.kv_heads:
        return kv_heads_main(opts)
    import torch
    import transformers

    from neo.export.hf import hf_config, load_into_hf
    from neo.generate import Generator, SamplingParams
    from neo.model.gpt import GPT, parameter_count

    device = (
        "cuda"
        if opts.device == "auto" and torch.cuda.is_available()
        else ("cpu" if opts.device == "auto" else opts.device)
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[opts.dtype]
    prefixes = [int(x) for x in opts.prefixes.split(",")]
    nocache = {int(x) for x in opts.no_cache_prefixes.split(",") if x}
    new = opts.new
    env = environment()
    args = model_args(opts.overrides, max(prefixes) + new + 1)
    model = GPT(args, seed=opts.seed).eval()
    hf = transformers.GPTNeoXForCausalLM(hf_config(args)).eval()
    load_into_hf(hf, model.state_dict(), args)
    model, hf = model.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)
    gen = Generator(model, _IdsTokenizer(args.vocab_size), batch_size=opts.batch)
    concat = Generator(model, _IdsTokenizer(args.vocab_size), batch_size=opts.batch, preallocate=False)
    params = {n: SamplingParams(max_new_tokens=n, greedy=True, stop_at_eod=False) for n in (1, new + 1)}
    g = torch.Generator().manual_seed(opts.seed)
    prompts = {p: torch.randint(1, args.vocab_size, (opts.batch, p), generator=g) for p in prefixes}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def neo_call(p: int, n: int, cache: bool, which=gen) -> list[list[int]]:
        return [r.tokens for r in which.generate_ids(prompts[p].tolist(), params[n], use_cache=cache)]

    @torch.inference_mode()
    def hf_call(p: int, n: int, cache: bool) -> list[list[int]]:
        ids = prompts[p].to(device)
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=cache,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, p:].tolist()

    variants = []  # (name, prefix, fn)
    for p in prefixes:
        variants += [
            ("neo-cache", p, lambda n, p=p: neo_call(p, n, True)),
            ("hf-cache", p, lambda n, p=p: hf_call(p, n, True)),
            ("neo-concat", p, lambda n, p=p: neo_call(p, n, True, concat)),
        ]
        if p in nocache:
            variants += [
                ("neo-nocache", p, lambda n, p=p: neo_call(p, n, False)),
                ("hf-nocache", p, lambda n, p=p: hf_call(p, n, False)),
            ]
    params_m = parameter_count(args)["total"] / 1e6
    print(
        f"bench/generate.py: {params_m:.2f}M parameters, {device} {opts.dtype}, batch {opts.batch}, "
        f"prefixes {prefixes}, {new} new tokens, {opts.reps} rounds",
        file=sys.stderr,
        flush=True,
    )

    outputs: dict[str, list] = {}
    for name, p, fn in variants:  # warm-up, and the tokens every variant must agree on
        fn(1)
        outputs[f"{name}@{p}"] = fn(new + 1)
    match = {
        p: all(outputs[f"{n}@{p}"] == outputs[f"neo-cache@{p}"] for n, q, _ in variants if q == p)
        for p in prefixes
    }
    times: dict[str, dict[str, list[float]]] = {
        f"{n}@{p}": {"short": [], "long": [], "cpu_share": []} for n, p, _ in variants
    }
    threads = torch.get_num_threads()
    for r in range(opts.reps):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name, p, fn in order:
            key = f"{name}@{p}"
            for n, slot in ((1, "short"), (new + 1, "long")):
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                fn(n)
                sync()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                times[key][slot].append(wall)
                if slot == "long":
                    times[key]["cpu_share"].append(cpu / wall / threads)
        print(f"  round {r + 1}/{opts.reps} done", file=sys.stderr, flush=True)

    rows = {}
    for key, t in times.items():
        tps = [(new + 1) * opts.batch / x for x in t["long"]]
        mspt = [(lg - sh) / new * 1000 for lg, sh in zip(t["long"], t["short"])]
        rows[key] = {
            "tokens_per_s": statistics.median(tps),
            "tokens_per_s_range": [min(tps), max(tps)],
            "ms_per_token": statistics.median(mspt),
            "ms_per_token_range": [min(mspt), max(mspt)],
            "cpu_share": statistics.median(t["cpu_share"]),
            # best of rounds (timeit's rule: noise only ever adds time), robust to a round hit by other jobs
            "tokens_per_s_best": max(tps),
            "ms_per_token_best": (min(t["long"]) - min(t["short"])) / new * 1000,
            "per_round_tokens_per_s": tps,
            "per_round_ms_per_token": mspt,
        }

    def paired(a: str, b: str, field: str, invert: bool = False) -> dict:
        xs = [(y / x if invert else x / y) for x, y in zip(rows[a][field], rows[b][field])]
        best_field = "tokens_per_s_best" if "tokens" in field else "ms_per_token_best"
        x, y = rows[a][best_field], rows[b][best_field]
        return {
            "median": statistics.median(xs),
            "range": [min(xs), max(xs)],
            "best": y / x if invert else x / y,
        }

    ratios = []
    for p in prefixes:
        ratios.append(
            {
                "what": f"neo-cache / hf-cache tokens/s, prefix {p}",
                "target": ">= 1.0",
                **paired(f"neo-cache@{p}", f"hf-cache@{p}", "per_round_tokens_per_s"),
            }
        )
        ratios.append(
            {
                "what": f"hf-cache / neo-cache ms/token (decode only), prefix {p}",
                "target": ">= 1.0",
                **paired(f"neo-cache@{p}", f"hf-cache@{p}", "per_round_ms_per_token", invert=True),
            }
        )
        ratios.append(
            {
                "what": f"neo-cache (preallocated) / neo-concat (torch.cat per step) tokens/s, prefix {p}",
                "target": "-",
                **paired(f"neo-cache@{p}", f"neo-concat@{p}", "per_round_tokens_per_s"),
            }
        )
        if p in nocache:
            ratios.append(
                {
                    "what": f"neo-cache / neo-nocache tokens/s, prefix {p}",
                    "target": "> 1",
                    **paired(f"neo-cache@{p}", f"neo-nocache@{p}", "per_round_tokens_per_s"),
                }
            )
            ratios.append(
                {
                    "what": f"neo-nocache / hf-nocache tokens/s, prefix {p}",
                    "target": "-",
                    **paired(f"neo-nocache@{p}", f"hf-nocache@{p}", "per_round_tokens_per_s"),
                }
            )
    lo, hi = min(prefixes), max(prefixes)
    if hi != lo:
        for impl in ("neo-cache", "hf-cache", "neo-concat"):
            ratios.append(
                {
                    "what": f"{impl} ms/token at prefix {hi} / prefix {lo} (flatness)",
                    "target": "~1.0" if impl == "neo-cache" else "-",
                    **paired(f"{impl}@{hi}", f"{impl}@{lo}", "per_round_ms_per_token"),
                }
            )

    record = {
        **env,
        "bench": "generate",
        "device": device,
        "dtype": opts.dtype,
        "batch": opts.batch,
        "new_tokens": new,
        "prefixes": prefixes,
        "reps": opts.reps,
        "model": {
            **{
                k: getattr(args, k)
                for k in (
                    "n_layers",
                    "hidden_size",
                    "n_heads",
                    "vocab_size",
                    "rotary_pct",
                    "parallel_residual",
                )
            },
            "parameters_M": round(params_m, 2),
        },
        "outputs_match": {str(p): m for p, m in match.items()},
        "variants": rows,
        "ratios": ratios,
    }
    table = markdown_table(
        ["variant", "prefix", "tokens/s (median)", "range", "ms/token decode (median)", "range", "CPU share"],
        [
            [
                k.split("@")[0],
                k.split("@")[1],
                f"{v['tokens_per_s']:.1f}",
                f"{v['tokens_per_s_range'][0]:.1f}-{v['tokens_per_s_range'][1]:.1f}",
                f"{v['ms_per_token']:.2f}",
                f"{v['ms_per_token_range'][0]:.2f}-{v['ms_per_token_range'][1]:.2f}",
                f"{v['cpu_share']:.2f}",
            ]
            for k, v in rows.items()
        ],
    )
    ratio_table = markdown_table(
        ["ratio", "median of paired rounds", "range", "best of rounds", "target"],
        [
            [
                r["what"],
                f"{r['median']:.3f}",
                f"{r['range'][0]:.3f}-{r['range'][1]:.3f}",
                f"{r['best']:.3f}",
                r["target"],
            ]
            for r in ratios
        ],
    )
    markdown = f"""# Generation: neo (KV cache / no cache) vs transformers `generate`

{{environment}}

Model: {params_m:.2f}M parameters ({args.n_layers} layers, hidden {args.hidden_size}, {args.n_heads} heads,
vocab {args.vocab_size}), random weights, {device} {opts.dtype}; batch {opts.batch}; greedy, {new} timed new
tokens; {opts.reps} interleaved rounds. Same tokens from every variant: {all(match.values())}.
*tokens/s* = (new + 1) x batch / time of a call generating new + 1 tokens (prompt included);
*ms/token* = (that time - time of a 1-token call) / new: the decoding cost per token. *CPU share* =
process CPU time / (wall time x threads): well below 1, other jobs took the cores during that variant.
Ratios: median and range of the per-round paired ratios, and the ratio of each variant's best round.

{table}

## Ratios (side by side, same run)

{ratio_table}
"""
    print(markdown.replace("{environment}", ""))
    if not opts.no_record:
        tag = opts.tag or ("cuda" if device == "cuda" else None)
        paths = write_record("generate" + (f"-{tag}" if tag else ""), record, markdown, opts.out)
        print("wrote " + ", ".join(str(x) for x in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
