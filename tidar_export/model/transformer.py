"""Reference PyTorch model for the Llama / Qwen2 / Qwen3 family, TiDAR-ready.

Module names mirror Hugging Face's (`model.layers.0.self_attn.q_proj`, ...) so that
checkpoints load by name. Written for torch.onnx's dynamo exporter: the KV cache is a flat
list of tensors (no cache objects), and the attention mask is built from tensor ops.

One forward serves every pass. The caller gives the new tokens, their position ids, the
in-step mask pattern (`tidar_export.model.masks`) and, for cached passes, the preallocated cache and
each row's committed length L. The new keys/values are written at slots L..L+T-1 (docs/ALGORITHM.md section 5)
and the updated cache is returned; nothing else of the cache changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tidar_export.model.config import TiDARConfig
from tidar_export.model.masks import cache_then_step, with_cache


def _projector(module: nn.Module, ad, draft_rows: int):
    """proj(name, x): the module's projection `name` of x, plus the draft adapter's update on the
    last `draft_rows` rows when the layer has one (tidar_export.model.adapter)."""
    if ad is None or draft_rows <= 0:
        return lambda name, x: getattr(module, name)(x)
    return lambda name, x: ad.update(name, x, getattr(module, name)(x), draft_rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # float32 at least (float64 stays: check's reference)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """RoPE's float32 inverse frequencies [head_dim / 2] (the graph builders use the same values)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, 1, T, head_dim] for the half-split ("rotate_half") RoPE layout."""
    inv_freq = inverse_frequencies(head_dim, theta, position_ids.device)
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: TiDARConfig):
        super().__init__()
        self.cfg = cfg
        h, kv, hd, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, allow, past_k, past_v, cache_len, kv_update, ad=None, draft_rows=0):
        cfg = self.cfg
        B, T, _ = x.shape
        proj = _projector(self, ad, draft_rows)
        q = proj("q_proj", x).view(B, T, cfg.num_heads, cfg.head_dim)
        k = proj("k_proj", x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = proj("v_proj", x).view(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, KV, T, hd]
        v = v.transpose(1, 2)  # [B, KV, T, hd]
        new_k, new_v = k, v
        if past_k is not None and kv_update == "inplace":
            # Write this pass's K/V at slots L..L+T-1 of the preallocated cache [B, KV, S, hd].
            slots = cache_len[:, None] + torch.arange(T, device=x.device)  # [B, T]
            index = slots[:, None, :, None].expand(B, cfg.num_kv_heads, T, cfg.head_dim)
            k = new_k = past_k.scatter(2, index, k)
            v = new_v = past_v.scatter(2, index, v)
        elif past_k is not None:  # "slice": attend over [cache | new], return only the new K/V
            k = torch.cat([past_k, k], dim=2)  # [B, KV, S + T, hd]
            v = torch.cat([past_v, v], dim=2)
        rep = cfg.num_heads // cfg.num_kv_heads
        S = k.shape[2]
        kx = k[:, :, None].expand(B, cfg.num_kv_heads, rep, S, cfg.head_dim).reshape(B, cfg.num_heads, S, cfg.head_dim)
        vx = v[:, :, None].expand(B, cfg.num_kv_heads, rep, S, cfg.head_dim).reshape(B, cfg.num_heads, S, cfg.head_dim)
        out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=allow)  # [B, H, T, hd]
        out = out.transpose(1, 2).reshape(B, T, cfg.num_heads * cfg.head_dim)
        return proj("o_proj", out), new_k, new_v


class MLP(nn.Module):
    def __init__(self, cfg: TiDARConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x, ad=None, draft_rows=0):
        proj = _projector(self, ad, draft_rows)
        return proj("down_proj", F.silu(proj("gate_proj", x)) * proj("up_proj", x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TiDARConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, allow, past_k, past_v, cache_len, kv_update, ad=None, draft_rows=0):
        """ad: this layer's draft adapter (or None), applied to the last `draft_rows` rows only."""
        if ad is not None:
            x = ad.offset(x, draft_rows)
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, allow, past_k, past_v, cache_len, kv_update,
                                 ad, draft_rows)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x), ad, draft_rows)
        return x, k, v


def _embedding(vocab: int, width: int) -> nn.Embedding:
    """nn.Embedding; on the meta device (the exporter's weightless model) without its random
    init: a meta tensor holds no values, and that init imports torch._dynamo (2 s measured)."""
    if torch.empty(0).device.type == "meta":
        return nn.Embedding(vocab, width, _weight=torch.empty(vocab, width))
    return nn.Embedding(vocab, width)


class Backbone(nn.Module):
    def __init__(self, cfg: TiDARConfig):
        super().__init__()
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class TiDARModel(nn.Module):
    """Decoder-only transformer; `forward` runs any TiDAR or AR pass over a flat KV cache."""

    def __init__(self, cfg: TiDARConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.adapter = None  # a DraftAdapter (tidar_export.model.adapter.attach) acting on mask rows only

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None):
        """Preallocated flat cache: (keys, values), each a list of [B, KV, max_len, hd] per layer."""
        cfg = self.cfg
        p = self.lm_head.weight
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        mk = lambda: torch.zeros(shape, dtype=dtype or p.dtype, device=device or p.device)  # noqa: E731
        return [mk() for _ in range(cfg.num_layers)], [mk() for _ in range(cfg.num_layers)]

    def hidden(self, input_ids, position_ids, in_step_mask, past_keys=None, past_values=None,
               cache_len=None, kv_update: str = "inplace", draft_rows: int = 0):
        """Final hidden states [B, T, d] and per-layer key/value lists.

        input_ids, position_ids: [B, T]. in_step_mask: [T, T] bool (True = may attend).
        past_keys/values: None (no cache: attend within the T tokens only) or lists of
        [B, KV, S, hd]; cache_len: [B] int64, each row's committed length L.
        kv_update (tidar_runtime.contract.KV_UPDATES): "inplace" returns the whole cache with the
        new K/V written at L..L+T-1; "slice" leaves the cache alone, attends over [cache | new] and
        returns only the new K/V [B, KV, T, hd] for the caller to write at L.
        draft_rows: the last `draft_rows` of the T rows are mask rows, the rows a draft adapter
        acts on (a static count per pass kind; 0: none, as in every AR pass). Without an adapter
        it changes nothing.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        if past_keys is None:
            allow = in_step_mask[None, None]
            past_keys = past_values = [None] * self.cfg.num_layers
        elif kv_update == "inplace":
            allow = with_cache(in_step_mask, cache_len, past_keys[0].shape[2])
        else:
            allow = cache_then_step(in_step_mask, cache_len, past_keys[0].shape[2])
        keys, values = [], []
        adapter = self.adapter if draft_rows > 0 else None
        for i, (layer, pk, pv) in enumerate(zip(self.model.layers, past_keys, past_values)):
            ad = adapter.for_layer(i) if adapter is not None else None
            x, k, v = layer(x, cos, sin, allow, pk, pv, cache_len, kv_update, ad, draft_rows)
            keys.append(k)
            values.append(v)
        return self.model.norm(x), keys, values

    def forward(self, input_ids, position_ids, in_step_mask, past_keys=None, past_values=None,
                cache_len=None, kv_update: str = "inplace", draft_rows: int = 0):
        """Logits [B, T, V] and the key/value lists (see `hidden`)."""
        h, keys, values = self.hidden(input_ids, position_ids, in_step_mask, past_keys, past_values,
                                      cache_len, kv_update, draft_rows)
        return self.lm_head(h), keys, values
