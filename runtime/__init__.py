"""tidar_runtime: the thin runtime that drives TiDAR's draft/verify loop over a backend.

Importable without torch or TensorRT: the loop and sampling are numpy only; each backend
imports its own heavy dependency when it is constructed.
"""

from tidar_runtime.errors import TiDARError
from tidar_runtime.loop import (
    Backend,
    DecodeResult,
    DecodeStats,
    Outputs,
    generate_ar,
    generate_ar_batch,
    generate_tidar,
    generate_tidar_batch,
    stream_ar,
    stream_tidar,
    text_pieces,
)
from tidar_runtime.sampling import SamplingParams

__all__ = [
    "Backend", "DecodeResult", "DecodeStats", "Outputs", "SamplingParams", "TiDARError",
    "generate_ar", "generate_ar_batch", "generate_tidar", "generate_tidar_batch", "stream_ar", "stream_tidar",
    "text_pieces",
]
