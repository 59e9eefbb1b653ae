"""Benchmark: tokens/s of neo's DeepSpeed training step against plain PyTorch loops, side by side.

    python bench/train_step.py --config ds_configs/quickstart.yml --compile   # issue 19's record
    python bench/train_step.py                          # CPU default: ~20M model, fp32 (+ bf16 where native)
    python bench/train_step.py --device cuda --batch 32 # a GPU: also reports MFU
    python bench/train_step.py --dtypes fp32 --reps 4   # quicker

The shape: with ``--config`` the run's own config as a user runs it (its model, batch, ZeRO stage and
optimizer; the vocabulary padded from its tokenizer); without, the ~20M default shape of every bench
(``common.DEFAULT_MODEL``) with ZeRO-1 and 8 sequences. Variants, all in this one process, from the same
initial weights, on the same random batches, with AdamW (neo's rule: weight decay on matrices only),
gradient clipping at optimizer.grad_clip and neo's LR schedule function:

  hf             transformers' GPTNeoXForCausalLM of the same shape (sdpa attention), plain loop with
                 torch's default AdamW (what a user writes); the loss is neo's (fp32 cross-entropy over
                 every position) on its logits
  neo-plain      neo's GPT in the same plain loop (no DeepSpeed), with neo's AdamW implementation
                 (optimizer.fused), so that neo-deepspeed / neo-plain is DeepSpeed's overhead alone
  neo-deepspeed  neo's real Trainer (its DeepSpeed engine; only its tokenizer and dataset loaders stubbed,
                 see bench/common.py), stepped by Trainer.train_step itself
  --compile      adds neo-plain-compiled and neo-deepspeed-compiled: the same with model.compile (each
                 transformer block compiled by torch.compile)
  --unfused      adds neo-plain-unfused: model.loss_chunk_size = 0, the full logits, then the loss
  --ds-variant "NAME KEY=VALUE ..."  adds neo-deepspeed[NAME]: the Trainer with these config overrides
                 (what a DeepSpeed setting costs, side by side); the key ``bench.allreduce=true`` puts back
                 DeepSpeed's gradient all-reduce that neo skips on one data-parallel rank

bf16 for the plain loops is done two ways (``--bf16-recipes``), because DeepSpeed's bf16 is a recipe of
its own: ``master`` = bf16 weights, activations and gradients, with fp32 master weights and AdamW state
(what DeepSpeed's bf16 + ZeRO does, written out in ~10 lines); ``autocast`` = fp32 weights under
torch.autocast(bf16) (PyTorch's usual mixed precision). The DeepSpeed-overhead ratio uses ``master``,
the like-for-like recipe; autocast is shown beside it.

Timing: every variant first runs ``--warmup`` untimed steps (compiling happens there); then rounds, each
timing one block of ``--steps`` consecutive steps of every variant in a fresh random order, so drift hits
all variants alike and no variant always follows the same one. On a CPU shared with other jobs a block in
which another process held a core runs 3-6x slower (two OpenMP threads on one core); such blocks are
recognised by their CPU share and left out, and rounds go on until every variant has ``--reps`` clean
blocks (or ``--budget`` runs out). Reported: median tokens/s per variant and ratios of medians, with the
median and range of the per-round (paired) ratios. Each step ends with a host sync on the loss, as neo's
train_step has. Writes bench/results/train_step-<date>.md and .json (the statistics and the markdown:
bench/train_step_report.py).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace

from train_step_report import clean, markdown, summarise

import neo  # noqa: F401 - before torch, as neo's entry points: sets THP_MEM_ALLOC_ENABLE

# A CPU block counts when the process got this share of its threads' CPU time (see ``clean``).
CLEAN_SHARE = 0.9
MIN_ROUNDS = 3  # rounds run even past --budget


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    p.add_argument(
        "--dtypes",
        default="auto",
        help="comma list of fp32, bf16; auto: fp32, and bf16 where the "
        "device multiplies bf16 natively (a GPU, or a CPU with AVX512-BF16/AMX)",
    )
    p.add_argument(
        "--bf16-recipes",
        default="master,autocast",
        help="plain-loop bf16 recipes to run (master: bf16 weights + fp32 master; autocast)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="sequences per step (micro batch; no accumulation); default: the config's, else 8",
    )
    p.add_argument(
        "--zero",
        type=int,
        default=None,
        help="ZeRO stage as set in the config; default: the config's, else 1",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (3 with --compile)")
    p.add_argument("--compile", action="store_true", help="add the model.compile variants (plain, DeepSpeed)")
    p.add_argument("--unfused", action="store_true", help="add neo-plain-unfused (model.loss_chunk_size=0)")
    p.add_argument(
        "--ds-variant",
        action="append",
        default=[],
        metavar='"NAME KEY=VALUE ..."',
        help="add a DeepSpeed variant with these config overrides (repeatable; see the docstring)",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=8,
        help="clean timed blocks wanted per variant (rounds go on "
        "until each variant has them, or --budget runs out)",
    )
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round (one timed block)")
    p.add_argument(
        "--budget",
        type=float,
        default=180.0,
        help=f"seconds of timed rounds after which no further round starts (at least {MIN_ROUNDS} run)",
    )
    p.add_argument(
        "--fused-adamw",
        action="store_true",
        help="experiment: every AdamW, neo's Trainer's included, built with fused=True",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE.yml",
        help="the run's config files, as a user runs them (repeatable); without: the ~20M default shape",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="neo config override, e.g. --set model.n_layers=12 (repeatable)",
    )
    p.add_argument(
        "--clean-share",
        type=float,
        default=CLEAN_SHARE,
        help="CPU: a block counts only if the process had this share of its threads' CPU time (0: "
        "count all). Suits compute-bound steps; tiny models spend more time single-threaded",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak for MFU; default: neo's table by GPU name (none on CPU)",
    )
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument(
        "--tag", default=None, help="inserted into the record's file name (default: 'cuda' on a GPU)"
    )
    p.add_argument("--no-record", action="store_true", help="print only; write no files")
    return p.parse_args(argv)


@dataclass
class Variant:
    name: str
    dtype: str  # fp32 | bf16
    recipe: str  # fp32 | master | autocast | deepspeed
    step: object  # callable: () -> loss tensor
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    first_loss: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.recipe in ("fp32", "deepspeed") else f"{self.name} ({self.recipe})"


# --------------------------------------------------------------------------- the loops


class PlainLoop:
    """The training step without DeepSpeed: forward, backward, clip, AdamW, LR schedule.

    ``recipe``: fp32; ``autocast`` (fp32 weights, bf16 autocast forward); ``master`` (the model in bf16,
    its gradients copied into fp32 master weights that AdamW updates, then copied back).
    """

    def __init__(self, model, forward, cfg, recipe: str, device, batches, fused: bool | None = None):
        """``fused``: AdamW's implementation; None is torch's default (a user's plain loop)."""
        import torch

        from neo.train.schedule import schedule_from_config

        self.torch, self.forward, self.recipe, self.device, self.batches = (
            torch,
            forward,
            recipe,
            device,
            batches,
        )
        self.model = model.to(device)
        groups = param_groups(self.model, cfg.optimizer.weight_decay)
        self.pairs = []
        if recipe == "master":
            self.model.to(torch.bfloat16)  # .to() keeps the Parameter objects, so the groups stay valid
            masters = {}
            for group in groups:
                for p in group["params"]:
                    masters[p] = p.detach().float().clone().requires_grad_(True)
                    self.pairs.append((p, masters[p]))
                group["params"] = [masters[p] for p in group["params"]]
        self.params = [p for g in groups for p in g["params"]]
        impl = {} if fused is None else {"fused": fused}
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps, **impl
        )
        lr_fn, lr = schedule_from_config(cfg), cfg.optimizer.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_fn(step) / lr)
        self.clip = cfg.optimizer.grad_clip

    def __call__(self):
        torch = self.torch
        batch = next(self.batches).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe == "autocast"):
            loss = self.forward(self.model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        for p, master in self.pairs:
            master.grad = p.grad.float()
            p.grad = None
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.pairs:
            with torch.no_grad():
                for p, master in self.pairs:
                    p.copy_(master)
        return loss.detach()


def param_groups(model, weight_decay: float) -> list[dict]:
    """neo's rule, restated so the baselines do not depend on neo's internals: decay matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def neo_forward(model, tokens, labels):
    return model(tokens, labels)


def hf_forward(model, tokens, labels):
    from neo.model.gpt import loss_fn

    return loss_fn(model(input_ids=tokens, use_cache=False).logits, labels)


def deepspeed_step(cfg, env, batches, allreduce: bool = False):
    """neo's own step: ``Trainer.train_step`` of a real Trainer (see ``common.build_trainer``).

    ``allreduce``: put back DeepSpeed's gradient all-reduce that neo skips on one data-parallel rank
    (``neo.ds_compat.skip_single_rank_allreduce``), to measure what skipping it saves."""
    from common import build_trainer, micro_batches

    trainer, stream = build_trainer(cfg, env), micro_batches(batches)
    if allreduce:
        trainer.engine.enable_backward_allreduce = True
    return lambda: trainer.train_step(stream)


def parse_ds_variant(text: str) -> tuple[str, list[str], bool]:
    """``"NAME KEY=VALUE ..."`` -> (name, neo config overrides, whether to put the all-reduce back)."""
    name, *pairs = text.split()
    overrides = [o for o in pairs if not o.startswith("bench.allreduce=")]
    allreduce = any(o.lower() in ("bench.allreduce=true", "bench.allreduce=on") for o in pairs)
    return name, overrides, allreduce


# --------------------------------------------------------------------------- set-up and timing


def build_variants(args, cfg_for, env, device, notes: list[str]) -> list[Variant]:
    """Every variant of every dtype. ``cfg_for(dtype, *overrides)`` is the config they share."""
    import torch

    from neo.train import build

    cfg32 = cfg_for("fp32")
    model_args = cfg32.model
    g = torch.Generator().manual_seed(0)
    shape = (cfg32.batch.micro_batch_size, model_args.seq_length + 1)
    pool = [torch.randint(0, model_args.vocab_size, shape, generator=g) for _ in range(4)]

    def batches():  # every variant sees the same sequence of batches
        return itertools.cycle(pool)

    variants = []
    for dtype in args.dtypes.split(","):
        cfg = cfg_for(dtype)
        recipes = ["fp32"] if dtype == "fp32" else args.bf16_recipes.split(",")
        problem = build.inductor_problem(device, dtype) if args.compile else None
        if problem:
            notes.append(f"{dtype}: no compiled variants: {problem}.")
        compiled = args.compile and not problem
        variants += plain_variants(args, cfg, dtype, recipes, device, batches, compiled)
        variants.append(Variant("neo-deepspeed", dtype, "deepspeed", deepspeed_step(cfg, env, batches())))
        if compiled:
            compiled = deepspeed_step(cfg_for(dtype, "model.compile=true"), env, batches())
            variants.append(Variant("neo-deepspeed-compiled", dtype, "deepspeed", compiled))
        for text in args.ds_variant:
            name, overrides, allreduce = parse_ds_variant(text)
            step = deepspeed_step(cfg_for(dtype, *overrides), env, batches(), allreduce)
            variants.append(Variant(f"neo-deepspeed[{name}]", dtype, "deepspeed", step))
    return variants


def plain_variants(
    args, cfg, dtype: str, recipes: list[str], device, batches, compiled: bool
) -> list[Variant]:
    """transformers' and neo's models in the plain loop (and neo's compiled or unfused, when asked)."""
    from transformers import GPTNeoXForCausalLM

    from neo.export.hf import hf_config, load_into_hf
    from neo.model.gpt import GPT
    from neo.train import build
    from neo.train.optim import fused_adamw_supported

    model_args = cfg.model

    def neo_model(compiled: bool = False, **changes):
        model = GPT(replace(model_args, **changes), seed=cfg.seed)
        if compiled:
            print(
                "bench: "
                + build.compile_blocks(model, replace(cfg, model=replace(model_args, compile=True)), device)
            )
        return model

    def hf_model():
        hf = GPTNeoXForCausalLM(hf_config(model_args, attn_implementation="sdpa"))
        load_into_hf(hf, neo_model().state_dict(), model_args)
        return hf.train()

    # neo's plain loop uses neo's optimizer choice, so the DeepSpeed overhead is like for like
    fused = cfg.optimizer.fused and fused_adamw_supported(device)
    out = []
    for recipe in recipes:
        out.append(
            Variant("hf", dtype, recipe, PlainLoop(hf_model(), hf_forward, cfg, recipe, device, batches()))
        )
    for recipe in recipes:
        kinds = [("neo-plain", {})]
        kinds += [("neo-plain-compiled", {"compiled": True})] if compiled else []
        kinds += [("neo-plain-unfused", {"loss_chunk_size": 0})] if args.unfused else []
        for name, changes in kinds:
            loop = PlainLoop(neo_model(**changes), neo_forward, cfg, recipe, device, batches(), fused)
            out.append(Variant(name, dtype, recipe, loop))
    return out


def run_block(v: Variant, steps: int, sync) -> None:
    """Time ``steps`` consecutive steps; append wall and process-CPU seconds to the variant."""
    gc.collect()
    sync()
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(steps):
        float(v.step())  # a host sync, as neo's train_step has (it returns the loss as a float)
    sync()
    c1 = os.times()
    v.seconds.append(time.perf_counter() - t0)
    v.cpu_seconds.append((c1.user - c0.user) + (c1.system - c0.system))


def time_rounds(args, variants: list[Variant], sync, threads: int, tokens_per_step: int) -> int:
    """Rounds over all variants until every variant has ``--reps`` clean blocks, or ``--budget`` seconds have
    passed (after at least MIN_ROUNDS rounds). Returns the round count.

    Each round runs the variants in a fresh random order (seeded): a fixed cyclic order gave each variant
    the same predecessor every round, and what the previous step leaves in caches and the allocator
    showed up as a steady ~10% difference between two identical-cost variants."""
    start, r = time.perf_counter(), 0
    rng = random.Random(0)
    while True:
        order = rng.sample(variants, len(variants))
        for v in order:
            run_block(v, args.steps, sync)
        r += 1
        counts = [sum(clean(v, i, threads, args.clean_share) for i in range(r)) for v in variants]
        print(
            f"bench: round {r}: "
            + ", ".join(
                f"{v.label} {v.dtype} {args.steps * tokens_per_step / v.seconds[-1]:,.0f}"
                + ("" if clean(v, r - 1, threads, args.clean_share) else " (busy)")
                for v in variants
            ),
            flush=True,
        )
        if min(counts) >= args.reps or (r >= MIN_ROUNDS and time.perf_counter() - start > args.budget):
            return r


def bench_settings(args) -> list[str]:
    """The overrides every variant shares: with ``--config`` only what a benchmark needs (no checkpoint, no
    accumulation, the vocabulary of the config's tokenizer); else the default shape, ZeRO-1, 8 sequences."""
    import common

    from neo.config import load_config

    base = list(common.BENCH_SETTINGS)
    if not args.config:
        base += [*common.DEFAULT_MODEL, "zero.stage=1", "batch.micro_batch_size=8"]
    base += [f"zero.stage={args.zero}"] * (args.zero is not None)
    base += [f"batch.micro_batch_size={args.batch}"] * (args.batch is not None)
    cfg = load_config(args.config, [*base, *args.overrides], world_size=1)
    if cfg.model.vocab_size is None:  # random token ids stand for the config's tokenizer: its padded size
        from neo.data.tokenizer import load_tokenizer, padded_vocab_size

        vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
        base.append(f"model.vocab_size={padded_vocab_size(vocab, cfg.model.vocab_multiple)}")
    return base


def resolve_dtypes(args, device_kind: str) -> list[str]:
    """``--dtypes auto``: fp32, and bf16 where it is native. Returns the notes for the record."""
    import common
    import torch

    if args.dtypes != "auto":
        return []
    args.dtypes = "fp32,bf16" if device_kind == "cuda" or common.cpu_native_bf16() else "fp32"
    if args.dtypes == "fp32":
        note = (f"bf16 not run: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmul, so "
                "PyTorch emulates it (~250x slower than fp32 here); a bf16 timing would measure the emulation. "
                "Force it with --dtypes fp32,bf16.")  # fmt: skip
        print("bench: " + note, flush=True)
        return [note]
    return []


def warm_up(args, variants: list[Variant]) -> None:
    """Untimed steps (compiling happens here); the first step's loss shows every variant computes one function."""
    for v in variants:
        for i in range(args.warmup):
            loss = float(v.step())
            if i == 0:
                v.first_loss = loss


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: neo then picks gloo and the CPU
    import common
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench: --device cuda but torch sees no GPU (torch.cuda.is_available() is False)", file=sys.stderr
        )
        return 2
    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    env = common.start_one_rank(device_kind)
    device = torch.device("cuda", 0) if device_kind == "cuda" else torch.device("cpu")
    notes = resolve_dtypes(args, device_kind)

    from neo.config import load_config
    from neo.model.gpt import flops_per_token

    base = bench_settings(args)

    def cfg_for(dtype: str, *extra: str):
        return load_config(
            args.config, [*base, *args.overrides, *extra, f"precision.dtype={dtype}"], world_size=1
        )

    record = common.environment()
    cfg32 = cfg_for("fp32")
    tokens_per_step = cfg32.batch.micro_batch_size * cfg32.model.seq_length
    fpt = flops_per_token(cfg32.model)
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    print(f"bench: {fpt / 1e6:.1f} MFLOP/token, {tokens_per_step} tokens per step, device {device}, "
          f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
    if args.compile:
        args.warmup = max(args.warmup, 3)  # the first steps compile
    t0 = time.perf_counter()
    with common.fused_adamw(args.fused_adamw):
        variants = build_variants(args, cfg_for, env, device, notes)
    build_s = time.perf_counter() - t0
    warm_up(args, variants)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    rounds = time_rounds(args, variants, sync, threads, tokens_per_step)
    timings = {
        "rounds": rounds,
        "build_seconds": round(build_s, 1),
        "timed_seconds": round(time.perf_counter() - t0, 1),
    }
    results = summarise(args, variants, tokens_per_step, fpt, threads)
    config = record_config(args, cfg32, tokens_per_step, fpt, threads, timings)
    record.update(benchmark="train_step", device=str(device), config=config, notes=notes, **results)
    text = markdown(record)
    print(text.replace("{environment}", common.environment_markdown(record)))
    if not args.no_record:
        tag = args.tag or ("cuda" if device.type == "cuda" else None)
        paths = common.write_record("train_step" + (f"-{tag}" if tag else ""), record, text, args.out)
        print("bench: wrote " + ", ".join(str(p) for p in paths))
    return 0


def record_config(args, cfg32, tokens_per_step: int, fpt: float, threads: int, timings: dict) -> dict:
    """The record's ``config``: the resolved neo config and how the bench ran."""
    from neo.config import lean_config, to_dict
    from neo.model.gpt import parameter_count

    adamw = ("fused=True (patched into every variant)" if args.fused_adamw
             else f"hf: torch default; neo: fused={cfg32.optimizer.fused} (optimizer.fused)")  # fmt: skip
    return {
        "neo": to_dict(cfg32),
        "parameters": parameter_count(cfg32.model),
        "flops_per_token": fpt,
        "tokens_per_step": tokens_per_step,
        "zero_stage": cfg32.zero.stage,
        "zero_stage_run": lean_config(cfg32)[0].zero.stage,
        "ds_variants": args.ds_variant,
        "config_files": args.config,
        "bf16_recipes": args.bf16_recipes,
        "adamw": adamw,
        "warmup_steps": args.warmup,
        "clean_blocks_wanted": args.reps,
        "steps_per_block": args.steps,
        "clean_cpu_share": args.clean_share if threads else None,
        **timings,
    }


if __name__ == "__main__":
    code = main()
    from neo.distributed import shutdown

    shutdown(code)
