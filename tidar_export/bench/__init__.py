"""The measurement layer: AR vs TiDAR decode speed and the step-cost curve (measure), their
markdown and plots (report), the block-size autotuner (tune), and the demo (demo)."""
