"""tidar_graphs: ONNX-side passes, per-target lowering and the target checker (no torch).

Filled by the tracers issue; this package is importable so the layout is in place.
"""
