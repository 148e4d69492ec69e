"""tidar_export: the torch side of the TiDAR deployment toolkit.

Config and presets, the reference model, the masks (one source of truth), checkpoint import,
and the torch reference backend of the decode loop.
"""

__version__ = "0.1.0"
