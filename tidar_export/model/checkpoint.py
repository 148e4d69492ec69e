"""Checkpoint import and export: local HF-format folders (config.json + safetensors).

Read: a Llama / Qwen2 / Qwen3 folder as transformers writes it, one file or sharded
(`model.safetensors.index.json`). TiDAR settings live under one key of config.json:

    "tidar": {"block_size": 8, "mask_token_id": 151643}

and can be given or overridden by the caller (CLI flags). Write: the same format, so that
transformers and every other tool of the ecosystem can open what this project saves.
Weights are read only from safetensors; pickled files are never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidar_export.model.config import SUPPORTED_ARCHS, TiDARConfig, is_int, is_number
from tidar_export.errors import TiDARError
from tidar_export.model.transformer import TiDARModel
from tidar_runtime import fileio
from tidar_runtime.chat import CHAT_TEMPLATE_FILE
from tidar_runtime.manifest import read_json
from tidar_runtime.paths import checkpoint_root, confined

TIDAR_KEY = "tidar"  # config.json key that holds the TiDAR settings
HF_ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", CHAT_TEMPLATE_FILE)


def _rope_theta(hf: dict) -> float:
    if "rope_parameters" in hf and hf["rope_parameters"]:  # transformers >= 5
        params = hf["rope_parameters"]
        key = "rope_parameters"
    else:
        params = hf.get("rope_scaling") or {}
        key = "rope_scaling"
    if not isinstance(params, dict):
        raise TiDARError(f"config.json: {key} must be an object, got {params!r}"[:200])
    if key == "rope_parameters":
        kind, theta = params.get("rope_type", "default"), params.get("rope_theta")
    else:
        kind, theta = params.get("rope_type", params.get("type", "default")), hf.get("rope_theta")
    if kind != "default":
        raise TiDARError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is implemented"[:200])
    if theta is None:
        return 10000.0
    if not is_number(theta) or theta <= 0:
        raise TiDARError(f"config.json: rope_theta must be a positive number, got {theta!r}"[:200])
    return float(theta)


# config.json keys read as integers, and the ones read as booleans (checked before any arithmetic).
HF_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id")
HF_BOOL_KEYS = ("attention_bias", "tie_word_embeddings", "use_sliding_window", "mlp_bias")


def check_hf_types(hf: dict) -> None:
    """Types of the config.json values this importer reads; a one-line TiDARError naming the key.
    Bounds are checked by TiDARConfig (model/config.py: check_config)."""
    for key in HF_INT_KEYS:
        v = hf.get(key)
        if v is not None and (not is_int(v) or v < (0 if key == "bos_token_id" else 1)):
            raise TiDARError(f"config.json: {key} must be a positive integer, got {v!r}"[:200])
    for key in HF_BOOL_KEYS:
        v = hf.get(key)
        if v is not None and type(v) is not bool:
            raise TiDARError(f"config.json: {key} must be true or false, got {v!r}"[:200])
    eos = hf.get("eos_token_id")
    if eos is not None and not (is_int(eos) or (isinstance(eos, list) and all(is_int(x) for x in eos))):
        raise TiDARError(f"config.json: eos_token_id must be an integer or a list of them, got {eos!r}"[:200])
    eps = hf.get("rms_norm_eps")
    if eps is not None and not is_number(eps):
        raise TiDARError(f"config.json: rms_norm_eps must be a number, got {eps!r}"[:200])
    tidar = hf.get(TIDAR_KEY)
    if tidar is not None and not isinstance(tidar, dict):
        raise TiDARError(f"config.json: {TIDAR_KEY!r} must be an object, got {tidar!r}"[:200])
    for key in ("block_size", "mask_token_id"):
        v = (tidar or {}).get(key)
        if v is not None and not is_int(v):
            raise TiDARError(f"config.json: {TIDAR_KEY}.{key} must be an integer, got {v!r}"[:200])


def config_from_hf(hf: dict, block_size: int | None = None, mask_token_id: int | None = None) -> TiDARConfig:
    """TiDARConfig from an HF config.json dict; explicit arguments override the `tidar` key."""
    arch = hf.get("model_type")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        names = hf.get("architectures")
        name = names[0] if isinstance(names, list) and names else arch
        raise TiDARError(
            f"unsupported architecture {str(name)[:60]!r} (model_type {str(arch)[:60]!r}): supported are "
            + ", ".join(HF_ARCH_NAMES.values())
        )
    if hf.get("use_sliding_window"):
        raise TiDARError("sliding-window attention checkpoints are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise TiDARError(f"unsupported activation {str(hf['hidden_act'])[:60]!r}: only SwiGLU (silu) is implemented")
    if hf.get("mlp_bias"):
        raise TiDARError("MLP biases (mlp_bias=true) are not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise TiDARError(f"config.json has no {key!r}")
    check_hf_types(hf)
    tidar = hf.get(TIDAR_KEY) or {}
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    if isinstance(eos, list) and len(eos) < 2:  # [] or [id]: what a plain value says
        eos = eos[0] if eos else None
    vocab = hf["vocab_size"]
    mask_id = mask_token_id if mask_token_id is not None else tidar.get("mask_token_id")
    if mask_id is None:
        raise TiDARError("no mask token id: the checkpoint has no 'tidar.mask_token_id'; pass --mask-token-id")
    return TiDARConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=_rope_theta(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        block_size=block_size if block_size is not None else tidar.get("block_size", 8),
        mask_token_id=mask_id,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
    )


def config_to_hf(cfg: TiDARConfig) -> dict:
    """The HF config.json dict for `cfg`, TiDAR settings under the `tidar` key."""
    hf = {
        "architectures": [HF_ARCH_NAMES[cfg.arch]],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
        TIDAR_KEY: {"block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id},
    }
    if cfg.arch == "llama":
        hf["attention_bias"] = cfg.attention_bias
        hf["mlp_bias"] = False
    if cfg.arch == "qwen3":
        hf["attention_bias"] = cfg.attention_bias
    return hf


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, limit=64 << 20)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TiDARError(f"{index}: not a valid safetensors index ('weight_map' must map tensor names to files)")
        root = checkpoint_root(folder)
        files = sorted({confined(folder, f, f"{index}: shard", root=root) for f in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {pickled[0]}: convert it to safetensors; pickled weights are never loaded)" if pickled else ""
        raise TiDARError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise TiDARError(f"{folder}: missing weight shard {missing[0]}")
    return files


def read_config(folder: str | os.PathLike, block_size: int | None = None,
                mask_token_id: int | None = None) -> TiDARConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise TiDARError(f"checkpoint folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise TiDARError(f"{folder}: no config.json")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise TiDARError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return config_from_hf(hf, block_size, mask_token_id)


def _check_names(folder: Path, arch: str, expected, found, unexpected: list[str]) -> None:
    """One-line errors for checkpoint tensors the model does not have, then for model tensors the
    checkpoint lacks (load_checkpoint and open_streamed alike)."""
    if unexpected:
        raise TiDARError(f"{folder}: {len(unexpected)} checkpoint tensors are not supported by the "
                         f"{arch} model, first {sorted(unexpected)[0]}")
    missing = sorted(set(expected) - set(found))
    if missing:
        raise TiDARError(f"{folder}: {len(missing)} tensors missing from the checkpoint, first {missing[0]}")


def load_checkpoint(folder: str | os.PathLike, block_size: int | None = None,
                    mask_token_id: int | None = None, dtype: torch.dtype = torch.float32) -> TiDARModel:
    """Load a local HF-format checkpoint into the reference model (eval mode)."""
    folder = Path(folder)
    cfg = read_config(folder, block_size, mask_token_id)
    with torch.device("meta"):
        model = TiDARModel(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []  # tensors the model has no place for: dropping them would be silent
    for f in _weight_files(folder):
        try:
            check_safetensors_header(f)  # before the safetensors library parses it (it allows 100 MB)
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name in expected:
                        state[name] = sf.get_tensor(name)
                    elif not (name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"):
                        unexpected.append(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise TiDARError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    _check_names(folder, cfg.arch, expected, state, unexpected)
    for name, t in state.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise TiDARError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, config implies {want}")
        check_tensor_values(folder, name, t)
    model = TiDARModel(cfg).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    attach_folder_adapter(model, folder)
    return model.eval()


def attach_folder_adapter(model: TiDARModel, folder: Path) -> None:
    """Attach the draft adapter stored beside the checkpoint's config.json, if there is one."""
    from tidar_export.model import adapter

    if adapter.has_adapter(folder):
        adapter.attach(model, *adapter.read_adapter(folder))


