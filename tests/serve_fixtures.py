"""The demo model exported once per test session with a batch of 4 rows (engine and server tests).

A module-level cache rather than a session fixture in conftest: test_engine and test_serve
both call `demo_batch_artifact(tmp_path_factory)` and the export (the slow part) runs once.
"""

from pathlib import Path

BATCH, MAX_LEN = 4, 256
_CACHE: dict[str, Path] = {}


def demo_batch_artifact(tmp_path_factory) -> Path:
    if "demo" not in _CACHE:
        from tidar_export.bench.demo import demo_model_path
        from tidar_export.export.artifact import export_artifact

        out = tmp_path_factory.getbasetemp() / "demo-batch" / "artifact"
        _CACHE["demo"] = export_artifact(demo_model_path(), out, max_batch=BATCH, max_seq_len=MAX_LEN)
    return _CACHE["demo"]
