"""The embedded demo model: a small TiDAR model trained by `tidar-export train` on the Python
standard library's own source (see demo_model/MODEL_CARD.md and docs/TRAINING.md)."""

from __future__ import annotations

from pathlib import Path


def demo_model_path() -> Path:
    """Folder of the shipped demo checkpoint (config.json, model.safetensors, tokenizer.json)."""
    return Path(__file__).resolve().parent / "demo_model"
