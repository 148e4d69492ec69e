"""Choosing a backend by name, with one-line errors for what is missing."""

from __future__ import annotations

import os

from collections.abc import Callable

from tidar_runtime.errors import TiDARError

BACKENDS = ("ort", "ort-cuda", "trt", "torch")

# Backends that live outside the runtime, registered by the package that provides them: the
# torch reference is registered by tidar_export (the runtime itself never imports torch).
_REGISTERED: dict[str, Callable] = {}


def register_backend(name: str, opener: Callable) -> None:
    """Make `open_backend(name, artifact_dir, **kwargs)` call `opener(artifact_dir, **kwargs)`."""
    _REGISTERED[name] = opener


def open_backend(name: str, artifact_dir: str | os.PathLike, **kwargs):
    """An initialised backend over an artifact directory.

    ort: ONNX Runtime, CPU provider. ort-cuda: ONNX Runtime's CUDA provider with a
    device-resident cache (onnxruntime-gpu and a GPU). trt: the artifact's TensorRT engines
    (`tidar-export build` first). torch: the reference model, which needs the checkpoint the
    artifact was exported from (`checkpoint=DIR`): an artifact holds no torch weights.
    Keyword arguments go to the backend's constructor.
    """
    if name == "ort":
        from tidar_runtime.backends.ort import OrtBackend

        return OrtBackend(artifact_dir, **kwargs)
    if name == "ort-cuda":
        from tidar_runtime.backends.ort_cuda import OrtCudaBackend, import_ort_cuda

        import_ort_cuda()  # the provider check first: its error says what to install
        return OrtCudaBackend(artifact_dir, **kwargs)
    if name == "trt":
        from tidar_runtime.backends.trt import TrtBackend

        return TrtBackend(artifact_dir, **kwargs)
    if name in _REGISTERED:
        return _REGISTERED[name](artifact_dir, **kwargs)
    if name == "torch":
        raise TiDARError("backend torch is the reference model of the tidar_export package: import tidar_export "
                         "(pip install 'tidar-export[export]' for torch)")
    raise TiDARError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
