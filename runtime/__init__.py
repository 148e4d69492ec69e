"""tidar_runtime: the thin runtime that drives TiDAR's draft/verify loop over a backend.

Importable without torch or TensorRT: the loop and sampling are numpy only; each backend
imports its own heavy dependency when it is constructed.
"""

from tidar_runtime.loop import Backend, DecodeResult, DecodeStats, generate_ar, generate_tidar
from tidar_runtime.sampling import SamplingParams

__all__ = ["Backend", "DecodeResult", "DecodeStats", "SamplingParams", "generate_ar", "generate_tidar"]
