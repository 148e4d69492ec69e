"""The demo model exported once per test session with a batch of 4 rows (engine and server tests).

A module-level cache rather than a session fixture in conftest: test_engine and test_serve
both call `demo_batch_artifact(tmp_path_factory)` and the export (the slow part) runs once.
"""

import contextlib
import threading
import time
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


@contextlib.contextmanager
def serving(app):
    """A uvicorn server for `app` on a free loopback port, in a thread; yields its base URL."""
    from tidar_runtime.server import bind, make_server

    sock = bind("127.0.0.1", 0)
    srv = make_server(app)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
