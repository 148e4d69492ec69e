"""The training layer: the TiDAR objective and training loop, the corpus and tokenizer, and the
held-out evaluation. The shipped demo checkpoint lives in tidar_export/demo_model/."""
