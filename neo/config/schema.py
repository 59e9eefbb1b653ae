"""The config tree: one dataclass per section; each field's comment is its documentation.

The README's config reference is generated from these comments (``python -m neo.config --reference``).
This module imports nothing heavy, so that reading a config never imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from neo.model.args import ModelArgs


@dataclass
class ModelConfig(ModelArgs):
    """The ``model:`` section: the model's shape (``ModelArgs``, which the model code takes) and how to run it."""

    # compile each transformer block with torch.compile (regional: one block's code, compiled once and
    # reused by every block, so start-up stays short), in the plain and the pipeline form. Needs
    # inductor (a C++ compiler on CPU, Triton on GPU); without them the run says so and stays eager.
    compile: bool = False


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size: ranks that split every layer
    pp: int = 1  # pipeline stages; 1 means no pipeline
    # how layers are split into stages: "parameters", "uniform" or "type:<regex>" (e.g. "type:Block")
    partition_method: str = "parameters"
    # recompute activations in the backward pass instead of keeping them: "full" keeps only the input of each
    # segment of every_n blocks; "selective" recomputes only the attention core (softmax(QK^T) V: the s x s
    # scores), keeping the linears' outputs (Megatron's choice, Korthikanti et al. 2022)
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    every_n: int = 1  # full: blocks per recomputed segment
    # Megatron's sequence parallelism (tp > 1): norms, dropout and the residual stream between the
    # tensor-parallel layers hold 1/tp of the sequence on each rank, gathered and reduce-scattered around them
    # (same communication as plain tensor parallelism, those activations tp times smaller)
    sequence_parallel: bool = False


@dataclass
class DataConfig:
    # tiktoken name, a .tiktoken rank file, a folder with encoder.json + vocab.bpe, or hf:DIR (a Hugging
    # Face tokenizer.json: Llama 3, Mistral, Qwen, GPT-NeoX-20B/Pythia; read offline)
    tokenizer: str = "gpt2"
    train_paths: list[str] = field(default_factory=list)  # token file prefixes (path without .bin/.idx)
    train_weights: list[float] | None = None  # blending weights, one per train path
    valid_paths: list[str] = field(default_factory=list)  # separate validation token files (instead of split)
    test_paths: list[str] = field(default_factory=list)  # separate test token files
    split: str = "969,30,1"  # train,valid,test share of documents when no valid/test paths are given
    cache_dir: str | None = None  # where sample-index arrays are cached; None: beside the data
    # chat data (objective sft): several whole examples share a sequence, attention never crossing from one
    # to another (false: one example per sequence, padded)
    packing: bool = False


@dataclass
class OptimizerConfig:
    type: Literal["adamw"] = "adamw"  # AdamW (torch), weight decay decoupled
    lr: float = 6e-4  # peak learning rate, reached after warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam beta1, beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # applied to matrices only (not biases or norms)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    # torch's fused AdamW kernel (each element read and written once per step, instead of one pass
    # per operation); falls back to the multi-tensor implementation where the device has no fused kernel
    fused: bool = True


@dataclass
class ScheduleConfig:
    iterations: int = 1000  # optimizer steps of the run
    # linear warmup from 0 to optimizer.lr: a number of steps (16), or a fraction of schedule.iterations
    # below 1 (0.1 = the first 10%, as GPT-NeoX's warmup)
    warmup: int | float = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"  # shape of the decay after warmup
    decay_iters: int | None = None  # steps over which lr decays to min_lr; None: iterations
    min_lr: float = 0.0  # learning rate at the end of the decay
    # stop (after saving a checkpoint) once this launch has run N steps; the next launch resumes.
    # For fixed-length job slots; None trains to `iterations`.
    exit_interval: int | None = None


@dataclass
class BatchConfig:
    """global = micro_batch_size x grad_accum x data-parallel size; give any two."""

    micro_batch_size: int | None = None  # samples per forward pass per data-parallel rank
    grad_accum: int | None = None  # micro-batches per optimizer step (pipeline: micro-batches in flight)
    global_batch_size: int | None = None  # samples per optimizer step, all ranks together


@dataclass
class Fp16Config:
    """Dynamic loss scaling (DeepSpeed's fp16 section)."""

    loss_scale: float = 0.0  # 0: dynamic; > 0: this static scale
    initial_scale_power: int = 16  # dynamic scaling starts at 2**power
    loss_scale_window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_loss_scale: float = 1.0  # the dynamic scale never goes below this


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: mixed precision with fp32 master weights
    fp16: Fp16Config = field(default_factory=Fp16Config)


