"""The model's shape as plain data.

This module imports nothing heavy so that the config layer (``neo.config``) can use the same
dataclass as its ``model:`` section without importing torch, and the model code can take it
without knowing anything about YAML, files or launchers (DESIGN principle 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class RopeScaling:
    """Rotary frequency scaling for contexts longer than pretraining (transformers' ``rope_parameters``).

    "linear" divides every frequency by ``factor`` (position interpolation); "llama3" divides the low
    frequencies by ``factor``, keeps the high ones and interpolates between (Llama 3.1). The defaults are
    Llama 3.1's. "dynamic", "yarn" and "longrope" are not implemented: importing them is refused by name.
    """

    # "none": plain rotary (GPT-NeoX, Llama 2/3, Mistral, Qwen2); "linear"; "llama3" (Llama 3.1+)
    type: Literal["none", "linear", "llama3"] = "none"
    factor: float = 8.0  # how much longer the context is than in pretraining (Llama 3.1: 8)
    # llama3: wavelengths above original_max_positions / low_freq_factor are divided by factor
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_positions / this are kept
    original_max_positions: int = 8192  # llama3: the pretraining context length

    @classmethod
    def from_dict(cls, d: dict) -> RopeScaling:
        """From neo's keys, or transformers' (``rope_type``, ``original_max_position_embeddings``)."""
        aliases = {"rope_type": "type", "original_max_position_embeddings": "original_max_positions"}
        d = {aliases.get(k, k): v for k, v in d.items() if k != "rope_theta"}
        return cls(**{**d, "type": "none" if d.get("type") == "default" else d.get("type", "none")})


@dataclass
class ModelArgs:
    """Architecture of a GPT-NeoX-style decoder. Defaults are the GPT-NeoX / Pythia choices."""

    n_layers: int = 2  # transformer blocks
    hidden_size: int = 64  # model width (d_model)
    n_heads: int = 4  # attention heads; hidden_size / n_heads is the head size
    # Key/value heads (grouped-query attention): None means n_heads; 1 is multi-query attention. Each kv head
    # serves n_heads / n_kv_heads query heads; the KV cache holds only these. Under tensor parallelism
    # n_kv_heads must be divisible by parallel.tp (kv heads are split across ranks, never replicated).
    n_kv_heads: int | None = None
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
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    # Each position attends to the last N positions only, itself included (Mistral); None: the whole context.
    # The KV cache then keeps N positions per layer.
    sliding_window: int | None = None
    parallel_residual: bool = True  # x + attn(ln1 x) + mlp(ln2 x) (GPT-NeoX); false: sequential (GPT-2)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # normalisation layers
    norm_eps: float = 1e-5  # epsilon of every norm
    activation: Literal["gelu", "swiglu"] = "gelu"  # MLP activation (gelu is exact erf GeLU)
    tie_embeddings: bool = False  # share the input embedding with the output head
    # "lm": the language-model head; "score": one scalar per position instead (reward models)
    head: Literal["lm", "score"] = "lm"
    value_head: bool = False  # a scalar value head beside the LM head, on the same trunk (PPO's critic)
    bias: bool = True  # biases in every linear layer (attention and MLP); false: none (Llama, Mistral, Qwen2)
    qkv_bias: bool | None = None  # bias of the query/key/value projection alone; None: as bias (Qwen2: true)
    # "small_init": N(0, sqrt(2/(5h))) and wang_init 2/(L sqrt(h)) for the two output projections
    # (Pythia / GPT-NeoX); "normal": N(0, init_std) with outputs scaled by 1/sqrt(2L) (GPT-2 / Megatron).
    init_method: Literal["small_init", "normal"] = "small_init"
    init_std: float = 0.02  # std of init_method "normal"
    attention_dropout: float = 0.0  # dropout on attention probabilities (Pythia: 0)
    hidden_dropout: float = 0.0  # dropout on embeddings and residual branches
    # Tokens per chunk of the fused output head + loss: the loss holds [chunk, vocab] logits at a
    # time, never all [tokens, vocab]. 0: all logits, then the loss. Changes memory and speed, not results.
    loss_chunk_size: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # a checkpoint's neo.json holds the dataclass as a mapping
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads``, or ``n_heads`` when unset)."""
        return self.n_kv_heads or self.n_heads

    @property
    def use_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

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
