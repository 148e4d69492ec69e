"""Serving integrations that need no torch: the Triton Inference Server model repository
(`triton.py`, its in-server model `triton_model.py`)."""
