"""Numerical parity of the reference model with transformers on real HF-format checkpoints.

Each case builds a tiny random Llama / Qwen2 / Qwen3 model with transformers, saves it with
`save_pretrained` (safetensors), loads it with `load_checkpoint` and compares float32 logits:
AR without a cache, AR over the preallocated cache (prefill, then one token per step), a
sharded checkpoint, and the export roundtrip (save_checkpoint -> transformers).

All parameters are re-drawn with a large spread (norm weights around 1, biases nonzero): with
transformers' own init (std 0.02, zero biases, unit norms) attention is nearly uniform and a
dropped bias, a wrong RoPE base or a wrong norm would not show in the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tidar_export.model import masks
from tidar_export.model.checkpoint import load_checkpoint, save_checkpoint
from tidar_export.model.transformer import TiDARModel

VOCAB = 96
MASK_ID = 95  # not the TiDARConfig default (0), so reading it back proves it was stored
BLOCK = 4  # not the loader default (8), same reason
THETA = 50000.0  # not the default 10000: parity fails unless the checkpoint's theta is used
T = 24  # sequence length of the comparisons
ATOL = 2e-5  # measured max |diff|: 0 without cache, ~4e-6 through the cache, at |logits| ~5

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, rope_theta=THETA, max_position_embeddings=128, rms_norm_eps=1e-6,
)

# id -> (config class, model class, extra config kwargs)
CASES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_hidden_layers=2, tie_word_embeddings=False)),
    # head_dim 24 != hidden/heads = 16: loading at all proves head_dim is read (shapes differ).
    "qwen3-tied-hd24": (Qwen3Config, Qwen3ForCausalLM,
                        dict(num_hidden_layers=3, head_dim=24, tie_word_embeddings=True)),
    "llama": (LlamaConfig, LlamaForCausalLM,
              dict(num_hidden_layers=2, tie_word_embeddings=False, attention_bias=False)),
    "llama-bias": (LlamaConfig, LlamaForCausalLM,
                   dict(num_hidden_layers=2, tie_word_embeddings=False, attention_bias=True)),
}

# Llama/Qwen3 with attention_bias=True also bias o_proj (Qwen2 biases only q/k/v): the
# llama-bias case checks that the importer keeps that bias.


def arch_params():
    return [pytest.param(k, id=k) for k in CASES]


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)


def make_hf(case: str, seed: int = 0):
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**COMMON, **extra)).eval()
    _randomize(model)
    return model


def random_ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, T), generator=g)


def ours_ar(model: TiDARModel, ids: torch.Tensor) -> torch.Tensor:
    B, n = ids.shape
    pos = torch.arange(n)[None].expand(B, n)
    with torch.no_grad():
        logits, _, _ = model(ids, pos, masks.causal_mask(n))
    return logits


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def saved(request, tmp_path):
    """(case, hf model, folder written by save_pretrained)."""
    case = request.param
    hf = make_hf(case)
    hf.save_pretrained(tmp_path / "hf")
    return case, hf, tmp_path / "hf"


@pytest.mark.parametrize("saved", arch_params(), indirect=True)
def test_ar_logits_match_transformers(saved):
    case, hf, folder = saved
    model = load_checkpoint(folder, block_size=BLOCK, mask_token_id=MASK_ID)
    cfg, hcfg = model.cfg, hf.config

    # The config really comes from the checkpoint.
    assert cfg.arch == hcfg.model_type
    assert cfg.rope_theta == THETA
    assert cfg.head_dim == (24 if case.startswith("qwen3") else 16)
    assert cfg.num_layers == hcfg.num_hidden_layers
    assert cfg.num_kv_heads == 2
    assert cfg.tie_word_embeddings == hcfg.tie_word_embeddings
    assert cfg.qk_norm == (cfg.arch == "qwen3")
    assert cfg.attention_bias == (cfg.arch == "qwen2" or bool(getattr(hcfg, "attention_bias", False)))
    assert (cfg.block_size, cfg.mask_token_id) == (BLOCK, MASK_ID)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    if cfg.tie_word_embeddings:
        # The file has no lm_head.weight: the tied path is what got exercised.
        with safe_open(str(folder / "model.safetensors"), framework="pt") as sf:
            assert "lm_head.weight" not in set(sf.keys())
        assert model.lm_head.weight is model.model.embed_tokens.weight

    ids = random_ids()
    ref = hf_logits(hf, ids)
    diff = max_diff(ours_ar(model, ids), ref)
    print(f"{case}: AR max|diff| = {diff:.3g} (max|logit| {ref.abs().max().item():.2f})")
    assert diff < ATOL

    # The comparison is sensitive: the same weights with the default RoPE base are far off.
    wrong = TiDARModel(cfg.replace(rope_theta=10000.0)).eval()
    wrong.load_state_dict(model.state_dict())
    assert max_diff(ours_ar(wrong, ids), ref) > 1e-2


@pytest.mark.parametrize("saved", arch_params(), indirect=True)
def test_cached_decode_matches_transformers(saved):
    case, hf, folder = saved
    model = load_checkpoint(folder, block_size=BLOCK, mask_token_id=MASK_ID)
    ids = random_ids(batch=1, seed=2)
    ref = hf_logits(hf, ids)[0]  # [T, V]

    keys, values = model.new_cache(1, 64)
    P = 9
    with torch.no_grad():
        logits, keys, values = model(ids[:, :P], torch.arange(P)[None], masks.causal_mask(P),
                                     keys, values, torch.tensor([0]))
    diffs = [max_diff(logits[0], ref[:P])]
    for L in range(P, T):
        with torch.no_grad():
            logits, keys, values = model(ids[:, L:L + 1], torch.tensor([[L]]), masks.causal_mask(1),
                                         keys, values, torch.tensor([L]))
        assert logits.shape == (1, 1, VOCAB)
        diffs.append(max_diff(logits[0, 0], ref[L]))
    print(f"{case}: cached max|diff| per step = {max(diffs):.3g}")
    assert max(diffs) < ATOL, diffs
    assert keys[0].shape == (1, 2, 64, model.cfg.head_dim)
    # Every committed slot was written, the slots after them were not touched.
    assert keys[0][0, :, :T].abs().sum(-1).gt(0).all()
    assert keys[0][0, :, T:].eq(0).all()


def test_sharded_checkpoint(tmp_path):
    hf = make_hf("qwen2", seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    assert not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / s).is_file() for s in shards)

    model = load_checkpoint(tmp_path, block_size=BLOCK, mask_token_id=MASK_ID)
    ids = random_ids(seed=4)
    diff = max_diff(ours_ar(model, ids), hf_logits(hf, ids))
    print(f"sharded qwen2 ({len(shards)} shards): AR max|diff| = {diff:.3g}")
    assert diff < ATOL


@pytest.mark.parametrize("saved", arch_params(), indirect=True)
def test_roundtrip_through_transformers(saved, tmp_path):
    case, hf, folder = saved
    model = load_checkpoint(folder, block_size=BLOCK, mask_token_id=MASK_ID)
    out = save_checkpoint(model, tmp_path / "export")
    assert (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".export.*"))  # no temp folder left behind

    hf2, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    hf2.eval()
    assert type(hf2) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf2.dtype == torch.float32
    assert hf2.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = random_ids(seed=5)
    ours = ours_ar(model, ids)
    diff = max_diff(hf_logits(hf2, ids), ours)
    print(f"{case}: roundtrip transformers vs ours max|diff| = {diff:.3g}")
    assert diff < ATOL
    assert max_diff(hf_logits(hf2, ids), hf_logits(hf, ids)) < ATOL

    # TiDAR settings come back from the "tidar" key without flags; flags still override.
    again = load_checkpoint(out)
    assert again.cfg == model.cfg
    assert (again.cfg.block_size, again.cfg.mask_token_id) == (BLOCK, MASK_ID)
    assert max_diff(ours_ar(again, ids), ours) == 0.0
    override = load_checkpoint(out, block_size=6, mask_token_id=7)
    assert (override.cfg.block_size, override.cfg.mask_token_id) == (6, 7)
