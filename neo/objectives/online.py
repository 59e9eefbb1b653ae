"""Online RL from the current policy's own samples: what PPO and GRPO share (``neo/objectives/ppo.py``,
``grpo.py`` add their advantages and loss terms).

Each rollout takes the next ``objective.rollout_prompts`` prompts (split over the data-parallel ranks),
samples ``objective.group_size`` responses to each from the current policy (neo's KV-cache generator,
``objective.temperature`` / ``top_k`` / ``top_p``, up to ``max_new_tokens``), scores them (a reward function
or a reward model), and computes the policy's and the frozen reference's log-probabilities. Then
``objective.ppo_epochs`` passes over the rollout, in shuffled mini-batches of ``batch.global_batch_size``
sequences, are ordinary optimizer steps of the one training loop. So one rollout lasts
ppo_epochs x rollout_prompts x group_size / global_batch_size steps, and the data position
(``consumed`` samples) says which rollout and where in it a run stands. A checkpoint taken inside a rollout
keeps the rollout, so a resumed run trains on the same samples as an uninterrupted one.

Prompts come from chat files (``--format chat``): each example's conversation up to its first answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from neo import ds_compat
from neo.generate import SamplingParams
from neo.objectives.base import MicroBatch, Objective
from neo.rl.rollout import Rollout, pack, prompt_of, sample, score_tokens


class OnlineRL(Objective):
    needs_reference = True
    uses_critic = False
    metric_sums = ("tokens", "policy_loss_sum", "kl_sum", "clipped_sum", "entropy_sum", "value_loss_sum",
                   "reward_sum", "reward_sq_sum", "responses", "length_sum", "gen_seconds", "rollouts")  # fmt: skip
    default_group_size = 1

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.rollout: Rollout | None = None
        self.trainer = None
        self.last_rollout: dict[str, float] = {}  # the latest rollout's numbers, repeated until the next

    @property
    def group_size(self) -> int:
        return self.cfg.objective.group_size or self.default_group_size

    def attach(self, trainer) -> None:
        """The trainer's policy, reference, tokenizer and reward, for the rollouts."""
        from neo.rl.rewards import build_scorer

        self.trainer = trainer
        self.scorer = build_scorer(self.cfg.objective, trainer.tokenizer, trainer.device)

    def build_datasets(self, cfg, tokenizer, num_samples: dict[str, int]) -> dict:
        from neo.data.examples import build_example_datasets
        from neo.data.indexed import IndexedTokens

        d = cfg.data
        self.chat_template = IndexedTokens(d.train_paths[0]).chat_template if d.train_paths else None
        o = (
            cfg.objective
        )  # prompts per split: enough for the run's rollouts (validation: one rollout's worth)
        per = {"train": math.ceil(num_samples["train"] / (o.ppo_epochs * self.group_size)),
               "valid": o.rollout_prompts, "test": o.rollout_prompts}  # fmt: skip
        return build_example_datasets(kind="chat", train_paths=d.train_paths, train_weights=d.train_weights,
                                      valid_paths=d.valid_paths, test_paths=d.test_paths, split=d.split,
                                      seq_length=cfg.model.seq_length, seed=cfg.seed, num_samples=per,
                                      cache_dir=d.cache_dir, tokenizer=tokenizer.name, packing=False,
                                      pad_id=tokenizer.eod_id)  # fmt: skip

    def checkpoint_meta(self) -> dict:
        template = getattr(self, "chat_template", None)
        return {"chat_template": template} if template else {}

    # ------------------------------------------------------------------------------------- rollouts
    def make_rollout(self, dataset, k: int, dp_rank: int, dp_size: int) -> Rollout:
        """Rollout ``k`` of this data-parallel rank (a pure function of k, the rank and the policy)."""
        o, tr = self.cfg.objective, self.trainer
        per_rank = o.rollout_prompts // dp_size
        first = k * o.rollout_prompts + dp_rank * per_rank
        prompts = [
            prompt_of(dataset[(first + i) % len(dataset)])
            for i in range(per_rank)
            for _ in range(self.group_size)
        ]
        params = SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                                top_p=o.top_p, seed=(self.cfg.seed * 1_000_003 + k * 7_919 + dp_rank) % 2**31)  # fmt: skip
        stop = tuple(self._template().stop) if self._template() else ()
        policy = tr.engine.module
        with ds_compat.zero3_outside_engine(tr.engine):  # they run outside the engine's forward
            responses, seconds = sample(policy, tr.tokenizer, prompts, params, stop)
            tokens, mask = pack(prompts, responses, tr.tokenizer.eod_id)
            old_logp, values = score_tokens(policy, tokens.to(tr.device), self.uses_critic)
        ref_logp = self.reference(tokens[:, :-1].to(tr.device),
                                  lambda head, hidden, _: head.token_logprobs(hidden, tokens[:, 1:].to(hidden.device))[0])  # fmt: skip
        rewards = torch.tensor(self.scorer(prompts, responses), dtype=torch.float32)
        rollout = Rollout(k, tokens, mask, old_logp.cpu(), ref_logp.float().cpu(), rewards, values.cpu(),
                          torch.zeros_like(mask), torch.zeros_like(mask))  # fmt: skip
        rollout.advantages, rollout.returns = self.advantages(rollout)
        self.record(reward_sum=rewards.sum(), reward_sq_sum=(rewards**2).sum(), responses=torch.tensor(len(responses)),
                    length_sum=mask.sum(), gen_seconds=torch.tensor(seconds), rollouts=torch.tensor(1.0))  # fmt: skip
        return rollout

    def _template(self):
        from neo.data.chat import template_from_dict

        return template_from_dict(self.chat_template) if getattr(self, "chat_template", None) else None

    def advantages(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def batches(self, dataset, *, consumed: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                dp_size: int) -> Iterator[MicroBatch]:  # fmt: skip
        o = self.cfg.objective
        per_rollout = (
            o.rollout_prompts * self.group_size * o.ppo_epochs
        )  # samples (sequences) trained per rollout
        k, offset = divmod(consumed, per_rollout)
        local, per_step = o.rollout_prompts * self.group_size // dp_size, global_batch_size // dp_size
        while True:
            if self.rollout is None or self.rollout.index != k:
                self.rollout = self.make_rollout(dataset, k, dp_rank, dp_size)
            g = torch.Generator().manual_seed(self.cfg.seed * 31 + k)
            order = torch.cat([torch.randperm(local, generator=g) for _ in range(o.ppo_epochs)])
            for pos in range(offset // global_batch_size * per_step, len(order), micro_batch_size):
                yield self.micro_batch(order[pos : pos + micro_batch_size])
            k, offset = k + 1, 0

    def micro_batch(self, rows: torch.Tensor) -> MicroBatch:
        r = self.rollout
        labels = (r.tokens[rows, 1:], r.mask[rows], r.old_logp[rows], r.ref_logp[rows], r.advantages[rows],
                  r.returns[rows], r.values[rows], r.mask[rows].clone())  # fmt: skip
        return MicroBatch(inputs=r.tokens[rows, :-1], labels=labels)

    def start_step(self, micro_batches: list[MicroBatch], dp_sum) -> list[MicroBatch]:
        """Every response token of the global batch weighs the same (as SFT's answer tokens)."""
        local = sum(float(m.labels[1].sum()) for m in micro_batches)
        total, dp = dp_sum(torch.tensor([local, 1.0], dtype=torch.float64)).tolist()
        scale = len(micro_batches) * dp / max(total, 1.0)
        return [MicroBatch(m.inputs, (*m.labels[:-1], m.labels[-1] * scale)) for m in micro_batches]

    # ----------------------------------------------------------------------------------------- loss
    def token_terms(self, head, hidden, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token loss, response mask); records the shared metrics. Subclasses add their terms."""
        from neo.rl.losses import clipped_policy_loss, kl_estimate

        targets, mask, old_logp, ref_logp, advantages, *_ = labels
        logp, entropy = head.token_logprobs(hidden, targets, entropy=True)
        policy_loss, clipped = clipped_policy_loss(logp, old_logp, advantages, self.cfg.objective.clip)
        kl = kl_estimate(logp.detach(), ref_logp, "k3")
        self.record(tokens=mask.sum(), policy_loss_sum=(policy_loss.detach() * mask).sum(), kl_sum=(kl * mask).sum(),
                    clipped_sum=(clipped * mask).sum(), entropy_sum=(entropy * mask).sum())  # fmt: skip
        return policy_loss, mask, logp

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["tokens"], 1.0)
        out = {
            "kl": sums["kl_sum"] / n,
            "clip_frac": sums["clipped_sum"] / n,
            "entropy": sums["entropy_sum"] / n,
        }
        if self.uses_critic:
            out["value_loss"] = sums["value_loss_sum"] / n
        if sums["responses"]:  # a rollout happened in this step: its numbers stand until the next one
            m = sums["responses"]
            mean = sums["reward_sum"] / m
            self.last_rollout = {"reward": mean, "reward_std": math.sqrt(max(sums["reward_sq_sum"] / m - mean**2, 0.0)),
                                 "response_len": sums["length_sum"] / m,
                                 "gen_s": sums["gen_seconds"] / max(sums["rollouts"], 1.0)}  # fmt: skip
        return {**out, **self.last_rollout}

    def validate(self, trainer) -> dict[str, float] | None:
        """Validation: one rollout on held-out prompts (no training on it): reward, KL, length."""
        dataset = trainer.datasets.get("valid")
        if dataset is None:
            return None
        saved, self.rollout = (self.rollout, self.last_rollout), None
        self.pop_sums()
        rollout = self.make_rollout(dataset, 0, trainer.topo.coord.data, trainer.topo.dp)
        from neo.rl.losses import kl_estimate

        self.record(
            tokens=rollout.mask.sum(),
            kl_sum=(kl_estimate(rollout.old_logp, rollout.ref_logp) * rollout.mask).sum(),
        )
        sums = trainer.reduced_sums()
        out = self.summarize(sums)
        self.rollout, self.last_rollout = saved  # training's numbers stand, not the held-out rollout's
        return {"loss": -out["reward"], "reward": out["reward"], "reward_std": out["reward_std"], "kl": out["kl"],
                "response_len": out["response_len"]}  # fmt: skip

    # ---------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The latest rollout's numbers, which the records repeat until the next rollout (a resume in the
        middle of a rollout reports them as the uninterrupted run does)."""
        return {"last_rollout": self.last_rollout}

    def load_state_dict(self, state: dict) -> None:
        self.last_rollout = dict(state.get("last_rollout") or {})

    def tensor_state(self) -> dict[str, torch.Tensor]:
        return self.rollout.state() if self.rollout is not None else {}

    def load_tensor_state(self, state: dict[str, torch.Tensor]) -> None:
        self.rollout = Rollout.from_state(state) if state else None
