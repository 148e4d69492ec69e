"""Re-export of the shared user-error type (defined torch-free in tidar_runtime.errors)."""

from tidar_runtime.errors import TiDARError

__all__ = ["TiDARError"]
