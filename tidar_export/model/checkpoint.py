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
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tidar_export.model.config import SUPPORTED_ARCHS, TiDARConfig
from tidar_export.errors import TiDARError
from tidar_export.model.transformer import TiDARModel
from tidar_runtime.fileio import replace_dir

TIDAR_KEY = "tidar"  # config.json key that holds the TiDAR settings
HF_ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")


def _rope_theta(hf: dict) -> float:
    if "rope_parameters" in hf and hf["rope_parameters"]:  # transformers >= 5
        params = hf["rope_parameters"]
        kind = params.get("rope_type", "default")
        theta = params.get("rope_theta")
    else:
        params = hf.get("rope_scaling") or {}
        kind = params.get("rope_type", params.get("type", "default"))
        theta = hf.get("rope_theta")
    if kind != "default":
        raise TiDARError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is implemented")
    return float(theta if theta is not None else 10000.0)


def config_from_hf(hf: dict, block_size: int | None = None, mask_token_id: int | None = None) -> TiDARConfig:
    """TiDARConfig from an HF config.json dict; explicit arguments override the `tidar` key."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        names = hf.get("architectures") or [arch]
        raise TiDARError(
            f"unsupported architecture {names[0]!r} (model_type {arch!r}): supported are "
            + ", ".join(HF_ARCH_NAMES.values())
        )
    if hf.get("use_sliding_window"):
        raise TiDARError("sliding-window attention checkpoints are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise TiDARError(f"unsupported activation {hf['hidden_act']!r}: only SwiGLU (silu) is implemented")
    if hf.get("mlp_bias"):
        raise TiDARError("MLP biases (mlp_bias=true) are not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise TiDARError(f"config.json has no {key!r}")
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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise TiDARError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
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
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise TiDARError(f"{path}: invalid JSON ({e})") from None
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
    model = TiDARModel(cfg).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    return model.eval()


def save_checkpoint(model: TiDARModel, folder: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None) -> Path:
    """Write `model` as an HF-format folder, atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.cfg.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hf = config_to_hf(model.cfg)
        hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