def check_tensor_values(folder: Path, name: str, t: torch.Tensor) -> None:
    """A checkpoint weight must be a floating-point tensor of finite values (an int64 tensor would
    be cast silently; NaN or inf decodes garbage)."""
    if not t.is_floating_point():
        raise TiDARError(f"{folder}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                         "a floating-point type is expected")
    # the float64 sum is finite iff every value is (NaN and inf propagate, and no sum of finite
    # float32/16 values overflows float64); one pass, no boolean tensor of the tensor's size
    if not bool(t.sum(dtype=torch.float64).isfinite()):
        raise TiDARError(f"{folder}: tensor {name} holds NaN or infinite values")


def write_checkpoint_files(model: TiDARModel, folder: Path, tokenizer_from: str | os.PathLike | None = None) -> None:
    """The HF-format files of `model` (and the tokenizer files of `tokenizer_from`) into the existing folder."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith("adapter.")}  # a draft adapter has files of its own
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model.adapter is not None:
        from tidar_export.model.adapter import write_adapter

        write_adapter(model.adapter, folder)
    hf = config_to_hf(model.cfg)
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_from is not None:
        root = checkpoint_root(tokenizer_from) if Path(tokenizer_from).is_dir() else None
        for name in TOKENIZER_FILES:
            src = confined(tokenizer_from, name, f"{tokenizer_from}: tokenizer file", root=root)
            if src.is_file():
                shutil.copyfile(src, folder / name)
        template = config_chat_template(folder / "tokenizer_config.json")
        if template is not None and not (folder / CHAT_TEMPLATE_FILE).exists():
            (folder / CHAT_TEMPLATE_FILE).write_text(template)


def config_chat_template(path: Path) -> str | None:
    """The chat template an HF tokenizer_config.json holds ("chat_template": the source, or a list
    of {"name", "template"} whose "default" entry is taken), or None."""
    if not path.is_file():
        return None
    config = read_json(path)
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def write_adapter_checkpoint(model: TiDARModel, folder: Path, base: str | os.PathLike,
                             tokenizer_from: str | os.PathLike | None = None) -> None:
    """The files of `model` (a frozen `base` checkpoint with a draft adapter) into the existing
    folder: base's weight files hard-linked where the file system allows (else copied), then
    config.json, the adapter files and the tokenizer files."""
    from tidar_export.model.adapter import write_adapter

    base = Path(base)
    for f in _weight_files(base) + sorted(base.glob("*.safetensors.index.json")):
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copyfile(f, folder / f.name)
    hf = config_to_hf(model.cfg)
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_adapter(model.adapter, folder)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_from) / name
            if src.is_file():
                shutil.copyfile(src, folder / name)


def save_checkpoint(model: TiDARModel, folder: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
                    force: bool = False) -> Path:
    """Write `model` as an HF-format folder, atomically (staging folder, then rename). The output
    policy (tidar_runtime.fileio.prepare_output) applies: a non-empty folder that is not a TiDAR
    checkpoint is refused unless `force`; a file, or a folder holding `tokenizer_from`, always."""
    folder = fileio.prepare_output(folder, "checkpoint", force,
                                   inputs=[tokenizer_from] if tokenizer_from is not None else [])
    tmp = fileio.staging_dir(folder)
    try:
        write_checkpoint_files(model, tmp, tokenizer_from)
        fileio.publish_dir(tmp, folder, "checkpoint", force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------- streaming from shards
#
# A large checkpoint (the paper's 8B: 16 GB of bf16) must not be held in memory whole to be
# exported. `open_streamed` reads only the safetensors headers, checks every tensor name and
# shape against the config, and returns a model whose parameters are zero-stride placeholders
# (one element each, the full shape: enough for torch.export to trace) together with a
# `StreamedWeights` that reads one tensor at a time from its shard when the exporter writes it
# to the artifact's weights file. `write_random_checkpoint` is the writing side: a randomly
# initialised checkpoint of any preset, generated tensor by tensor into bounded shards.

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_ST_OTHER = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
DEFAULT_SHARD_BYTES = 2 << 30  # bytes of tensor data per written shard (what `write_random_checkpoint` holds at once)


MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON; a real header names ~150 bytes per tensor


def _header_length(f) -> int:
    """The JSON header's length of an open safetensors file, refused beyond MAX_SAFETENSORS_HEADER
    or the file's size before anything is read or parsed."""
    n = int.from_bytes(f.read(8), "little")
    size = os.fstat(f.fileno()).st_size
    if not 2 <= n <= min(MAX_SAFETENSORS_HEADER, size - 8):
        raise ValueError(f"header length {n} (at most {MAX_SAFETENSORS_HEADER} and within the file's {size} bytes)")
    return n


def check_safetensors_header(path: Path) -> None:
    """ValueError if the header of safetensors file `path` is over MAX_SAFETENSORS_HEADER bytes."""
    with open(path, "rb") as f:
        _header_length(f)


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header dict) of one safetensors file, without reading data."""
    try:
        with open(path, "rb") as f:
            n = _header_length(f)
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise TiDARError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


class StreamedWeights:
    """The checkpoint tensors of a model, read one at a time from their shards (`array`)."""

    def __init__(self, folder: Path, entries: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]],
                 dtype: torch.dtype):
        self.folder = folder  # the checkpoint, for messages
        self._entries = entries  # name -> (file, byte offset, byte length, stored dtype, shape)
        self.dtype = dtype  # what `array` returns

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][4]

    def location(self, name: str) -> tuple[str, int]:
        """(file, byte offset): the same for a tensor's every name (tied embeddings)."""
        return str(self._entries[name][0]), self._entries[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard now and converted to `dtype` (a fresh CPU tensor)."""
        path, offset, length, stored, shape = self._entries[name]
        buf = bytearray(length)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != length:
                raise TiDARError(f"{path}: truncated tensor {name}")
        t = torch.frombuffer(buf, dtype=stored).reshape(shape) if length else torch.empty(shape, dtype=stored)
        check_tensor_values(self.folder, name, t)  # finite, as load_checkpoint checks each tensor
        return t if stored == self.dtype else t.to(self.dtype)


def open_streamed(folder: str | os.PathLike, block_size: int | None = None, mask_token_id: int | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[TiDARModel, StreamedWeights]:
    """A traceable model of the checkpoint's shapes whose parameters hold no data, and the
    checkpoint's tensors to stream (names and shapes checked as `load_checkpoint` checks them)."""
    folder = Path(folder)
    cfg = read_config(folder, block_size, mask_token_id)
    with torch.device("meta"):
        model = TiDARModel(cfg).to(dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    entries, unexpected = {}, []
    for f in _weight_files(folder):
        start, header = _safetensors_header(f)
        for name, info in header.items():
            if name not in expected:
                if not (name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"):
                    unexpected.append(name)
                continue
            stored = _ST_DTYPES.get(info.get("dtype"))
            if stored is None and info.get("dtype") in _ST_OTHER:  # the message load_checkpoint gives
                raise TiDARError(f"{folder}: tensor {name} has dtype {_ST_OTHER[info['dtype']]}, "
                                 "a floating-point type is expected")
            if stored is None:
                raise TiDARError(f"{f}: tensor {name} has dtype {info.get('dtype')}; streaming reads "
                                 f"{', '.join(_ST_DTYPES)}")
            begin, end = info["data_offsets"]
            entries[name] = (f, start + begin, end - begin, stored, tuple(info["shape"]))
    _check_names(folder, cfg.arch, expected, entries, unexpected)
    for name, (f, _, length, stored, shape) in entries.items():
        if shape != expected[name]:
            raise TiDARError(f"{folder}: tensor {name} has shape {shape}, config implies {expected[name]}")
        if length != int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=stored).element_size():
            raise TiDARError(f"{f}: tensor {name} has {length} bytes, its shape and dtype need another size")
    if cfg.tie_word_embeddings:  # one parameter, two names: the graphs may call it either
        entries["lm_head.weight"] = entries["model.embed_tokens.weight"]
    # Placeholders: one element broadcast to the full shape (zero strides), on the CPU like the
    # tracer's inputs; tied parameters stay one object.
    placeholders: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in placeholders:
                    placeholders[id(p)] = torch.nn.Parameter(torch.zeros((), dtype=dtype).expand(p.shape),
                                                             requires_grad=False)
                module._parameters[key] = placeholders[id(p)]
    attach_folder_adapter(model, folder)  # small: its tensors are held in memory, not streamed
    return model.eval(), StreamedWeights(folder, entries, dtype)


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """HF-style init: N(0, 0.02) for matrices (row chunks, so no fp32 copy of a whole matrix),
    ones for norm weights, zeros for biases."""
    if len(shape) == 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    rows = max(1, (64 << 20) // (4 * int(np.prod(shape[1:]))))  # <= 64 MiB of fp32 at a time
    for i in range(0, shape[0], rows):
        out[i:i + rows] = torch.randn((min(rows, shape[0] - i), *shape[1:]), generator=gen).mul_(0.02)
    return out


def write_random_checkpoint(cfg: TiDARConfig, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                            seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES, force: bool = False) -> Path:
    """A randomly initialised HF-format checkpoint of `cfg`, written tensor by tensor: at most
    one shard (`shard_bytes` of data) is in memory. One `model.safetensors` when it fits in a
    shard, else `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`.
    Atomic and under the output policy, as `save_checkpoint`."""
    folder = fileio.prepare_output(folder, "checkpoint", force)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in TiDARModel(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    tmp = fileio.staging_dir(folder)
    gen = torch.Generator().manual_seed(seed)
    try:
        weight_map = {}
        for file, names in zip(files, groups):
            shard = {name: _random_tensor(name, shapes[name], dtype, gen) for name in names}
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            del shard
        if len(files) > 1:
            total = sum(int(np.prod(s, dtype=np.int64)) * itemsize for s in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        hf = config_to_hf(cfg)
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        fileio.publish_dir(tmp, folder, "checkpoint", force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
