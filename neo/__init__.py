"""neo: train GPT-NeoX-style language models with DeepSpeed."""

import os

__version__ = "0.1.0"

# A training step on the CPU allocates buffers of tens of MiB afresh (logits, DeepSpeed's gradient
# buckets and flattened partitions); the kernel maps them in 4 KiB pages on first touch, every step.
# Measured on a 2-core EPYC: writing a fresh 80 MB tensor took 35 ms, against 9 ms with huge pages and
# 6.5 ms into a reused one; DeepSpeed's ZeRO-1 step overhead over a plain loop fell from ~8-11% to
# ~3-7.5% (bench/train_step.py, 2026-12-01). PyTorch backs allocations of 2 MiB and more with
# transparent huge pages when THP_MEM_ALLOC_ENABLE is set before its first allocation, so neo sets it
# (a user's own value wins) before its entry points import torch. On a GPU, or a kernel with THP
# off, it changes nothing.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
