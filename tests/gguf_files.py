"""Tiny GGUF files written with the gguf package's own writer, for the import and chat tests.

`write_gguf` lays a small random Llama / Qwen2 / Qwen3 model out as llama.cpp's converter does:
tensor names blk.N.*, the Llama q/k rows reordered for llama.cpp's RoPE (`permute_rows`), each
tensor in the GGUF type the caller picks, a byte-level BPE tokenizer (256 byte tokens, a few
merges, control tokens) and a ChatML chat template. It returns the float32 weights it wrote for
the types that can be written from given values (the K-quant types are random blocks).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # K-quant blocks need 256-wide rows
# head width by architecture: Qwen3's is not hidden / heads (the file states it as key_length)
HEAD_DIMS = {"llama": HIDDEN // HEADS, "qwen2": HIDDEN // HEADS, "qwen3": 128}
THETA = 50000.0

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n"]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def byte_tokens() -> list[str]:
    """The 256 characters byte-level BPE spells bytes with, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    spelled, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


TOKENS = byte_tokens() + ["".join(m.split()) for m in MERGES] + CONTROL
VOCAB = len(TOKENS)
IM_END, MASK = TOKENS.index("<|im_end|>"), TOKENS.index("<mask>")
EOS = TOKENS.index("<|endoftext|>")

# Every supported type on some tensor of a two-layer model (norms and biases stay F32).
MIXED_TYPES = {
    "token_embd": "Q8_0", "output": "Q6_K",
    "blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q4_1", "blk.0.attn_v": "Q8_0", "blk.0.attn_output": "Q4_K",
    "blk.0.ffn_gate": "Q5_K", "blk.0.ffn_up": "Q6_K", "blk.0.ffn_down": "F16",
    "blk.1.attn_q": "BF16", "blk.1.attn_k": "F16", "blk.1.attn_v": "F32", "blk.1.attn_output": "Q4_0",
    "blk.1.ffn_gate": "Q4_1", "blk.1.ffn_up": "Q8_0", "blk.1.ffn_down": "Q4_K",
}
# K-quant layouts: bytes per 256-weight block and the offsets of its fp16 super-block scales
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,))}


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of a Llama q/k projection (what the importer undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _k_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    size, scale_at = K_QUANTS[kind]
    data = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    for at in scale_at:
        data[:, :, at:at + 2] = np.frombuffer(np.float16(3e-4).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def _add(writer, name: str, w: np.ndarray, kind: str, rng) -> None:
    if kind in K_QUANTS:
        writer.add_tensor(name, _k_blocks(*w.shape, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
    elif kind == "F32":
        writer.add_tensor(name, w.astype(np.float32))
    elif kind == "F16":
        writer.add_tensor(name, w.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), qtype), raw_dtype=qtype)


def model_tensors(arch: str, tied: bool, rng: np.random.Generator, head_dim: int) -> dict[str, np.ndarray]:
    """Random weights by GGUF name, HF row order (norms near 1, other values N(0, 0.15))."""
    t = {"token_embd.weight": rng.normal(0, 0.15, (VOCAB, HIDDEN)),
         "output_norm.weight": 1 + 0.2 * rng.normal(size=HIDDEN)}
    if not tied:
        t["output.weight"] = rng.normal(0, 0.15, (VOCAB, HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}."
        t |= {p + "attn_norm.weight": 1 + 0.2 * rng.normal(size=HIDDEN),
              p + "ffn_norm.weight": 1 + 0.2 * rng.normal(size=HIDDEN),
              p + "attn_q.weight": rng.normal(0, 0.15, (HEADS * head_dim, HIDDEN)),
              p + "attn_k.weight": rng.normal(0, 0.15, (KV_HEADS * head_dim, HIDDEN)),
              p + "attn_v.weight": rng.normal(0, 0.15, (KV_HEADS * head_dim, HIDDEN)),
              p + "attn_output.weight": rng.normal(0, 0.15, (HIDDEN, HEADS * head_dim)),
              p + "ffn_gate.weight": rng.normal(0, 0.15, (FFN, HIDDEN)),
              p + "ffn_up.weight": rng.normal(0, 0.15, (FFN, HIDDEN)),
              p + "ffn_down.weight": rng.normal(0, 0.15, (HIDDEN, FFN))}
        if arch == "qwen2":
            for part, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                t[p + f"attn_{part}.bias"] = rng.normal(0, 0.15, n * head_dim)
        if arch == "qwen3":
            t[p + "attn_q_norm.weight"] = 1 + 0.2 * rng.normal(size=head_dim)
            t[p + "attn_k_norm.weight"] = 1 + 0.2 * rng.normal(size=head_dim)
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_gguf(path: Path, arch: str = "llama", types: dict[str, str] | None = None, tied: bool = False,
               tokenizer_model: str = "gpt2", pre: str = "smollm", template: str | None = CHATML,
               eot: int | None = None, add_bos: bool = False, extra: dict[str, np.ndarray] | None = None,
               drop: tuple[str, ...] = (), seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny model as a GGUF file; returns its weights by GGUF name in HF row order."""
    rng = np.random.default_rng(seed)
    types = MIXED_TYPES if types is None else types
    tensors = model_tensors(arch, tied, rng, HEAD_DIMS[arch]) | (extra or {})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    if arch == "qwen3":
        writer.add_key_length(HEAD_DIMS[arch])
        writer.add_value_length(HEAD_DIMS[arch])
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if t in CONTROL else gguf.TokenType.NORMAL for t in TOKENS])
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(EOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(add_bos)
    if eot is not None:
        writer.add_eot_token_id(eot)
    if template is not None:
        writer.add_chat_template(template)
    for name, w in tensors.items():
        if name in drop:
            continue
        stem = name.rsplit(".", 1)[0]
        stored = w
        if arch == "llama" and stem.endswith(("attn_q", "attn_k")):
            stored = permute_rows(w, HEADS if stem.endswith("attn_q") else KV_HEADS)
        _add(writer, name, stored, types.get(stem, "F32") if w.ndim == 2 else "F32", rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
