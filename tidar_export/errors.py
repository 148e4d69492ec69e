"""Re-export of the shared user-error type and its helper (defined torch-free in tidar_runtime.errors)."""

from tidar_runtime.errors import TiDARError, first_line

__all__ = ["TiDARError", "first_line"]
