"""neo: train GPT-NeoX-style language models with DeepSpeed."""

import os

__version__ = "0.1.0"

# A training step on the CPU allocates buffers of tens of MiB afresh (logits, DeepSpeed's gradient
# buckets and flattened partitions); the kernel maps them in 4 KiB pages on first touch, every step,
# which made writing a new 80 MB buffer ~4x slower than reusing one. PyTorch backs allocations of
# 2 MiB and more with transparent huge pages when THP_MEM_ALLOC_ENABLE is set before its first
# allocation, so neo sets it (a user's own value wins) before its entry points import torch. On a
# GPU, or a kernel with THP off, it changes nothing. Measured in bench/train_step.py (DeepSpeed's
# ZeRO-1 overhead over a plain loop 7.8% -> 3.0% on a 2-core CPU).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
