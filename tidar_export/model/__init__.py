"""The model layer: config and presets, the reference transformer, the masks (the one source of
truth for train / prefill / step / AR masks and positions), checkpoint import/save, and the
torch backend of the decode loop."""
