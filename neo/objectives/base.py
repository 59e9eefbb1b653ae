"""The objective interface: what a batch holds, and how the loss and its metrics come from the model.

One training loop serves every objective (DESIGN principle 11). An objective decides four things:

- **data**: which datasets a run reads (``build_datasets``) and how samples become micro-batches
  (``collate``): a ``MicroBatch`` is the model's ``inputs`` and the loss's ``labels``. The plain form
  calls ``model(inputs, labels=labels)``; the pipeline form sends ``inputs`` through the stages and
  hands ``labels`` to the last one, so both are tensors (or tuples of tensors) and nothing else.
- **a step's batches** (``start_step``): the micro-batches of one optimizer step before they run, e.g. to
  count the loss tokens of the whole global batch so that every token weighs the same however the
  micro-batches and data-parallel ranks split them.
- **the loss** (``loss``): from the output head module and the final hidden states [b, s, h] on the last
  stage. It is called inside the head module's forward (plain form; so ZeRO-3 has gathered the head's
  weight) or by DeepSpeed's pipeline loss. It returns this micro-batch's share of the step's loss, scaled
  so that DeepSpeed's mean over micro-batches and data-parallel ranks is the loss of the global batch.
- **metrics** (``record`` / ``pop_sums`` / ``summarize``): sums that the loop reduces over data-parallel
  ranks and pipeline stages, turned into the numbers a person reads (accuracy, margins, perplexity).

The loop never asks which objective it runs; ``neo/objectives/__init__.py`` maps ``objective.type`` to a
class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

Tensors = torch.Tensor | tuple[torch.Tensor, ...]


def _to(x: Tensors, device) -> Tensors:
    if isinstance(x, tuple):
        return tuple(t.to(device, non_blocking=True) for t in x)
    return x.to(device, non_blocking=True)


@dataclass
class MicroBatch:
    """One forward pass's worth of data on one data-parallel rank."""

    inputs: Tensors  # what enters the first layer (tokens, or a tuple starting with tokens)
    labels: Tensors  # what the loss reads on the last stage

    def to(self, device) -> MicroBatch:
        return MicroBatch(_to(self.inputs, device), _to(self.labels, device))


class Objective:
    """Base class: subclasses override ``build_datasets``, ``collate`` and ``loss`` (and the rest as needed)."""

    name = "base"
    metric_sums: tuple[str, ...] = ()  # the names ``record`` accepts; the loop reduces them in this order
    model_overrides: dict = {}  # model options this objective needs (a reward model's score head)
    needs_reference = False  # True: the trainer sets ``reference(inputs, loss_fn)``, a frozen model's forward

    def __init__(self, cfg=None):
        self.cfg = cfg  # the run's Config (None in unit tests that need no settings)
        self._sums: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ data
    def build_datasets(self, cfg, tokenizer, num_samples: dict[str, int]) -> dict:
        """Datasets for 'train', 'valid', 'test' (None where a split has none)."""
        raise NotImplementedError

    def collate(self, samples: list) -> MicroBatch:
        """A micro-batch from dataset samples."""
        raise NotImplementedError

    def batches(self, dataset, *, consumed: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                dp_size: int) -> Iterator[MicroBatch]:  # fmt: skip
        """This rank's endless stream of micro-batches from sample ``consumed`` on (a pure function of the
        data, the seed and ``consumed``, so a resumed run reads what the uninterrupted one would have)."""
        from neo.data.dataset import micro_batch_samples

        for samples in micro_batch_samples(dataset, consumed_samples=consumed, global_batch_size=global_batch_size,
                                           micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size):  # fmt: skip
            yield self.collate(samples)

    def start_step(self, micro_batches: list[MicroBatch], dp_sum: Callable[[torch.Tensor], torch.Tensor]
                   ) -> list[MicroBatch]:  # fmt: skip
        """The micro-batches of one optimizer step, before any runs; ``dp_sum`` sums a tensor over the
        data-parallel ranks. The default passes them through."""
        return micro_batches

    # ------------------------------------------------------------------------------------------ loss
    def loss(self, head, hidden: torch.Tensor, labels: Tensors) -> torch.Tensor:
        """This micro-batch's (scaled) loss from the head module and the final hidden states."""
        raise NotImplementedError

    # --------------------------------------------------------------------------------------- metrics
    def record(self, **sums: torch.Tensor) -> None:
        """Add to this step's metric sums (detached; reduced over ranks by the loop)."""
        for k, v in sums.items():
            v = v.detach().double().reshape(())
            self._sums[k] = self._sums[k] + v if k in self._sums else v

    def pop_sums(self) -> dict[str, torch.Tensor]:
        out, self._sums = self._sums, {}
        return out

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics a person reads, from the reduced sums (none by default)."""
        return {}

    def summarize_validation(self, loss: float, sums: dict[str, float]) -> dict[str, float]:
        """Validation metrics from the mean loss and the reduced sums."""
        import math

        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), **self.summarize(sums)}

    # ------------------------------------------------------------------------------ hooks of the loop
    def attach(self, trainer) -> None:
        """Called once the trainer's engine exists (online RL samples from the policy it trains)."""

    def validate(self, trainer) -> dict[str, float] | None:
        """Validation metrics computed the objective's own way (RL: rollouts on held-out prompts), or None for
        the loop's: the loss over the first eval.iters global batches of the validation split."""
        return None

    # ---------------------------------------------------------------------------------------- resume
    def tensor_state(self) -> dict[str, torch.Tensor]:
        """This rank's tensors a checkpoint must hold for an exact resume (RL: the rollout in training)."""
        return {}

    def load_tensor_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``tensor_state()`` (called only when resuming in the same layout)."""

    def checkpoint_meta(self) -> dict:
        """What a checkpoint records for its readers (e.g. the chat template generation must use)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must hold for this objective to resume exactly (beyond the data position)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``."""
