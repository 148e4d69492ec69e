"""The export layer: tracers (torch -> ONNX), the artifact writer (graphs + weights.bin +
manifest), the artifact checker (ORT vs torch, target op tables), and per-block-size variants."""
