"""The model's shape as plain data.

This module imports nothing heavy so that the config layer (``neo.config``) can use the same
dataclass as its ``model:`` section without importing torch, and the model code can take it
without knowing anything about YAML, files or launchers (DESIGN principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelArgs:
    """Architecture of a GPT-NeoX-style decoder. Defaults are the GPT-NeoX / Pythia choices."""

    n_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # model width (d_model)
    n_heads: int = 4  # attention heads; hidden_size / n_heads is the head size
    # MLP inner size; None means 4 x hidden (gelu) or the LLaMA-style 8/3 x hidden rounded up to 64 (swiglu).
    ffn_hidden_size: int | None = None
    seq_length: int = 128  # tokens per training sample
    # Longest position the model supports; None means seq_length.
    max_position_embeddings: int | None = None
    # Rows of the embedding and the output head. None: the tokenizer's vocabulary padded up to a multiple
    # of vocab_multiple.
    vocab_size: int | None = None
    # Padding of the vocabulary (fast matmuls), fixed with the model and independent of parallel.tp, so
    # that every layout computes the same function; parallel.tp must divide the padded size.
    vocab_multiple: int = 128
    position_embedding: Literal["rotary", "learned", "sinusoidal"] = "rotary"  # how positions enter the model
    rotary_pct: float = 0.25  # fraction of each head's channels that rotary rotates (GPT-NeoX: 0.25)
    rotary_base: float = 10000.0  # rotary frequency base (theta)
    parallel_residual: bool = True  # x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX); false: sequential (GPT-2)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # normalisation layers
    norm_eps: float = 1e-5  # epsilon of every norm
    activation: Literal["gelu", "swiglu"] = "gelu"  # MLP activation (gelu is exact erf GeLU)
    tie_embeddings: bool = False  # share the input embedding with the output head
    # "small_init": N(0, sqrt(2/(5h))) and wang_init 2/(L sqrt(h)) for the two output projections
    # (Pythia / GPT-NeoX); "normal": N(0, init_std) with outputs scaled by 1/sqrt(2L) (GPT-2 / Megatron).
    init_method: Literal["small_init", "normal"] = "small_init"
    init_std: float = 0.02  # std of init_method "normal"
    attention_dropout: float = 0.0  # dropout on attention probabilities (Pythia: 0)
    hidden_dropout: float = 0.0  # dropout on embeddings and residual branches
    # Tokens per chunk of the fused output head + loss: the loss holds [chunk, vocab] logits at a
    # time, never all [tokens, vocab]. 0: all logits, then the loss. Changes memory and speed, not results.
    loss_chunk_size: int = 1024

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        if self.activation == "swiglu":
            return -(-(8 * self.hidden_size // 3) // 64) * 64
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that rotary touches (GPT-NeoX: int(head_dim * rotary_pct))."""
        return int(self.head_dim * self.rotary_pct) if self.position_embedding == "rotary" else 0
