"""Import a GGUF file (llama.cpp's single-file format) as a TiDAR checkpoint folder.

    tidar-export import model.gguf -o CKPT --mask-token-id ID

The file is read with the `gguf` package (the ggml project's reader; `pip install
'tidar-export[gguf]'`). What it holds becomes the same HF-format folder `import` writes for
a transformers folder (model/checkpoint.py), so every later command reads it unchanged:

- weights: every tensor dequantized to float32 (WEIGHT_TYPES), renamed to the HF names
  (`hf_name`). llama.cpp's converter reorders the rows of a Llama model's q/k projections for
  its RoPE kernel; `unpermute_rows` puts them back (Qwen2/Qwen3 files are not reordered).
  Names, types and shapes are checked first (`WeightPlan`); then model.safetensors is written
  one tensor at a time (`write_weights`) from the memory-mapped file, so the import holds one
  float32 tensor, never the model.
- config.json: from the `<arch>.*` metadata (`hf_config`), validated by `config_from_hf`.
- tokenizer.json: rebuilt from `tokenizer.ggml.*` (`build_tokenizer`): byte-level BPE
  ("gpt2" model) with the file's merges and the pre-tokenizer its `tokenizer.ggml.pre` names;
  control tokens become special tokens. tokenizer_config.json names the special tokens.
- chat_template.jinja: `tokenizer.chat_template`, when the file has one.
- gguf_source.json (GGUF_SOURCE_FILE): the file's name and the GGUF type of every tensor, by HF
  name. For tensors stored as Q4_0 / Q4_1 blocks (32 weights sharing a scale, and for Q4_1 a
  minimum) it also names `gguf_blocks.safetensors`, which holds per tensor `<name>.scales`
  (and `<name>.mins` for Q4_1), float16 [rows, cols / 32], in the checkpoint's row order. The
  float32 weight then gives each block's 4-bit values exactly: q = round(w / scale) + 8 (Q4_0),
  q = round((w - min) / scale) (Q4_1), so an int4 step can keep the file's own quantization.

Anything the importer does not implement is a one-line TiDARError: another architecture, a
tensor type outside WEIGHT_TYPES, RoPE scaling, a tokenizer model or pre-tokenizer it does not
know.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tidar_export.errors import TiDARError
from tidar_export.model.checkpoint import (HF_ARCH_NAMES, _check_names, check_tensor_values, config_from_hf,
                                           config_to_hf)
from tidar_export.model.config import TiDARConfig
from tidar_export.model.transformer import TiDARModel
from tidar_runtime import fileio
from tidar_runtime.chat import CHAT_TEMPLATE_FILE

GGUF_MAGIC = b"GGUF"
GGUF_SOURCE_FILE = "gguf_source.json"
GGUF_BLOCKS_FILE = "gguf_blocks.safetensors"

# Tensor types read (dequantized to float32 by gguf.quants.dequantize). Each is tested against
# transformers' own GGUF reader (tests/test_gguf_import.py).
WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
BLOCK_TYPES = ("Q4_0", "Q4_1")  # 32-weight blocks recorded in gguf_blocks.safetensors
BLOCK = 32

# GGUF tensor names -> HF names: the model-level ones, and the per-layer suffixes of blk.N.*
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# Pre-tokenizers by `tokenizer.ggml.pre`: the regular expressions llama.cpp splits text with
# before BPE, applied in order (each splits the pieces of the one before).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "gpt2": (GPT2_SPLIT,),
    "smollm": (r"\p{N}", GPT2_SPLIT), "starcoder": (r"\p{N}", GPT2_SPLIT), "refact": (r"\p{N}", GPT2_SPLIT),
    "llama3": (LLAMA3_SPLIT,), "llama-v3": (LLAMA3_SPLIT,), "llama-bpe": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
}
IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe")  # llama.cpp looks a whole piece up before merging
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


# --------------------------------------------------------------------------- the file


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str | os.PathLike):
    """The gguf package's reader over `path` (memory-mapped); one-line errors."""
    try:
        import gguf
    except ImportError:
        raise TiDARError("reading GGUF files needs the gguf package: pip install 'tidar-export[gguf]'") from None
    if not is_gguf(path):
        raise TiDARError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError / struct errors / UnicodeDecodeError on bad files
        raise TiDARError(f"{path}: cannot read GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                         [:300]) from None


def read_metadata(reader, path) -> dict:
    """Every key-value field of the file as Python values (strings, numbers, lists)."""
    try:
        return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise TiDARError(f"{path}: malformed GGUF metadata ({type(e).__name__})") from None


def _meta(meta: dict, key: str, kind: type, default=None, required: bool = False):
    """meta[key] checked to be of `kind` (int / float / str / bool); one-line error otherwise."""
    if key not in meta:
        if required:
            raise TiDARError(f"GGUF metadata has no {key!r}")
        return default
    v = meta[key]
    ok = (type(v) is bool) if kind is bool else (
        isinstance(v, (int, float)) and type(v) is not bool if kind is float else type(v) is kind)
    if not ok:
        raise TiDARError(f"GGUF metadata {key} must be {kind.__name__}, got {str(v)[:60]!r}")
    return float(v) if kind is float else v


# --------------------------------------------------------------------------- config


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
    """The HF config.json dict this file describes (validated afterwards by config_from_hf)."""
    arch = _meta(meta, "general.architecture", str, required=True)
    if arch not in HF_ARCH_NAMES:
        raise TiDARError(f"unsupported GGUF architecture {arch[:60]!r}: supported are {', '.join(HF_ARCH_NAMES)}")
    if "rope_freqs.weight" in tensor_names:
        raise TiDARError("unsupported RoPE scaling: the file has rope_freqs (Llama 3.1 style); only plain RoPE "
                         "is implemented")
    scaling = _meta(meta, f"{arch}.rope.scaling.type", str, "none")
    heads = _meta(meta, f"{arch}.attention.head_count", int, required=True)
    hidden = _meta(meta, f"{arch}.embedding_length", int, required=True)
    head_dim = _meta(meta, f"{arch}.attention.key_length", int, hidden // max(heads, 1))
    if _meta(meta, f"{arch}.attention.value_length", int, head_dim) != head_dim:
        raise TiDARError("unsupported GGUF model: attention key and value widths differ")
    if _meta(meta, f"{arch}.rope.dimension_count", int, head_dim) != head_dim:
        raise TiDARError("unsupported GGUF model: RoPE on part of each head (rope.dimension_count < head width)")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _meta(meta, f"{arch}.vocab_size", int, len(tokens) if isinstance(tokens, list) else None)
    if vocab is None:
        raise TiDARError(f"GGUF metadata has no {arch}.vocab_size and no tokenizer.ggml.tokens")
    hf = {
        "model_type": arch,
        "architectures": [HF_ARCH_NAMES[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _meta(meta, f"{arch}.feed_forward_length", int, required=True),
        "num_hidden_layers": _meta(meta, f"{arch}.block_count", int, required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(meta, f"{arch}.attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rope_theta": _meta(meta, f"{arch}.rope.freq_base", float, 10000.0),
        "rms_norm_eps": _meta(meta, f"{arch}.attention.layer_norm_rms_epsilon", float, 1e-6),
        "max_position_embeddings": _meta(meta, f"{arch}.context_length", int, 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _meta(meta, "tokenizer.ggml.bos_token_id", int),
        "eos_token_id": eos_ids(meta),
    }
    if scaling != "none":
        hf["rope_scaling"] = {"rope_type": scaling}  # refused by config_from_hf with its usual message
    return hf


def eos_ids(meta: dict) -> int | list[int] | None:
    """The ids that end a sequence: the file's eos, and its end-of-turn / end-of-message tokens
    when it names others (Llama 3 ends a turn with <|eot_id|>, not with its eos)."""
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = _meta(meta, key, int)
        if v is not None and v not in ids:
            ids.append(v)
    return None if not ids else ids[0] if len(ids) == 1 else ids


# --------------------------------------------------------------------------- weights


def hf_name(name: str) -> str | None:
    """The HF name of a GGUF tensor name, or None for a name this importer does not know."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{kind}"
    return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a Llama q/k projection (rows, or bias entries): within each
    head it stores the rotary pairs interleaved (0, d/2, 1, d/2+1, ...); HF keeps two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _block_scales(data: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """The fp16 scale (and minimum) of every 32-weight block of a Q4_0 / Q4_1 tensor, [rows, cols/32]."""
    per_block = 18 if kind == "Q4_0" else 20
    blocks = np.ascontiguousarray(data).reshape(data.shape[0], -1, per_block)
    out = {"scales": np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0]}
    if kind == "Q4_1":
        out["mins"] = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0]
    return out


class WeightPlan:
    """The file's tensors as the checkpoint will hold them: HF name -> (GGUF tensor, heads of the
    Llama row order to undo or None), names, types and shapes checked against the model of
    `cfg` before anything is dequantized."""

    def __init__(self, reader, cfg: TiDARConfig, path):
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in TiDARModel(cfg).state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        permuted = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads} \
            if cfg.arch == "llama" else {}
        self.path = Path(path)
        self.tensors: dict[str, tuple[object, int | None]] = {}
        unknown = []
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None or name not in expected:
                unknown.append(t.name)
                continue
            if t.tensor_type.name not in WEIGHT_TYPES:
                raise TiDARError(f"{path}: tensor {t.name} has type {t.tensor_type.name}: supported are "
                                 f"{', '.join(WEIGHT_TYPES)}")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            if shape != expected[name]:
                raise TiDARError(f"{path}: tensor {t.name} has shape {shape}, the config implies {expected[name]}")
            heads = next((n for part, n in permuted.items() if f".{part}." in name), None)
            self.tensors[name] = (t, heads)
        # a file tensor this model has no place for would be dropped silently: refuse it
        _check_names(self.path, cfg.arch, expected, self.tensors, unknown)

    @property
    def types(self) -> dict[str, str]:
        """HF name -> the GGUF type it is stored in."""
        return {name: t.tensor_type.name for name, (t, _) in self.tensors.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self.tensors[name][0].shape.tolist()))

    def array(self, name: str) -> np.ndarray:
        """One tensor dequantized to float32, in HF row order, checked finite."""
        from gguf.quants import dequantize

        t, heads = self.tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(self.shape(name))
        except (ValueError, NotImplementedError) as e:
            raise TiDARError(f"{self.path}: cannot dequantize {t.name} ({t.tensor_type.name}): {str(e)[:100]}") from None
        if heads is not None:
            w = unpermute_rows(w, heads)
        w = np.ascontiguousarray(w)
        check_tensor_values(self.path, name, torch.from_numpy(w) if w.flags.writeable else torch.tensor(w))
        return w

    def block_scales(self) -> dict[str, torch.Tensor]:
        """'<name>.scales' / '<name>.mins' of every Q4_0 / Q4_1 tensor, in HF row order."""
        out = {}
        for name, (t, heads) in self.tensors.items():
            if t.tensor_type.name in BLOCK_TYPES:
                for key, scale in _block_scales(t.data, t.tensor_type.name).items():
                    out[f"{name}.{key}"] = torch.from_numpy(unpermute_rows(scale, heads) if heads else scale)
        return out


def write_weights(plan: WeightPlan, out: Path) -> None:
    """model.safetensors of the plan's tensors (float32), written tensor by tensor: the header
    first (shapes are known), then each tensor dequantized in turn, so memory holds one tensor,
    never the model."""
    names = list(plan.tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = int(np.prod(plan.shape(name), dtype=np.int64)) * 4
        header[name] = {"dtype": "F32", "shape": list(plan.shape(name)), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(out, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            f.write(memoryview(plan.array(name)).cast("B"))


# --------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> set[str]:
    """The 256 printable characters byte-level BPE spells bytes with (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return {chr(b) for b in keep} | {chr(256 + i) for i in range(len(extra))}


def build_tokenizer(meta: dict) -> tuple[object, dict]:
    """(a `tokenizers` Tokenizer, the tokenizer_config.json dict) from the file's tokenizer.ggml.*
    metadata; one-line errors for what is not implemented."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _meta(meta, "tokenizer.ggml.model", str, required=True)
    if model != "gpt2":
        raise TiDARError(f"unsupported GGUF tokenizer model {model[:40]!r}: only byte-level BPE ('gpt2') is "
                         "implemented (SentencePiece 'llama' and others are not)")
    pre = _meta(meta, "tokenizer.ggml.pre", str, "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise TiDARError(f"unsupported GGUF pre-tokenizer {pre[:40]!r}: supported are {', '.join(PRE_TOKENIZERS)}")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not isinstance(merges, list):
        raise TiDARError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicate spelling keeps its first id
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise TiDARError("GGUF tokenizer.ggml.merges: every merge must be two tokens separated by a space")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = _byte_alphabet()
    added = [AddedToken(t, special=kind == CONTROL, normalized=False)
             for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED) or not set(t) <= alphabet]
    tok.add_tokens(added)  # matched whole in the text, before BPE (as llama.cpp does)
    special = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key, meta_key in special.items():
        i = _meta(meta, meta_key, int)
        if i is not None and 0 <= i < len(tokens):
            config[key] = tokens[i]
    add_bos, add_eos = _meta(meta, "tokenizer.ggml.add_bos_token", bool, False), \
        _meta(meta, "tokenizer.ggml.add_eos_token", bool, False)
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    around = ([config["bos_token"]] if add_bos and "bos_token" in config else []) + ["$A"] + \
             ([config["eos_token"]] if add_eos and "eos_token" in config else [])
    if len(around) > 1:
        tok.post_processor = processors.TemplateProcessing(
            single=around, special_tokens=[(t, vocab[t]) for t in around if t != "$A"])
    return tok, config


# --------------------------------------------------------------------------- import


def import_gguf(path: str | os.PathLike, output: str | os.PathLike, block_size: int | None = None,
                mask_token_id: int | None = None, force: bool = False) -> tuple[Path, TiDARConfig]:
    """Write the checkpoint folder of the GGUF file `path` (atomically, under the output policy)."""
    output = fileio.prepare_output(output, "checkpoint", force, inputs=[path])
    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    hf = hf_config(meta, {t.name for t in reader.tensors})
    cfg = config_from_hf(hf, block_size, mask_token_id)
    tokenizer, tok_config = build_tokenizer(meta)  # before the weights: a tokenizer error comes fast
    template = meta.get("tokenizer.chat_template")
    plan = WeightPlan(reader, cfg, path)  # names, types and shapes, before any work
    blocks = plan.block_scales()
    tmp = fileio.staging_dir(output)
    try:
        write_weights(plan, tmp / "model.safetensors")
        config = config_to_hf(cfg)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        if isinstance(template, str) and template:
            (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        source = {"file": Path(path).name, "architecture": hf["model_type"], "tensor_types": plan.types}
        if blocks:
            save_file(blocks, str(tmp / GGUF_BLOCKS_FILE), metadata={"block": str(BLOCK)})
            source["blocks"] = GGUF_BLOCKS_FILE
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        fileio.publish_dir(tmp, output, "checkpoint", force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output, cfg
