"""tidar_runtime: the thin runtime that drives TiDAR's draft/verify loop over a backend.

Importable without torch or TensorRT: the loop, the in-flight engine and sampling are numpy only; each backend
imports its own heavy dependency when it is constructed.
"""

from tidar_runtime.errors import TiDARError
from tidar_runtime.loop import (
    Backend,
    Decoder,
    DecodeResult,
    DecodeStats,
    Outputs,
    generate_ar,
    generate_ar_batch,
    generate_tidar,
    generate_tidar_batch,
    stream_ar,
    stream_tidar,
)
from tidar_runtime.text import text_pieces
from tidar_runtime.request import GenerationRequest
from tidar_runtime.sampling import SamplingParams
from tidar_runtime.engine import Completion, Engine, Event, Handle, QueueFull, open_engine

__all__ = [
    "Backend", "Completion", "Decoder", "DecodeResult", "DecodeStats", "Engine", "Event", "GenerationRequest",
    "Handle", "Outputs",
    "QueueFull", "SamplingParams", "TiDARError",
    "generate_ar", "generate_ar_batch", "generate_tidar", "generate_tidar_batch", "stream_ar", "stream_tidar",
    "open_engine", "text_pieces",
]
