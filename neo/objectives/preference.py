"""What the preference objectives (reward model, DPO) share: batches of prompt groups and pair weights.

A dataset item is one prompt's group (``neo/data/examples.py: PreferenceDataset``): K answers, each the
prompt + answer as one sequence with a loss mask on the answer, and the comparisons between them (a ranking
of K gives K(K-1)/2 pairs, InstructGPT's expansion, and they stay in one batch). A micro-batch holds
``micro_batch_size`` groups in fixed-size tensors (the pipeline form needs the same shapes every time):
``max_answers`` rows per group and ``max_pairs`` comparison slots, the unused ones padded and weighted 0.

Every comparison of the global batch weighs the same: ``start_step`` counts them over the step's micro-
batches and the data-parallel ranks, as SFT counts answer tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from neo.objectives.base import MicroBatch, Objective


class PreferenceBatches(Objective):
    """Base of the preference objectives: datasets, collate, per-comparison normalization."""

    max_answers, max_pairs, pad_id = 2, 1, 0

    def build_datasets(self, cfg, tokenizer, num_samples: dict[str, int]) -> dict:
        from neo.data.examples import build_example_datasets
        from neo.data.indexed import IndexedTokens

        d = cfg.data
        readers = [IndexedTokens(p) for p in [*d.train_paths, *d.valid_paths, *d.test_paths]]
        self.max_answers = max(int(np.diff(r.group_docs).max()) for r in readers)
        self.max_pairs = max(int(np.diff(r.group_pairs).max()) for r in readers)
        self.pad_id, self.chat_template = tokenizer.eod_id, readers[0].chat_template
        return build_example_datasets(kind="preference", train_paths=d.train_paths, train_weights=d.train_weights,
                                      valid_paths=d.valid_paths, test_paths=d.test_paths, split=d.split,
                                      seq_length=cfg.model.seq_length, seed=cfg.seed, num_samples=num_samples,
                                      cache_dir=d.cache_dir, tokenizer=tokenizer.name)  # fmt: skip

    def checkpoint_meta(self) -> dict:
        template = getattr(self, "chat_template", None)
        return {"chat_template": template} if template else {}

    def group_tensors(self, samples: list, width: int) -> dict[str, torch.Tensor]:
        """The groups as fixed-size tensors: tokens and masks [groups x max_answers, width], the comparisons as
        row indices [groups x max_pairs, 2] with a 0/1 weight (0 on the padding slots)."""
        rows = len(samples) * self.max_answers
        tokens = np.full((rows, width), self.pad_id, np.int64)
        masks = np.zeros((rows, width), np.float32)
        pairs = np.zeros((len(samples) * self.max_pairs, 2), np.int64)
        weights = np.zeros(len(samples) * self.max_pairs, np.float32)
        for g, item in enumerate(samples):
            for k, (seq, mask) in enumerate(zip(item["sequences"], item["loss_masks"])):
                n = min(len(seq), width)
                tokens[g * self.max_answers + k, :n], masks[g * self.max_answers + k, :n] = seq[:n], mask[:n]
            p = len(item["pairs"])
            pairs[g * self.max_pairs : g * self.max_pairs + p] = item["pairs"] + g * self.max_answers
            weights[g * self.max_pairs : g * self.max_pairs + p] = 1.0
        out = dict(tokens=tokens, masks=masks, pairs=pairs, weights=weights)
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def start_step(self, micro_batches: list[MicroBatch], dp_sum) -> list[MicroBatch]:
        """Weight every comparison by grad_accum x dp / (comparisons in the global batch). The pair weights
        are the last label of every preference micro-batch."""
        local = sum(float(m.labels[-1].sum()) for m in micro_batches)
        total, dp = dp_sum(torch.tensor([local, 1.0], dtype=torch.float64)).tolist()
        scale = len(micro_batches) * dp / max(total, 1.0)
        return [MicroBatch(m.inputs, (*m.labels[:-1], m.labels[-1] * scale)) for m in micro_batches]

    def record_pairs(self, loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, weights: torch.Tensor
                     ) -> None:  # fmt: skip
        """Metric sums over this micro-batch's real comparisons: count, loss, correct order, margin, scores."""
        real = weights > 0
        self.record(pairs=real.sum(), loss_sum=(loss * real).sum(), correct=((chosen > rejected) & real).sum(),
                    margin_sum=((chosen - rejected) * real).sum(), chosen_sum=(chosen * real).sum(),
                    rejected_sum=(rejected * real).sum())  # fmt: skip

    metric_sums = ("pairs", "loss_sum", "correct", "margin_sum", "chosen_sum", "rejected_sum")

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["pairs"], 1.0)
        return {"accuracy": sums["correct"] / n, "margin": sums["margin_sum"] / n, "chosen": sums["chosen_sum"] / n,
                "rejected": sums["rejected_sum"] / n, "pairs": sums["pairs"]}  # fmt: skip

    def summarize_validation(self, loss: float, sums: dict[str, float]) -> dict[str, float]:
        """Validation: the loss over every comparison (not a mean of batch means), pairwise accuracy, margin."""
        return {"loss": sums["loss_sum"] / max(sums["pairs"], 1.0), **self.summarize(sums)}
