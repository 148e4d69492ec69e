"""The engine layer: the TensorRT builder (Polygraphy), explicit Q/DQ quantization, and the
torch / ONNX Runtime / TensorRT comparison with per-module localisation."""
