"""tidar_export: the torch side of the TiDAR deployment toolkit.

Subpackages, one per layer (the README has the map): `model` (config, reference transformer,
masks, checkpoints, torch backend), `export` (tracers, artifact writer, checker, variants),
`engines` (TensorRT builder, quantization, comparison), `train` (objective, corpus, eval),
`bench` (measurement, reports, tuning, the demo), `commands` (the CLI's thin commands).
Importing this package registers the torch reference as the runtime's `torch` backend; torch
itself is imported only when that backend or a torch-side command runs.
"""

from tidar_runtime.backends.select import register_backend

__version__ = "0.1.0"


def _open_torch_backend(artifact_dir, **kwargs):
    from tidar_export.model.reference import TorchBackend  # needs torch: the `export` extra

    return TorchBackend.from_artifact(artifact_dir, **kwargs)


register_backend("torch", _open_torch_backend)