@dataclass
class ZeroConfig:
    stage: int = 0  # 0 off, 1 optimizer state, 2 + gradients, 3 + parameters partitioned over data parallel
    offload_optimizer: Literal["none", "cpu"] = "none"  # keep optimizer state and step on the CPU
    overlap_comm: bool = False  # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather
    # fp32 with one data-parallel rank: run stage 1 or 2 as stage 0. They partition nothing over one rank,
    # and stage 0 skips their gradient bucket, partition and flatten copies and their second fp32 copy of
    # the weights (the log says so). false keeps the stage as set (e.g. to test it).
    single_rank_stage0: bool = True


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <logging.dir>/checkpoints
    save_interval: int = 0  # save every N steps (0: only at the end); also saved on SIGTERM/SIGUSR1
    keep_last_n: int | None = 2  # older checkpoints are pruned after a new one is published; None keeps all
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one
    load: str | None = None  # start from this checkpoint (a folder) instead
    load_weights_only: bool = False  # with `load`: weights only, fresh optimizer, iteration 0 (fine-tuning)
    # check every file's sha256 against the manifest before loading (false: sizes only, faster; logged)
    verify: bool = True
    # when the newest checkpoint fails verification, resume from the newest one that passes (else: stop)
    fallback: bool = False


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA): the base model frozen, a trainable B A beside each target linear."""

    rank: int = 0  # adapter rank r; 0: no LoRA (every parameter trains)
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # linears of every block that get adapters: qkv, attn_out, mlp_in (up and gate), mlp_out
    targets: list[str] = field(default_factory=lambda: ["qkv", "attn_out", "mlp_in", "mlp_out"])
    rank_pattern: dict[str, Any] = field(default_factory=dict)  # a rank per target, e.g. {qkv: 16}


@dataclass
class FinetuneConfig:
    # start from these weights: a neo checkpoint (a folder, or a checkpoint dir: its newest) or a local
    # Hugging Face GPTNeoX folder (converted on load), with a fresh optimizer and schedule at iteration 0.
    # Keys of `model:` left unset take the checkpoint's shape. A run that has its own checkpoints resumes
    # from those instead.
    init_from: str | None = None


@dataclass
class WandbConfig:
    """Weights & Biases: the records of metrics.jsonl, also sent to W&B (``pip install wandb``)."""

    project: str | None = None  # W&B project; set it to log the run to W&B (None: off)
    name: str | None = None  # the run's name in W&B; None: the last part of logging.dir
    # online: stream to the W&B server; offline: write under <logging.dir>/wandb only (no network; upload
    # later with `wandb sync`); disabled: no W&B at all
    mode: Literal["online", "offline", "disabled"] = "online"


@dataclass
class LoggingConfig:
    dir: str = "runs/default"  # the run's outputs: resolved config, metrics.jsonl, checkpoints
    interval: int = 10  # one log line every N steps
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    peak_tflops: float | None = None  # per-device peak for MFU; None: looked up by device name
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    interval: int = 100  # validate every N steps (0: never; always at the end when iters > 0)
    iters: int = 10  # global batches per validation


@dataclass
class ObjectiveConfig:
    """What the run optimizes; every objective runs in the same loop (neo/objectives/)."""

    # pretrain: next-token prediction on token files; sft: the answer tokens of chat data (loss-masked);
    # reward: a reward model on ranked answers; dpo: direct preference optimization; ppo, grpo: online RL
    type: Literal["pretrain", "sft", "reward", "dpo", "ppo", "grpo"] = "pretrain"
    margin: float = 0.0  # reward: -log sigmoid(r_chosen - r_rejected - margin)
    centering: float = 0.0  # reward: + centering x (r_chosen + r_rejected)^2, keeping rewards near zero
    beta: float = 0.1  # dpo: strength of the implicit KL constraint to the reference (the policy's start)
    dpo_variant: Literal["sigmoid", "ipo"] = "sigmoid"  # dpo: the DPO loss, or IPO's squared loss
    label_smoothing: float = 0.0  # dpo (sigmoid): the share of labels assumed flipped (conservative DPO)
    reward: str = ""  # ppo/grpo: a reward function "module:function(prompts, responses) -> list of floats"
    reward_model: str | None = None  # ppo/grpo: or a reward model's checkpoint (objective.type: reward)
    rollout_prompts: int = 8  # ppo/grpo: prompts per rollout (all data-parallel ranks together)
    group_size: int | None = None  # ppo/grpo: responses sampled per prompt; None: 1 (ppo), 4 (grpo)
    ppo_epochs: int = 2  # ppo/grpo: passes over each rollout, in mini-batches of batch.global_batch_size
    clip: float = 0.2  # ppo/grpo: the policy ratio is clipped to [1 - clip, 1 + clip]
    kl_coef: float = 0.05  # ppo: per-token KL penalty in the reward; grpo: KL term in the loss
    value_clip: float = 0.2  # ppo: the value's change is clipped to +- value_clip
    vf_coef: float = 0.5  # ppo: weight of the value loss
    gamma: float = 1.0  # ppo: discount
    lam: float = 0.95  # ppo: GAE lambda
    max_new_tokens: int = 32  # ppo/grpo: longest sampled response
    temperature: float = 1.0  # ppo/grpo: sampling temperature of the rollouts
    top_k: int = 0  # ppo/grpo: sample among the k most likely tokens (0: all)
    top_p: float = 1.0  # ppo/grpo: nucleus sampling (1: off)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=lambda: LaunchConfig())  # defined below
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra keys passed to DeepSpeed as they are
    seed: int = 1234
    # Filled by load_config: the data-parallel size the batch arithmetic was resolved for.
    world_size: int = 1

    @property
    def warmup_steps(self) -> int:
        """schedule.warmup in steps (a fraction below 1 is of schedule.iterations)."""
        w = self.schedule.warmup
        return round(w * self.schedule.iterations) if isinstance(w, float) and w < 1 else int(w)

    @property
    def dp(self) -> int:
        return self.world_size // (self.parallel.tp * self.parallel.pp)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.logging.dir, "checkpoints")


@dataclass
class LaunchConfig:
    """How long ranks wait for each other (seconds): a job that cannot start or loses a rank fails, not hangs."""

    # seconds for all ranks to meet at MASTER_ADDR:MASTER_PORT, else the job fails naming host and port;
    # raise it where ranks start far apart (a slow shared filesystem)
    rendezvous_timeout: float = 30.0
    # seconds a collective (all-reduce, barrier, ...) may wait for a peer before the job fails (torch's
    # defaults: 10 min for NCCL, 30 for gloo); raise it if saving a checkpoint takes longer
    collective_timeout: float = 600.0
