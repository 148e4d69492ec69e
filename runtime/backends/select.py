"""Choosing a backend by name, with one-line errors for what is missing."""

from __future__ import annotations

import os

from tidar_runtime.errors import TiDARError

BACKENDS = ("ort", "ort-cuda", "trt", "torch")


def open_backend(name: str, artifact_dir: str | os.PathLike, **kwargs):
    """An initialised backend over an artifact directory."""
    if name == "ort":
        from tidar_runtime.backends.ort import OrtBackend

        return OrtBackend(artifact_dir, **kwargs)
    if name == "ort-cuda":
        from tidar_runtime.backends.ort import OrtBackend

        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise TiDARError("backend ort-cuda needs onnxruntime-gpu and a GPU: this onnxruntime has no CUDA provider")
        return OrtBackend(artifact_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], **kwargs)
    if name == "trt":
        from tidar_runtime.backends.trt import TrtBackend

        return TrtBackend(artifact_dir, **kwargs)
    if name == "torch":
        try:
            from tidar_export.reference import TorchBackend
        except ImportError:
            raise TiDARError("backend torch needs the tidar_export package and torch installed") from None
        return TorchBackend.from_artifact(artifact_dir, **kwargs)
    raise TiDARError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
