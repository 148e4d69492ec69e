"""Choosing a backend by name, with one-line errors for what is missing."""

from __future__ import annotations

import os

from tidar_runtime.errors import TiDARError

BACKENDS = ("ort", "ort-cuda", "trt", "torch")


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
    if name == "torch":
        try:
            from tidar_export.reference import TorchBackend
        except ImportError:
            raise TiDARError("backend torch needs the tidar_export package and torch installed") from None
        return TorchBackend.from_artifact(artifact_dir, **kwargs)
    raise TiDARError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
