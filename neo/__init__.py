"""neo: train GPT-NeoX-style language models with DeepSpeed."""

__version__ = "0.1.0"
