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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidar_export.model.config import SUPPORTED_ARCHS, TiDARConfig, is_int, is_number
from tidar_export.errors import TiDARError
from tidar_export.model.transformer import TiDARModel
from tidar_runtime import fileio
from tidar_runtime.manifest import read_json
from tidar_runtime.paths import checkpoint_root, confined

TIDAR_KEY = "tidar"  # config.json key that holds the TiDAR settings
HF_ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")


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
    if isinstance(eos, list):
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
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name in expected:
                        state[name] = sf.get_tensor(name)
                    elif not (name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"):
                        unexpected.append(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise TiDARError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    if unexpected:
        raise TiDARError(f"{folder}: {len(unexpected)} checkpoint tensors are not supported by the "
                         f"{cfg.arch} model, first {sorted(unexpected)[0]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TiDARError(f"{folder}: {len(missing)} tensors missing from the checkpoint, first {missing[0]}")
    for name, t in state.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise TiDARError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, config implies {want}")
        check_tensor_values(folder, name, t)
    model = TiDARModel(cfg).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.eval()


def check_tensor_values(folder: Path, name: str, t: torch.Tensor) -> None:
    """A checkpoint weight must be a floating-point tensor of finite values (an int64 tensor would
    be cast silently; NaN or inf decodes garbage)."""
    if not t.is_floating_point():
        raise TiDARError(f"{folder}: tensor {name} has dtype {str(t.dtype).removeprefix('torch.')}, "
                         "a floating-point type is expected")
    if not bool(torch.isfinite(t).all()):
        raise TiDARError(f"{folder}: tensor {name} holds NaN or infinite values")


def write_checkpoint_files(model: TiDARModel, folder: Path, tokenizer_from: str | os.PathLike | None = None) -> None:
    """The HF-format files of `model` (and the tokenizer files of `tokenizer_from`) into the existing folder."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    hf = config_to_hf(model.cfg)
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_from is not None:
        root = checkpoint_root(tokenizer_from) if Path(tokenizer_from).is_dir() else None
        for name in TOKENIZER_FILES:
            src = confined(tokenizer_from, name, f"{tokenizer_from}: tokenizer file", root=root)
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
